"""The offline suite: behaviour cloning, discrete CQL and CQL-Prior trained on a generated
dataset with RLlib's offline loop, then played greedily on the env's unseen test games
(see docs/offline.md). A composition of the suite layer (:mod:`cachellm_rl.suite`):
``experiments/offline_suite.py`` is its command-line front end.

Protocol: the dataset is recorded on the train split's games; the learners' hyper-parameters
are chosen on the valid split's games (seed 0); every method is evaluated by greedy play, one
episode per game, on the test split's games. The embedded prior was trained on expert
demonstrations of the same train games. Reference rows: ``random`` (uniform over candidates)
and ``expert`` (the env's expert) on the test games give the normalised score
``(success - random) / (expert - random)``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import ray

from cachellm_rl import stats as rstats
from cachellm_rl import suite as suite_layer
from cachellm_rl.algorithms.cql_prior.config import (
    OfflineLearnerSettings,
    learned_module,
    offline_algo_config,
)
from cachellm_rl.algorithms.ps_dqn.methods import MethodSettings, prior_chooser, start_cache
from cachellm_rl.cache.actor import DEFAULT_NAMESPACE, kill_cache
from cachellm_rl.envs.evaluate import GreedyResult, greedy_evaluate, short_game_names
from cachellm_rl.envs.registry import (
    DEFAULT_MAX_EPISODE_STEPS,
    check_env_id,
    default_games_dir,
    default_prior_dir,
)
from cachellm_rl.offline.annotate import annotate_dataset, annotated_dir
from cachellm_rl.offline.datasets import (
    POLICIES,
    DatasetConfig,
    behaviour_action,
    default_dataset_dir,
    make_dataset,
    read_card,
)
from cachellm_rl.results import TensorBoardLogger, write_json
from cachellm_rl.suite import RunOutcome, SuiteMethod

logger = logging.getLogger(__name__)

OFFLINE_PRESETS = ("quick", "full")
# The suite's methods: an algorithm with the cache preset the dataset's priors come from.
OFFLINE_METHODS = {
    m.name: m
    for m in (
        SuiteMethod("direct_lm", "prior_argmax", "uncached", deterministic=True),
        SuiteMethod("bc", "bc", "none"),
        SuiteMethod("cql", "cql", "none"),
        SuiteMethod("cql_prior_uncached", "cql_prior", "uncached"),
        SuiteMethod("cql_prior_static", "cql_prior", "static"),
        SuiteMethod("cql_prior_adaptive", "cql_prior", "adaptive"),
    )
}
# Reference policies of the normalised score, run on the same test games.
REFERENCE_METHODS = {
    m.name: m
    for m in (
        SuiteMethod("random", "random_policy", "none"),
        SuiteMethod("expert", "expert_policy", "none", deterministic=True),
    )
}
DEFAULT_CQL_GRID: tuple[dict, ...] = tuple({"alpha_cql": a} for a in (0.3, 1.0, 3.0))
DEFAULT_CQL_PRIOR_GRID: tuple[dict, ...] = tuple(
    {"alpha_cql": 1.0, "alpha_prior": p} for p in (0.3, 1.0, 3.0)
)


@dataclass(frozen=True, kw_only=True)
class OfflineSuiteConfig:
    """One offline suite run on one (env, dataset).

    Attributes:
        env: Text env id.
        dataset: Behaviour policy of the dataset (``random``, ``medium`` or ``expert``).
        dataset_dir: Dataset folder (None: ``data/offline/<env>/<dataset>``); made when missing.
        dataset_episodes: Episodes recorded when the dataset has to be made (0: the env's
            default size).
        games_dir: Game suite (None: the env's default).
        num_games: Test games evaluated (0: all).
        curve_games: Test games of the learning curves (the first ones).
        num_valid_games: Valid games of the hyper-parameter selection (0: all).
        prior_model: Prior model folder (None: the env's embedded prior).
        prior_temperature: ``T_prior`` of the Serve scorer (the annotation's prior).
        methods: Methods compared (``random`` and ``expert`` always run as references).
        seeds: Learner seeds.
        train_iters: ``algo.train()`` calls per run (each ``learner.iters_per_train`` updates).
        eval_every_iters: Learning-curve evaluation period, in ``algo.train()`` calls.
        learner: Base learner settings (each method's mode and selected weights replace
            its fields).
        cql_grid: Candidate settings of ``cql`` (chosen on the valid games).
        cql_prior_grid: Candidate settings of every ``cql_prior_*`` method (chosen once, with
            the uncached prior, and shared by the cache presets).
        target_success: The score of "training time to a stated score": the first learning-
            curve point with curve-game success at least this.
        cql_prior_policy: How CQL-Prior acts: ``posterior`` (argmax of ``log p + Q / T``, the
            prior asked through a fresh cache of the method's preset; its LM queries are
            evaluation traffic) or ``q`` (argmax of Q, no LM at play time).
        max_episode_steps: Episode cap of evaluation (None: the env's default).
        progress: Progress bars.
    """

    env: str = "textworld"
    dataset: str = "random"
    dataset_dir: str | None = None
    dataset_episodes: int = 0
    games_dir: str | None = None
    num_games: int = 0
    curve_games: int = 5
    num_valid_games: int = 0
    prior_model: str | None = None
    prior_temperature: float = 1.0
    methods: tuple[str, ...] = tuple(OFFLINE_METHODS)
    seeds: tuple[int, ...] = (0, 1, 2)
    train_iters: int = 30
    eval_every_iters: int = 10
    learner: OfflineLearnerSettings = field(default_factory=OfflineLearnerSettings)
    cql_grid: tuple[dict, ...] = DEFAULT_CQL_GRID
    cql_prior_grid: tuple[dict, ...] = DEFAULT_CQL_PRIOR_GRID
    target_success: float = 0.5
    cql_prior_policy: str = "posterior"
    max_episode_steps: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        check_env_id(self.env)
        if self.dataset not in POLICIES:
            raise ValueError(f"unknown dataset {self.dataset!r}; known: {list(POLICIES)}")
        bad = [m for m in self.methods if m not in OFFLINE_METHODS]
        if bad:
            raise ValueError(f"unknown offline methods {bad}; known: {list(OFFLINE_METHODS)}")
        if not self.seeds:
            raise ValueError("OfflineSuiteConfig.seeds is empty")
        if self.train_iters < 1 or self.eval_every_iters < 1:
            raise ValueError("train_iters and eval_every_iters must be >= 1")
        for name in ("num_games", "curve_games", "num_valid_games", "dataset_episodes"):
            if getattr(self, name) < 0:
                raise ValueError(f"OfflineSuiteConfig.{name} must be >= 0")
        if self.cql_prior_policy not in ("q", "posterior"):
            raise ValueError("cql_prior_policy must be 'q' or 'posterior'")
        for grid in (self.cql_grid, self.cql_prior_grid):
            if not grid:
                raise ValueError("a hyper-parameter grid is empty")
            for point in grid:
                replace(self.learner, **point)  # unknown keys or bad values fail here
        defaults = {
            "games_dir": default_games_dir(self.env),
            "prior_model": default_prior_dir(self.env),
            "dataset_dir": default_dataset_dir(self.env, self.dataset),
        }
        for name, default in defaults.items():
            value = getattr(self, name)
            path = Path(str(value if value is not None else default)).resolve()
            object.__setattr__(self, name, str(path))
        if self.max_episode_steps is None:
            object.__setattr__(self, "max_episode_steps", DEFAULT_MAX_EPISODE_STEPS[self.env])

    def cache_presets(self) -> list[str]:
        """The annotation presets the methods need."""
        presets = {OFFLINE_METHODS[m].cache for m in self.methods if m.startswith("cql_prior")}
        return [p for p in ("uncached", "exact_only", "static", "adaptive") if p in presets]


def offline_preset(name: str, **overrides) -> OfflineSuiteConfig:
    """``quick`` (CI: minutes) or ``full`` (the tables of docs/offline.md)."""
    if name == "quick":
        base: dict[str, Any] = {
            "num_games": 2,
            "curve_games": 1,
            "num_valid_games": 2,
            "seeds": (0,),
            "train_iters": 2,
            "eval_every_iters": 1,
            "dataset_episodes": 8,
            "learner": OfflineLearnerSettings(iters_per_train=2, batch_size=32, hidden=64),
            "cql_grid": ({"alpha_cql": 1.0},),
            "cql_prior_grid": ({"alpha_cql": 1.0, "alpha_prior": 1.0},),
        }
        if overrides.get("dataset_dir") is None:  # never overwrite a full-size dataset
            env, policy = overrides.get("env") or "textworld", overrides.get("dataset") or "random"
            base["dataset_dir"] = str(default_dataset_dir(env, policy)) + "-quick"
    elif name == "full":
        base = {"learner": OfflineLearnerSettings(iters_per_train=50)}
    else:
        raise ValueError(f"unknown preset {name!r}; known: {list(OFFLINE_PRESETS)}")
    return OfflineSuiteConfig(**{**base, **{k: v for k, v in overrides.items() if v is not None}})


def split_games(cfg: OfflineSuiteConfig, split: str, n: int) -> list[str]:
    """The first ``n`` games of ``split`` (0: all)."""
    from cachellm_rl.envs.registry import env_split_games

    games = env_split_games(cfg.env, str(cfg.games_dir), split)
    return games[:n] if n else games


# -- data -------------------------------------------------------------------------------------
def prepare_data(
    cfg: OfflineSuiteConfig,
    settings: MethodSettings,
    *,
    console: TextIO | None = None,
    log=print,
) -> dict[str, dict]:
    """Make the dataset (when missing) and annotate it under every preset the methods need
    (each once, reused across seeds and learners). Needs Ray and, for annotations, the
    deployed prior.

    Args:
        cfg: The suite.
        settings: Cache settings of the annotation presets.
        console: The progress bars' stream (default stderr).
        log: Where one-line status messages go.

    Returns:
        The card of each dataset the learners read, keyed by cache preset (``none``: the raw
        dataset).
    """
    card = read_card(str(cfg.dataset_dir))
    if card is None or cfg.dataset_episodes:  # a dataset already there is used as it is
        dcfg = DatasetConfig(
            env=cfg.env,
            policy=cfg.dataset,
            games_dir=cfg.games_dir,
            episodes=cfg.dataset_episodes or default_episodes(cfg.env),
        )
        card = make_dataset(dcfg, cfg.dataset_dir, progress=cfg.progress, bar_file=console, log=log)
    cards = {"none": card}
    for preset in cfg.cache_presets():
        cards[preset] = annotate_dataset(
            str(cfg.dataset_dir),
            preset,
            settings,
            cache_name=f"offline-annotate-{preset}",
            progress=cfg.progress,
            bar_file=console,
            log=log,
        )
    return cards


def default_episodes(env: str) -> int:
    """Default dataset size: 500 episodes on ALFWorld (its engine is the slowest), else 600."""
    return 500 if env == "alfworld" else 600


def data_dir(cfg: OfflineSuiteConfig, cache: str) -> str:
    """The dataset folder a method with cache preset ``cache`` reads."""
    return str(cfg.dataset_dir if cache == "none" else annotated_dir(str(cfg.dataset_dir), cache))


# -- runs -------------------------------------------------------------------------------------
def _env(cfg: OfflineSuiteConfig, games: Sequence[str], *, expert: bool = False, seed: int = 0):
    from cachellm_rl.envs.registry import make_text_env

    return make_text_env(
        cfg.env,
        {
            "games": list(games),
            "expert": expert,
            "seed": seed,
            "max_episode_steps": cfg.max_episode_steps,
        },
    )


def play(cfg: OfflineSuiteConfig, games: Sequence[str], choose, *, expert=False, seed=0):
    """Greedy play of ``choose`` on ``games`` (one episode each)."""
    env = _env(cfg, games, expert=expert, seed=seed)
    try:
        return greedy_evaluate(env, games, choose)
    finally:
        env.close()


def _row(method: str, seed: int, res: GreedyResult, extra: dict) -> dict:
    return {
        "method": method,
        "seed": seed,
        "success": res.success_rate,
        "return_mean": float(np.mean(res.returns)),
        "eval_episode_length_mean": float(np.mean(res.lengths)),
        "per_game_success": res.per_game_success_by_name(),
        **extra,
    }


def run_reference(cfg: OfflineSuiteConfig, method: str, seed: int, games) -> RunOutcome:
    """``random`` (uniform over candidates, seeded) or ``expert`` on the test games."""
    rng = np.random.default_rng(10_000 + seed)
    policy = "random" if method == "random" else "expert"

    def choose(obs, info):
        return behaviour_action(policy, 1.0 if policy == "random" else 0.0, info, rng), None, 0.0

    t0 = time.perf_counter()
    res = play(cfg, games, choose, expert=policy == "expert", seed=seed)
    extra = {"deterministic": policy == "expert", "reference": True}
    return RunOutcome(_row(method, seed, res, {**extra, "wall_s": time.perf_counter() - t0}))


def run_direct_lm(cfg: OfflineSuiteConfig, settings: MethodSettings, games) -> RunOutcome:
    """The prior's argmax on the test games, every decision answered by the LM."""
    from cachellm_rl.cache.client import PriorCacheClient

    name = "offline-suite-direct_lm"
    t0 = time.perf_counter()
    handle = start_cache("direct_lm", settings, name, DEFAULT_NAMESPACE)
    try:
        client = PriorCacheClient(None, cache_name=name, namespace=DEFAULT_NAMESPACE)
        res = play(cfg, games, prior_chooser(client))
        lm = int(ray.get(handle.stats.remote()).as_flat_dict().get("lm_queries", 0))
    finally:
        del handle
        kill_cache(name, DEFAULT_NAMESPACE)
    extra = {
        "deterministic": True,
        "train_lm_queries": 0,
        "eval_lm_queries": lm,
        "wall_s": time.perf_counter() - t0,
        "latency_miss_p50_ms": res.latency_miss.quantile(0.5),
    }
    return RunOutcome(_row("direct_lm", 0, res, extra), latency_miss=res.latency_miss)


class PriorPlayer:
    """Greedy play of a trained module, with the prior asked through a fresh cache actor of
    ``preset`` when the module acts on the posterior (else a uniform prior: argmax of Q). Its
    LM queries are evaluation traffic."""

    def __init__(self, preset: str | None, settings: MethodSettings, name: str) -> None:
        self.name, self.handle, self.client = name, None, None
        if preset is not None:
            from cachellm_rl.algorithms.ps_dqn.connectors import make_prior_client
            from cachellm_rl.algorithms.ps_dqn.methods import connector_config_for

            kill_cache(name, DEFAULT_NAMESPACE)
            self.handle = start_cache(preset, settings, name, DEFAULT_NAMESPACE)
            self.client = make_prior_client(connector_config_for(preset, settings, name))

    def play(self, cfg: OfflineSuiteConfig, games: Sequence[str], module) -> GreedyResult:
        """One greedy episode per game."""
        return play(cfg, games, prior_chooser(self.client, module=module))

    def lm_queries(self) -> int:
        """LM queries of the plays so far."""
        if self.handle is None:
            return 0
        return int(ray.get(self.handle.stats.remote()).as_flat_dict().get("lm_queries", 0))

    def close(self) -> None:
        """Removes the cache actor."""
        if self.handle is not None:
            self.handle = None
            kill_cache(self.name, DEFAULT_NAMESPACE)


def player_for(method: str, settings_l: OfflineLearnerSettings, settings: MethodSettings):
    """The player of ``method``: through its preset's cache when it acts on the posterior."""
    preset = OFFLINE_METHODS[method].cache if settings_l.policy == "posterior" else None
    return PriorPlayer(preset, settings, f"offline-eval-{method}")


def learner_settings(cfg: OfflineSuiteConfig, method: str, chosen: dict) -> OfflineLearnerSettings:
    """The learner settings of ``method``: the base, its mode and its chosen weights."""
    algo = OFFLINE_METHODS[method].algorithm
    if algo == "bc":
        return replace(cfg.learner, mode="bc", alpha_prior=0.0)
    point = chosen.get(algo, {})
    s = replace(cfg.learner, mode="cql", **point)
    if algo == "cql_prior":
        return replace(s, policy=cfg.cql_prior_policy)
    return replace(s, alpha_prior=0.0)


@dataclass
class TrainedLearner:
    """A trained learner's module and what its training measured."""

    module: Any
    train_s: float
    updates: int
    curve: list[dict]
    time_to_target_s: float | None


def train_learner(
    cfg: OfflineSuiteConfig,
    method: str,
    seed: int,
    settings: OfflineLearnerSettings,
    train_games: Sequence[str],
    *,
    curve_games: Sequence[str] = (),
    tb: TensorBoardLogger | None = None,
    player: PriorPlayer | None = None,
) -> TrainedLearner:
    """Train one learner on its dataset, with greedy learning-curve points on ``curve_games``
    (their play is not counted in the training time)."""
    cache = OFFLINE_METHODS[method].cache if method in OFFLINE_METHODS else "none"
    algo = offline_algo_config(
        cfg.env, train_games, [data_dir(cfg, cache)], replace(settings), seed=seed
    ).build_algo()
    # Ray Data logs every streaming-executor step at DEBUG (megabytes per run in run.log)
    logging.getLogger("ray.data").setLevel(logging.INFO)
    train_s, updates, curve, hit = 0.0, 0, [], None
    try:
        for it in range(1, cfg.train_iters + 1):
            t0 = time.perf_counter()
            res = algo.train()
            train_s += time.perf_counter() - t0
            updates += settings.iters_per_train
            if curve_games and (it % cfg.eval_every_iters == 0 or it == cfg.train_iters):
                module = learned_module(algo)
                ev = (
                    player.play(cfg, curve_games, module)
                    if player is not None
                    else play(cfg, curve_games, prior_chooser(None, module=module))
                )
                learn = res.get("learners", {}).get("default_policy", {})
                point: dict[str, Any] = {
                    "method": method,
                    "seed": seed,
                    "updates": updates,
                    "train_s": train_s,
                    "curve_success": ev.success_rate,
                    "loss": _num(learn.get("total_loss", learn.get("qf_loss"))),
                    "kl_to_prior": _num(learn.get("kl_to_prior")),
                }
                curve.append(point)
                if tb is not None:
                    keys = ("train_s", "curve_success", "loss", "kl_to_prior")
                    tb.scalars(updates, {k: point[k] for k in keys})
                if hit is None and ev.success_rate >= cfg.target_success:
                    hit = train_s
        module = learned_module(algo)
    finally:
        algo.stop()
    return TrainedLearner(module, train_s, updates, curve, hit)


def _num(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def run_learner(
    cfg: OfflineSuiteConfig,
    method: str,
    seed: int,
    chosen: dict,
    cards: dict[str, dict],
    games: Sequence[str],
    train_games: Sequence[str],
    out: Path,
    method_settings: MethodSettings,
) -> RunOutcome:
    """Train ``method`` with seed ``seed`` and play it greedily on the test games."""
    settings = learner_settings(cfg, method, chosen)
    cache = OFFLINE_METHODS[method].cache
    t0 = time.perf_counter()
    tb = TensorBoardLogger(out / "tb" / f"{method}-s{seed}")
    player = player_for(method, settings, method_settings)
    try:
        trained = train_learner(
            cfg,
            method,
            seed,
            settings,
            train_games,
            curve_games=games[: cfg.curve_games],
            tb=tb,
            player=player,
        )
        curve_lm = player.lm_queries()
        res = player.play(cfg, games, trained.module)
        eval_lm = player.lm_queries() - curve_lm
    finally:
        tb.close()
        player.close()
    ann = cards.get(cache, {}).get("annotation", {})
    extra = {
        "dataset": cfg.dataset,
        "cache_preset": cache,
        "settings": settings.as_dict(),
        "train_s": trained.train_s,
        "updates": trained.updates,
        "updates_per_s": trained.updates / trained.train_s if trained.train_s else None,
        "time_to_target_s": trained.time_to_target_s,
        # The annotation's LM queries: paid once per (dataset, preset), shared by every seed.
        "train_lm_queries": int(ann.get("lm_queries", 0)),
        "annotation_hit_rate": (
            1.0 - ann["lm_queries"] / ann["decisions"] if ann.get("decisions") else None
        ),
        "annotation_state_encoder": ann.get("state_encoder", "minilm"),
        "annotation_audits": ann.get("audits"),
        "annotation_audits_wrong": ann.get("audits_wrong"),
        # the final evaluation's LM queries (0 when the policy is the argmax of Q); the
        # learning curves' are apart
        "eval_lm_queries": eval_lm,
        "curve_lm_queries": curve_lm,
        "policy": settings.policy,
        "wall_s": time.perf_counter() - t0,
    }
    return RunOutcome(_row(method, seed, res, extra), curve=trained.curve)


# -- hyper-parameter selection ----------------------------------------------------------------
def select_hyperparameters(
    cfg: OfflineSuiteConfig,
    out: Path,
    train_games: Sequence[str],
    settings: MethodSettings,
    *,
    log=print,
) -> dict:
    """Choose ``cql``'s and CQL-Prior's weights on the valid games (seed 0, greedy success,
    ties to the earlier grid point); resumable through ``out/selection.json``. A grid of one
    point is taken as it is, without training on the valid games (its score is None)."""
    path = out / "selection.json"
    sel: dict = {"grids": {}, "scores": {}, "chosen": {}}
    if path.is_file():
        import json

        sel = json.loads(path.read_text())
    valid = split_games(cfg, "valid", cfg.num_valid_games)
    families = {
        "cql": ("cql", cfg.cql_grid),
        "cql_prior": ("cql_prior_uncached", cfg.cql_prior_grid),
    }
    needed = {OFFLINE_METHODS[m].algorithm for m in cfg.methods}
    for family, (proxy, grid) in families.items():
        if family not in needed:
            continue
        grid_l = [dict(p) for p in grid]
        if sel["grids"].get(family) != grid_l:
            sel["grids"][family], sel["scores"][family] = grid_l, []
            sel["chosen"].pop(family, None)
        scores = sel["scores"][family]
        if len(grid_l) == 1:  # nothing to choose: no selection run
            sel["scores"][family] = [{"point": grid_l[0], "valid_success": None}]
            sel["chosen"][family] = grid_l[0]
            log(f"selection {family}: one candidate {grid_l[0]}, taken without a valid run")
            write_json(path, {**sel, "valid_games": len(valid)})
            continue
        for point in grid_l[len(scores) :]:
            learner = learner_settings(cfg, proxy, {family: point})
            trained = train_learner(cfg, proxy, 0, learner, train_games)
            player = player_for(proxy, learner, settings)
            try:
                res = player.play(cfg, valid, trained.module)
            finally:
                player.close()
            scores.append({"point": point, "valid_success": res.success_rate})
            log(f"selection {family} {point}: valid success {res.success_rate:.2f}")
            write_json(path, sel)
        best = max(range(len(scores)), key=lambda i: (scores[i]["valid_success"], -i))
        sel["chosen"][family] = scores[best]["point"]
        write_json(path, {**sel, "valid_games": len(valid)})
    return dict(sel["chosen"])


# -- aggregation ------------------------------------------------------------------------------
AVERAGED_KEYS = (
    "return_mean",
    "train_lm_queries",
    "eval_lm_queries",
    "curve_lm_queries",
    "annotation_hit_rate",
    "train_s",
    "updates",
    "updates_per_s",
    "time_to_target_s",
    "wall_s",
)


def normaliser(agg: dict[str, dict]) -> tuple[float, float] | None:
    """``(random, expert)`` success on the test games, None until both ran or when equal."""
    r, e = agg.get("random"), agg.get("expert")
    if not r or not e or e["success_mean"] == r["success_mean"]:
        return None
    return r["success_mean"], e["success_mean"]


def offline_comparisons(mats: dict, agg: dict, *, reps: int = rstats.DEFAULT_REPS) -> dict:
    """Paired comparisons: each CQL-Prior against the better of (``cql``, ``direct_lm``) and
    against ``cql``; the cached priors against the uncached one; ``cql`` against ``bc``."""
    pairs: list = []
    controls = [c for c in ("cql", "direct_lm") if mats.get(c) is not None]
    best = suite_layer.best_of(controls, mats, agg)
    priors = ("cql_prior_adaptive", "cql_prior_static", "cql_prior_uncached")
    if best is not None:
        pairs += [(m, best, f"{m} vs best of ({', '.join(controls)}) = {best}") for m in priors]
    pairs += [(m, "cql") for m in priors]
    pairs += [(m, "cql_prior_uncached") for m in ("cql_prior_adaptive", "cql_prior_static")]
    pairs.append(("cql", "bc"))
    return suite_layer.paired_comparisons(mats, pairs, reps=reps)


def aggregate(rows, methods, games, seeds, *, reps: int = rstats.DEFAULT_REPS) -> dict:
    """Per-method aggregates with normalised scores, and paired comparisons (their
    differences also in units of the expert-random gap)."""
    mats = suite_layer.success_matrices(rows, methods, games, seeds)
    agg = suite_layer.method_aggregates(rows, mats, methods, AVERAGED_KEYS, reps=reps)
    suite_layer.queries_relative_to(agg, "cql_prior_uncached")
    for m, a in agg.items():  # the annotation's audited reuse error (one annotation per preset)
        first = next(r for r in rows if r["method"] == m)
        audits, wrong = first.get("annotation_audits") or 0, first.get("annotation_audits_wrong")
        if audits and wrong is not None:
            lo, hi = rstats.wilson_interval(int(wrong), int(audits))
            a.update(audits=audits, audited_error=wrong / audits, audited_error_ci=[lo, hi])
    comps = offline_comparisons(mats, agg, reps=reps)
    norm = normaliser(agg)
    if norm is not None:
        lo, hi = norm
        for a in agg.values():
            a["normalised"] = (a["success_mean"] - lo) / (hi - lo)
            if a.get("success_ci95"):
                a["normalised_ci95"] = [(v - lo) / (hi - lo) for v in a["success_ci95"]]
        for c in comps.values():
            d = c["difference"]
            c["normalised_difference"] = {k: d[k] / (hi - lo) for k in ("value", "low", "high")}
    return {"methods": agg, "comparisons": comps, "normaliser": norm}


TABLE_COLUMNS = (
    ("method", "method"),
    ("seeds", "seeds"),
    ("success_mean", "success"),
    ("success_ci", "95% CI"),
    ("normalised", "normalised"),
    ("success_iqm", "IQM"),
    ("return_mean", "return"),
    ("train_lm_queries", "train LM queries"),
    ("train_lm_queries_vs_cql_prior_uncached", "vs uncached prior"),
    ("annotation_hit_rate", "hit rate"),
    ("audited_error", "served error (audited)"),
    ("eval_lm_queries", "eval LM queries"),
    ("train_s", "train s"),
    ("time_to_target_s", "s to target"),
    ("updates_per_s", "updates/s"),
)


def protocol_note(cfg: OfflineSuiteConfig, games, valid: int, card: dict | None) -> str:
    """The protocol sentence printed beside every table."""
    data = (
        f"{card['episodes']} episodes / {card['transitions']} transitions from "
        f"{card['games']} train games, behaviour success {card['behaviour_success']:.2f}"
        if card
        else "the dataset"
    )
    return (
        f"Offline `{cfg.env}-{cfg.dataset}`: learners trained on {data}; weights chosen on "
        f"{valid} `valid` games (seed 0); greedy play, one episode per game, on {len(games)} "
        f"unseen `test` games; {len(cfg.seeds)} seed(s), {cfg.train_iters} x "
        f"{cfg.learner.iters_per_train} updates of batch {cfg.learner.batch_size}. The prior "
        "was trained on expert demonstrations of the same train games, so part of what it "
        "adds is imitation. Normalised = (success - random) / (expert - random) on the test "
        f"games; target of 's to target': curve success >= {cfg.target_success} on the first "
        f"{min(cfg.curve_games, len(games))} test games. CIs: stratified bootstrap over "
        "(game, seed), rliable."
    )


def write_outputs(out: Path, cfg: OfflineSuiteConfig, games, chosen, cards) -> dict:
    """Summary, table and plots from the rows written so far."""
    from cachellm_rl.plots import plot_curves

    rows, curves = suite_layer.read_rows(out, cfg.seeds)
    names = [*REFERENCE_METHODS, *cfg.methods]
    methods = [m for m in names if any(r["method"] == m for r in rows)]
    result = aggregate(rows, methods, games, cfg.seeds)
    agg = result["methods"]
    valid = len(split_games(cfg, "valid", cfg.num_valid_games))
    note = protocol_note(cfg, games, valid, cards.get("none"))
    summary = {
        "env": cfg.env,
        "dataset": cfg.dataset,
        "protocol": "offline",
        "protocol_note": note,
        "games": list(short_game_names(list(games)).values()),
        "methods": agg,
        "comparisons": result["comparisons"],
        "normaliser": result["normaliser"],
        "chosen_hyperparameters": chosen,
        "datasets": {k: v for k, v in cards.items()},
        "runs": rows,
        "config": asdict(cfg),
    }
    write_json(out / "summary.json", summary)
    norm_rows = [
        f"| {k} | {v['normalised_difference']['value']:+.2f} | "
        f"{suite_layer.ci_text([v['normalised_difference']['low'], v['normalised_difference']['high']])} |"  # noqa: E501
        for k, v in result["comparisons"].items()
        if "normalised_difference" in v
    ]
    extra = ""
    if norm_rows:
        extra = (
            "\n| paired comparison | normalised difference | 95% CI |\n|---|---|---|\n"
            + "\n".join(norm_rows)
            + "\n"
        )
    extra += f"\nHyper-parameters chosen on the valid games: {chosen}\n"
    title = f"{cfg.env}-{cfg.dataset} (offline)"
    suite_layer.write_table(
        out, title, note, agg, TABLE_COLUMNS, result["comparisons"], extra=extra
    )
    if curves:
        refs = {
            f"{m} (test games)": agg[m]["success_mean"]
            for m in ("direct_lm", "random", "expert")
            if m in agg
        }
        plot_curves(
            curves,
            x="updates",
            y="curve_success",
            ylabel=f"greedy success, first {cfg.curve_games} test games",
            out=out / "learning_curves.png",
            title=f"{title}: greedy success during training",
            hlines=refs,
        )
    return summary


def run_offline_suite(
    cfg: OfflineSuiteConfig,
    out: Path,
    settings: MethodSettings | None = None,
    *,
    console: TextIO | None = None,
    log=print,
) -> dict:
    """Prepare the data, choose hyper-parameters, run every (method, seed) (resuming a
    stopped suite from ``out``) and write the results folder; returns the summary. Assumes Ray
    is initialised and the prior's Serve application is deployed.

    Args:
        cfg: The suite.
        out: Results folder.
        settings: Cache settings of the annotation presets and ``direct_lm`` (default
            :class:`MethodSettings`).
        console: Progress bar stream.
        log: Where one-line status messages go.
    """
    settings = settings or MethodSettings()
    out.mkdir(parents=True, exist_ok=True)
    games = split_games(cfg, "test", cfg.num_games)
    train_games = split_games(cfg, "train", 0)
    write_json(out / "config.json", {"suite": asdict(cfg), "games": games, "protocol": "offline"})
    cards = prepare_data(cfg, settings, console=console, log=log)
    chosen = select_hyperparameters(cfg, out, train_games, settings, log=log)
    methods = [*REFERENCE_METHODS.values(), *(OFFLINE_METHODS[m] for m in cfg.methods)]
    plan = suite_layer.planned_runs(methods, cfg.seeds)

    def run_one(method: str, seed: int, bar) -> RunOutcome:
        if method in REFERENCE_METHODS:
            return run_reference(cfg, method, seed, games)
        if method == "direct_lm":
            return run_direct_lm(cfg, settings, games)
        return run_learner(cfg, method, seed, chosen, cards, games, train_games, out, settings)

    return suite_layer.run_suite(
        out,
        plan,
        run_one,
        lambda _hists: write_outputs(out, cfg, games, chosen, cards),
        desc=f"{cfg.env}-{cfg.dataset} offline",
        progress=cfg.progress,
        console=console,
    )
