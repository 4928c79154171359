"""Offline datasets of text-game transitions in RLlib's offline format (see docs/offline.md).

A dataset is what one behaviour policy did on the train split's games: one parquet row per
transition with the columns RLlib's offline pre-learner reads (``eps_id``, ``t``, ``obs``,
``actions``, ``rewards``, ``new_obs``, ``terminateds``, ``truncateds``, ``infos``), the
observations as the env's Dict observation (Arrow struct columns), and the state's texts in
``infos`` (what a prior is asked about when the dataset is annotated). Beside the parquet
files, ``dataset.json`` (the card) says what is in it and how the behaviour was defined.

Behaviour policies:

- ``random``: uniform over the state's candidates.
- ``expert``: the env's expert (a random candidate where the expert has no answer).
- ``medium``: the expert, except that each step is a uniform random candidate with probability
  ``mix``; ``mix`` is calibrated so that behaviour success lands about halfway between
  ``random`` and ``expert`` (see :func:`calibrate_medium_mix`).

The functional core (:func:`rollout_episodes`, :func:`dataset_card`) has no Ray; writing goes
through Ray Data (:func:`write_dataset`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from tqdm.auto import tqdm

from cachellm_rl.envs.text_env import (
    INFO_CANDIDATES,
    INFO_EXPERT_ACTION,
    INFO_INVENTORY,
    INFO_OBJECTIVE,
    INFO_OBSERVATION,
    INFO_WON,
)

POLICIES = ("random", "medium", "expert")
CARD_FILE = "dataset.json"
DEFAULT_OFFLINE_DIR = Path("data/offline")
# Episodes per dataset when the user gives none (ALFWorld's engine is the slowest).
DEFAULT_EPISODES = {"textworld": 600, "babyai": 600, "alfworld": 500}

# Column names: RLlib's offline pre-learner schema (``ray.rllib.offline.offline_prelearner``).
COL_EPS_ID = "eps_id"
COL_T = "t"
COL_OBS = "obs"
COL_ACTIONS = "actions"
COL_REWARDS = "rewards"
COL_NEW_OBS = "new_obs"
COL_TERMINATEDS = "terminateds"
COL_TRUNCATEDS = "truncateds"
COL_INFOS = "infos"
# Keys of a row's ``infos``: the state's texts and where it came from.
INFO_KEYS = ("observation", "candidates", "objective", "inventory", "game")


@dataclass(frozen=True, kw_only=True)
class DatasetConfig:
    """What to generate.

    Attributes:
        env: Text env id (``textworld``, ``alfworld`` or ``babyai``).
        policy: Behaviour policy: ``random``, ``medium`` or ``expert``.
        episodes: Episodes to record (games of the train split in turn).
        games_dir: Game suite (None: the env's default suite).
        split: Split whose games are played (the train split: offline data never comes from
            evaluation games).
        seed: Seed of the behaviour's random choices.
        max_episode_steps: Episode cap (None: the env's default).
        medium_mix: Random-step probability of ``medium`` (None: calibrated).
        calibration_episodes: Episodes per measurement while calibrating ``medium``.
    """

    env: str
    policy: str
    episodes: int
    games_dir: str | None = None
    split: str = "train"
    seed: int = 0
    max_episode_steps: int | None = None
    medium_mix: float | None = None
    calibration_episodes: int = 30

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown behaviour policy {self.policy!r}; known: {list(POLICIES)}")
        if self.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}")
        if self.medium_mix is not None and not 0.0 <= self.medium_mix <= 1.0:
            raise ValueError(f"medium_mix must be in [0, 1], got {self.medium_mix}")
        if self.medium_mix is not None and self.policy != "medium":
            raise ValueError("medium_mix applies to the medium policy only")
        if self.calibration_episodes < 1:
            raise ValueError("calibration_episodes must be >= 1")


@dataclass
class EpisodeLog:
    """Transitions of one recorded episode (rows in the dataset's column layout)."""

    rows: list[dict] = field(default_factory=list)
    won: bool = False
    ret: float = 0.0
    expert_silent: int = 0  # steps where the env's expert had no answer among the candidates


def behaviour_action(policy: str, mix: float, info: dict, rng: np.random.Generator) -> int:
    """Index of the candidate the behaviour policy takes in a state with ``info``.

    Args:
        policy: ``random``, ``medium`` or ``expert``.
        mix: Random-step probability (``medium``; 0 for ``expert``, 1 for ``random``).
        info: The env's info (candidates, expert action).
        rng: Random source.

    Returns:
        The action index.
    """
    cands = info[INFO_CANDIDATES]
    p_random = {"random": 1.0, "expert": 0.0}.get(policy, mix)
    expert = info.get(INFO_EXPERT_ACTION)
    if expert is None or expert not in cands or rng.random() < p_random:
        return int(rng.integers(len(cands)))
    return cands.index(expert)


def _state_info(env, game: str) -> dict:
    d = env.decision
    return {  # the env's info keys, so a stored row reads back with text_state_from_info
        INFO_OBSERVATION: d.observation,
        INFO_CANDIDATES: list(d.candidates),
        INFO_OBJECTIVE: d.objective,
        INFO_INVENTORY: d.inventory,
        "game": Path(game).name,
    }


def obs_record(obs: dict) -> dict:
    """A Dict observation as plain (nested) lists, which Arrow stores as a struct of list
    columns (numpy arrays would be stored as pickled objects, which nothing should unpickle)."""
    return {k: np.asarray(v).tolist() for k, v in obs.items()}


def rollout_episodes(
    env,
    games: Sequence[str],
    *,
    policy: str,
    mix: float,
    episodes: int,
    seed: int,
    first_episode: int = 0,
    progress: bool | str = False,
    bar_file: TextIO | None = None,
) -> list[EpisodeLog]:
    """Play ``episodes`` episodes with the behaviour policy, games of ``games`` in turn.

    Args:
        env: A text env built with ``expert=True`` (``reset(options={"game": g})``).
        games: Games to cycle through.
        policy: Behaviour policy.
        mix: Random-step probability of ``medium``.
        episodes: Episodes to play.
        seed: Seed of the behaviour's choices.
        first_episode: Index of the first episode (its ``eps_id`` and game).
        progress: Show a progress bar (a string: its label).
        bar_file: The progress bar's stream (default stderr).

    Returns:
        One :class:`EpisodeLog` per episode.
    """
    if not games:
        raise ValueError("rollout_episodes needs at least one game")
    rng = np.random.default_rng(seed)
    out = []
    label = progress if isinstance(progress, str) else f"{policy} episodes"
    for k in tqdm(range(episodes), desc=label, disable=not progress, unit="ep", file=bar_file):
        index = first_episode + k
        game = games[index % len(games)]
        obs, info = env.reset(options={"game": game})
        log = EpisodeLog()
        eps_id = f"{policy}-{seed}-{index:06d}"
        t, done = 0, False
        while not done:
            state = _state_info(env, game)
            log.expert_silent += info.get(INFO_EXPERT_ACTION) not in info[INFO_CANDIDATES]
            action = behaviour_action(policy, mix, info, rng)
            new_obs, reward, term, trunc, info = env.step(action)
            log.rows.append(
                {
                    COL_EPS_ID: eps_id,
                    COL_T: t,
                    COL_OBS: obs_record(obs),
                    COL_ACTIONS: action,
                    COL_REWARDS: float(reward),
                    COL_NEW_OBS: obs_record(new_obs),
                    COL_TERMINATEDS: bool(term),
                    COL_TRUNCATEDS: bool(trunc),
                    COL_INFOS: state,
                }
            )
            log.ret += float(reward)
            obs, t, done = new_obs, t + 1, bool(term or trunc)
        log.won = bool(info.get(INFO_WON))
        out.append(log)
    return out


def success_rate(logs: Sequence[EpisodeLog]) -> float:
    """Share of won episodes."""
    return float(np.mean([log.won for log in logs])) if logs else 0.0


def calibrate_medium_mix(
    measure: Callable[[float], float],
    *,
    random_success: float,
    expert_success: float,
    iters: int = 6,
    tolerance: float = 0.05,
) -> tuple[float, float, list[dict]]:
    """The random-step probability whose behaviour success is halfway between random and
    expert, by bisection (success falls as the mix grows).

    Args:
        measure: Behaviour success of ``medium`` at a mix.
        random_success: Success of ``random``.
        expert_success: Success of ``expert``.
        iters: Most bisection steps.
        tolerance: Stop when a measured success is this close to the target.

    Returns:
        ``(mix, its measured success, the measurements)``: the measured mix closest to target.
    """
    target = 0.5 * (random_success + expert_success)
    lo, hi = 0.0, 1.0
    trace: list[dict] = []
    for _ in range(iters):
        mix = 0.5 * (lo + hi)
        s = measure(mix)
        trace.append({"mix": mix, "success": s})
        if abs(s - target) <= tolerance:
            break
        if s > target:
            lo = mix
        else:
            hi = mix
    best = min(trace, key=lambda r: abs(r["success"] - target))
    return float(best["mix"]), float(best["success"]), trace


def dataset_card(
    cfg: DatasetConfig,
    logs: Sequence[EpisodeLog],
    *,
    games: Sequence[str],
    mix: float,
    calibration: dict | None,
    prior_version: str,
    seconds: float,
) -> dict:
    """The ``dataset.json`` card of a recorded dataset."""
    rows = [r for log in logs for r in log.rows]
    distinct = {
        json.dumps(
            [r[COL_INFOS][k] for k in ("observation", "objective", "inventory", "candidates")]
        )
        for r in rows
    }
    definitions = {
        "random": "uniform over the state's candidates",
        "expert": "the env's expert (uniform where the expert has no answer)",
        "medium": (
            f"the env's expert, with a uniform random candidate instead at each step with "
            f"probability {mix:.3f}"
        ),
    }
    return {
        "env": cfg.env,
        "policy": cfg.policy,
        "policy_definition": definitions[cfg.policy],
        "medium_mix": mix if cfg.policy == "medium" else None,
        "calibration": calibration,
        "split": cfg.split,
        "games": len(games),
        "episodes": len(logs),
        "transitions": len(rows),
        "distinct_states": len(distinct),
        "behaviour_success": success_rate(logs),
        "behaviour_return": float(np.mean([log.ret for log in logs])) if logs else 0.0,
        "mean_episode_length": float(np.mean([len(log.rows) for log in logs])) if logs else 0.0,
        # medium and expert take a uniform candidate where the expert has no answer
        "expert_silent_steps": (
            None if cfg.policy == "random" else sum(log.expert_silent for log in logs)
        ),
        "prior_model_version": prior_version,
        "columns": [
            COL_EPS_ID,
            COL_T,
            COL_OBS,
            COL_ACTIONS,
            COL_REWARDS,
            COL_NEW_OBS,
            COL_TERMINATEDS,
            COL_TRUNCATEDS,
            COL_INFOS,
        ],
        "config": asdict(cfg),
        "fingerprint": config_fingerprint(cfg, games),
        "seconds": seconds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def config_fingerprint(cfg: DatasetConfig, games: Sequence[str]) -> str:
    """Hash of what determines a dataset's content (settings and games), for idempotence."""
    payload = json.dumps(
        {"config": asdict(cfg), "games": [Path(g).name for g in games]}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def default_dataset_dir(env: str, policy: str) -> Path:
    """``data/offline/<env>/<policy>``."""
    return DEFAULT_OFFLINE_DIR / env / policy


def read_card(folder: str | Path) -> dict | None:
    """A dataset folder's card (None when it has none)."""
    path = Path(folder) / CARD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_dataset(folder: str | Path, logs: Sequence[EpisodeLog], card: dict) -> Path:
    """Write the transitions as parquet through Ray Data, then the card (last, so a folder
    with a card is complete). Replaces an older dataset in ``folder``."""
    import shutil

    import ray

    folder = Path(folder)
    rows = [r for log in logs for r in log.rows]
    if not rows:
        raise ValueError("a dataset needs at least one transition")
    if folder.exists():
        shutil.rmtree(folder)
    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    blocks = max(1, math.ceil(len(rows) / 20_000))
    ray.data.from_items(rows).repartition(blocks).write_parquet(
        str(tmp.resolve()), compression="zstd"
    )
    (tmp / CARD_FILE).write_text(json.dumps(card, indent=1, default=json_default))
    tmp.rename(folder)
    return folder


def json_default(obj: Any):
    """``json.dumps`` default for numpy scalars in cards."""
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def make_dataset(
    cfg: DatasetConfig,
    out: str | Path | None = None,
    *,
    progress: bool = True,
    bar_file: TextIO | None = None,
    log=print,
) -> dict:
    """Record a dataset into ``out`` (default ``data/offline/<env>/<policy>``), unless a
    complete one made with the same settings and games is there already (idempotent).

    Args:
        cfg: What to record.
        out: Dataset folder.
        progress: Progress bars.
        bar_file: The progress bars' stream (default stderr).
        log: Where one-line status messages go.

    Returns:
        The dataset's card.
    """
    from cachellm_rl.envs.registry import (
        check_env_id,
        default_games_dir,
        default_prior_dir,
        env_split_games,
        has_games,
        make_text_env,
    )
    from cachellm_rl.prior.scoring import weights_version

    check_env_id(cfg.env)
    folder = Path(out) if out is not None else default_dataset_dir(cfg.env, cfg.policy)
    games_dir = Path(cfg.games_dir) if cfg.games_dir else default_games_dir(cfg.env)
    if not has_games(cfg.env, games_dir):
        raise ValueError(
            f"no {cfg.env} games in {games_dir}; make them with `cachellm-rl games make`"
        )
    games = env_split_games(cfg.env, games_dir, cfg.split)
    if not games:
        raise ValueError(f"the {cfg.split} split of {games_dir} has no games")
    card = read_card(folder)
    if card is not None and card.get("fingerprint") == config_fingerprint(cfg, games):
        log(f"{folder}: already made with these settings ({card['transitions']} transitions)")
        return card
    env_config: dict[str, Any] = {"games": list(games), "expert": True, "game_order": "cycle"}
    if cfg.max_episode_steps is not None:
        env_config["max_episode_steps"] = cfg.max_episode_steps
    env = make_text_env(cfg.env, env_config)
    t0 = time.perf_counter()
    try:
        mix = {"random": 1.0, "expert": 0.0}.get(cfg.policy, cfg.medium_mix or 0.0)
        calibration = None
        if cfg.policy == "medium" and cfg.medium_mix is None:
            mix, calibration = _calibrate(env, games, cfg, progress, bar_file, log)
        logs = rollout_episodes(
            env,
            games,
            policy=cfg.policy,
            mix=mix,
            episodes=cfg.episodes,
            seed=cfg.seed,
            progress=f"{cfg.env} {cfg.policy}" if progress else False,
            bar_file=bar_file,
        )
    finally:
        env.close()
    prior_dir = default_prior_dir(cfg.env)
    weights = weights_version(prior_dir) if (prior_dir / "config.json").is_file() else None
    card = dataset_card(
        cfg,
        logs,
        games=games,
        mix=mix,
        calibration=calibration,
        prior_version=weights or "",
        seconds=time.perf_counter() - t0,
    )
    write_dataset(folder, logs, card)
    log(
        f"{folder}: {card['episodes']} episodes, {card['transitions']} transitions, "
        f"{card['distinct_states']} distinct states, behaviour success "
        f"{card['behaviour_success']:.2f}"
    )
    return card


def _calibrate(
    env, games, cfg: DatasetConfig, progress: bool, bar_file: TextIO | None, log
) -> tuple[float, dict]:
    """``medium``'s mix, measured on calibration episodes (seeds apart from the dataset's)."""
    n = cfg.calibration_episodes

    def measure(policy: str, mix: float, seed: int) -> float:
        logs = rollout_episodes(
            env,
            games,
            policy=policy,
            mix=mix,
            episodes=n,
            seed=seed,
            first_episode=0,
            progress=f"calibration: {policy} {mix:.2f}" if progress else False,
            bar_file=bar_file,
        )
        return success_rate(logs)

    base = 1_000_003 + cfg.seed
    random_s = measure("random", 1.0, base)
    expert_s = measure("expert", 0.0, base + 1)
    steps = iter(range(2, 100))
    mix, got, trace = calibrate_medium_mix(
        lambda m: measure("medium", m, base + next(steps)),
        random_success=random_s,
        expert_success=expert_s,
    )
    target = 0.5 * (random_s + expert_s)
    log(
        f"medium: random {random_s:.2f}, expert {expert_s:.2f}, target {target:.2f}; "
        f"mix {mix:.3f} gives {got:.2f} on {n} calibration episodes"
    )
    return mix, {
        "episodes_per_measurement": n,
        "random_success": random_s,
        "expert_success": expert_s,
        "target_success": target,
        "chosen_mix_success": got,
        "trace": trace,
    }
