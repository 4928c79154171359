"""BabyAI-Text: minigrid's BabyAI levels as text games with the contract of
:mod:`cachellm_rl.envs.text_env`, and a seeded suite of bot-solved games.

A *game* is a BabyAI level id plus a reset seed (a small JSON file), so a suite has fixed,
reproducible train / valid / test splits like the game-file suites: ``cachellm-rl games make
--suite babyai`` writes ``<split>/<level>-<i>-s<seed>.json`` and keeps only games minigrid's
BabyAI bot solves. Splits share the levels and differ by seed (layouts, objects, missions).

Design choices:
- The objective is the mission (``pick up the purple ball``). The observation describes the
  agent's 7x7 egocentric view, relative to the agent: every visible object and door
  (``You see a red ball 2 steps left and 1 step forward``), nearest first, and only the nearest
  wall straight ahead, to the left and to the right (walls make long, uninformative lists
  otherwise), then the objects the mission names that were seen earlier and are now out of
  view (``You remember a red ball 3 steps behind``). ``inventory`` is what the agent carries.
- Candidates are the primitive actions as text, in minigrid's order (``turn left``,
  ``turn right``, ``go forward``, ``pick up``, ``drop``, ``toggle``), keeping only those that
  would change the state (as the game-file envs offer admissible commands only): no
  ``go forward`` into a wall, no ``pick up`` with nothing in front. ``done`` is not offered:
  it does nothing in BabyAI.
- Reward is minigrid's: ``1 - 0.9 * steps / level_max_steps`` on success, 0 otherwise;
  ``terminated`` on success (or a failed mission); ``truncated`` at ``max_episode_steps`` or at
  the level's own step limit.
- The expert is minigrid's ``BabyAIBot``, built at reset and told every action the agent
  actually takes, so it also recovers after the agent strays. It cannot solve every level
  (``PutNextS*Carrying``, ``KeyInBox``); when it fails the expert action is None.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from cachellm_rl.envs.game_env import GameTextEnv, SuiteEnvConfig
from cachellm_rl.envs.games import SPLITS, derive_game_seed, write_manifest
from cachellm_rl.envs.text_env import (
    INFO_EXPERT_ACTION,
    INFO_GAME,
    INFO_LOST,
    INFO_MAX_SCORE,
    INFO_SCORE,
    INFO_WON,
    TextDecision,
    TextObsConfig,
)

if TYPE_CHECKING:
    from minigrid.core.world_object import WorldObj

SUITE = "babyai"
# Candidate i is minigrid action i (Actions.left ... Actions.toggle; ``done`` is left out).
ACTION_TEXTS = ("turn left", "turn right", "go forward", "pick up", "drop", "toggle")
DEFAULT_LEVELS = (
    "BabyAI-GoToLocal-v0",
    "BabyAI-PickupLoc-v0",
    "BabyAI-PutNextLocal-v0",
    "BabyAI-OpenDoorLoc-v0",
)
# BabyAI-specific info key (the others are the shared ``text_env.INFO_*``).
INFO_LEVEL = "level"

_VIEW = 7  # minigrid's default agent_view_size; the agent sits at (3, 6) facing "up"
_HIDDEN = ("unseen", "empty", "floor", "agent")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n > 1 else ''}"


def relative_position(side: int, forward: int) -> str:
    """``side`` cells to the right (negative: left) and ``forward`` cells ahead (negative:
    behind), as text.

    Example:
        >>> relative_position(-2, 1)
        '2 steps left and 1 step forward'
        >>> relative_position(0, -3)
        '3 steps behind'
    """
    parts = []
    if side:
        parts.append(f"{_plural(abs(side), 'step')} {'right' if side > 0 else 'left'}")
    if forward:
        parts.append(f"{_plural(abs(forward), 'step')} {'forward' if forward > 0 else 'behind'}")
    return " and ".join(parts) or "here"


_MEMORABLE = ("key", "ball", "box", "door")


def object_text(obj) -> str:
    """``"red ball"``, ``"locked blue door"``: a minigrid object as the view describes it."""
    if obj.type == "door":
        state = "open" if obj.is_open else ("locked" if obj.is_locked else "closed")
        return f"{state} {obj.color} door"
    return f"{obj.color} {obj.type}"


class ObjectMemory:
    """Where the agent has seen objects and doors this episode, for what is out of view now.

    The text observation describes one egocentric view; without a memory, an agent that turns
    away from its target forgets it. The memory keeps each object seen (by identity, so a
    moved object is remembered where it now is) and describes those out of view that the
    mission names, relative to the agent's current pose.
    """

    def __init__(self) -> None:
        self._seen: dict[int, WorldObj] = {}

    def reset(self) -> None:
        self._seen.clear()

    def observe(self, env, image: np.ndarray) -> set[int]:
        """Record the objects in view (``image``: minigrid's ``obs["image"]``); their ids."""
        ax, ay = _VIEW // 2, _VIEW - 1
        pos, fwd_vec, right_vec = np.asarray(env.agent_pos), env.dir_vec, env.right_vec
        in_view = set()
        for x, y in zip(*np.nonzero(np.isin(image[:, :, 0], self._object_ids())), strict=True):
            cell = pos + (ay - y) * fwd_vec + (x - ax) * right_vec
            obj = env.grid.get(int(cell[0]), int(cell[1]))
            if obj is not None and obj.type in _MEMORABLE:
                self._seen[id(obj)] = obj
                in_view.add(id(obj))
        return in_view

    @staticmethod
    def _object_ids() -> list[int]:
        from minigrid.core.constants import OBJECT_TO_IDX

        return [OBJECT_TO_IDX[t] for t in _MEMORABLE]

    def describe(self, env, in_view: set[int], mission: str) -> str:
        """Sentences for the remembered objects out of view that ``mission`` may be about
        (its object types, and its colours when it names any), nearest first, or ``""``."""
        named = names_in_mission(mission)
        pos, fwd_vec, right_vec = np.asarray(env.agent_pos), env.dir_vec, env.right_vec
        found = []
        for key, obj in self._seen.items():
            if key in in_view or not named(obj.type, obj.color) or obj.cur_pos is None:
                continue
            x, y = (int(v) for v in obj.cur_pos)
            inside = 0 <= x < env.grid.width and 0 <= y < env.grid.height
            if not inside or env.grid.get(x, y) is not obj:  # carried, or an opened box
                continue
            rel = np.array([x, y]) - pos
            fwd, side = int(rel @ fwd_vec), int(rel @ right_vec)
            where = relative_position(side, fwd)
            found.append((abs(side) + abs(fwd), f"You remember a {object_text(obj)} {where}."))
        return " ".join(t for _, t in sorted(found))


def names_in_mission(mission: str):
    """A test ``(kind, colour) -> bool``: whether ``mission`` may be about such an object
    (it names the kind, and the colour when it names any colour).

    Example:
        >>> named = names_in_mission("put the purple key next to the red ball")
        >>> named("key", "purple"), named("ball", "purple"), named("box", "red")
        (True, True, False)
    """
    from minigrid.core.constants import COLOR_NAMES

    words = set(mission.replace(",", " ").split())
    colours = words & set(COLOR_NAMES)
    return lambda kind, colour: kind in words and (not colours or colour in colours)


def describe_view(image: np.ndarray, mission: str = "") -> str:
    """The text of the agent's egocentric view (minigrid's ``obs["image"]``).

    Args:
        image: ``(7, 7, 3)`` array indexed ``[x, y]`` of (object, colour, state) indices.
        mission: The mission; objects it names (:func:`names_in_mission`) are listed first.

    Returns:
        One sentence per visible object or door (those the mission names first, then nearest
        first) and per nearest wall straight ahead / left / right.

    Raises:
        ValueError: When ``image`` is not a 7x7x3 view.

    Example:
        >>> from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX
        >>> img = np.zeros((7, 7, 3), np.uint8)
        >>> img[1, 5] = (OBJECT_TO_IDX["ball"], COLOR_TO_IDX["red"], 0)
        >>> img[3, 2] = (OBJECT_TO_IDX["wall"], COLOR_TO_IDX["grey"], 0)
        >>> describe_view(img)
        'You see a red ball 2 steps left and 1 step forward. You see a wall 4 steps forward.'
    """
    from minigrid.core.constants import IDX_TO_COLOR, IDX_TO_OBJECT, STATE_TO_IDX

    if image.shape != (_VIEW, _VIEW, 3):
        raise ValueError(f"expected a ({_VIEW}, {_VIEW}, 3) view, got shape {image.shape}")
    idx_to_state = {v: k for k, v in STATE_TO_IDX.items()}
    named = names_in_mission(mission)
    ax, ay = _VIEW // 2, _VIEW - 1
    things: list[tuple[bool, int, int, str]] = []
    walls: dict[str, tuple[int, str]] = {}
    for x in range(_VIEW):
        for y in range(_VIEW):
            t, c, s = (int(v) for v in image[x, y])
            name = IDX_TO_OBJECT.get(t, "unseen")
            if name in _HIDDEN or (x, y) == (ax, ay):
                continue
            side, fwd = x - ax, ay - y
            where = relative_position(side, fwd)
            if name == "wall":
                line = "forward" if side == 0 else ("left" if side < 0 else "right")
                dist = abs(side) + fwd
                if (side == 0 or fwd == 0) and (line not in walls or dist < walls[line][0]):
                    walls[line] = (dist, f"You see a wall {where}.")
                continue
            desc = f"{IDX_TO_COLOR[c]} {name}"
            if name == "door":
                desc = f"{idx_to_state[s]} {desc}"
            first = not named(name, IDX_TO_COLOR[c])
            things.append((first, abs(side) + fwd, x * _VIEW + y, f"You see a {desc} {where}."))
    lines = [t[3] for t in sorted(things)]
    lines += [walls[k][1] for k in ("forward", "left", "right") if k in walls]
    return " ".join(lines) if lines else "You see nothing special."


def admissible_actions(env) -> tuple[str, ...]:
    """The primitive actions that can change the state of minigrid env ``env`` now, in
    :data:`ACTION_TEXTS` order: turning always; ``go forward`` onto a free or open cell;
    ``pick up`` an object in front with empty hands; ``drop`` onto a free cell in front;
    ``toggle`` a door or box in front. The others would be no-ops, which the game-file envs
    never offer either (their candidates are the admissible commands).
    """
    front = env.grid.get(*env.front_pos)
    ok = {
        "turn left": True,
        "turn right": True,
        "go forward": front is None or front.can_overlap(),
        "pick up": env.carrying is None and front is not None and front.can_pickup(),
        "drop": env.carrying is not None and front is None,
        "toggle": front is not None and front.type in ("door", "box"),
    }
    return tuple(a for a in ACTION_TEXTS if ok[a])


def carrying_text(carrying) -> str:
    """The inventory sentence of minigrid's ``carrying`` object (None: nothing)."""
    if carrying is None:
        return "You are not carrying anything."
    return f"You are carrying a {carrying.color} {carrying.type}."


def check_level(level: str) -> str:
    """``level`` if it is a registered BabyAI level id, else a ValueError with examples."""
    import gymnasium as gym
    import minigrid  # noqa: F401  (registers the BabyAI-* ids)

    if not level.startswith("BabyAI-") or level not in gym.registry:
        known = sorted(k for k in gym.registry if k.startswith("BabyAI-"))
        raise ValueError(f"unknown BabyAI level {level!r}; e.g. {known[:6]} ({len(known)} known)")
    return level


def read_game(path: str | Path) -> dict:
    """The ``{"level", "seed", ...}`` record of a BabyAI game file, checked."""
    try:
        game = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read BabyAI game file {path}: {e}") from e
    if not isinstance(game, dict) or "level" not in game or "seed" not in game:
        raise ValueError(f"BabyAI game file {path} needs 'level' and 'seed' keys")
    return game


class BabyAIGame:
    """One BabyAI level at one seed: a minigrid env that resets to the same layout."""

    def __init__(self, level: str, seed: int) -> None:
        import gymnasium as gym

        self.level = check_level(level)
        self.seed = int(seed)
        self.env = gym.make(level)

    def reset(self) -> dict:
        """Reset to the game's layout (minigrid's rejection-sampling chatter is silenced)."""
        with contextlib.redirect_stdout(io.StringIO()):
            obs, _ = self.env.reset(seed=self.seed)
        return obs

    @property
    def unwrapped(self):
        """The minigrid env (``carrying``, ``max_steps``, ``step_count`` ...)."""
        return self.env.unwrapped

    def close(self) -> None:
        self.env.close()


class BabyAIExpert:
    """minigrid's ``BabyAIBot`` for one episode; told the action the agent actually took."""

    def __init__(self, game: BabyAIGame) -> None:
        from minigrid.utils.baby_ai_bot import BabyAIBot, DisappearedBoxError

        self._bot = BabyAIBot(game.env)
        self._dead_ends = (DisappearedBoxError, AssertionError, TypeError, ValueError, IndexError)
        self.failed = False

    def act(self, action_taken: int | None) -> int | None:
        """The bot's next action index (None once it has failed, or when it says ``done``)."""
        if self.failed:
            return None
        try:
            a = int(self._bot.replan(action_taken))
        except self._dead_ends:  # e.g. the agent opened a box the bot needed
            self.failed = True
            return None
        return a if a < len(ACTION_TEXTS) else None


@dataclass(frozen=True, kw_only=True)
class BabyAIEnvConfig(SuiteEnvConfig):
    """Settings of :class:`BabyAIEnv`: the fields of
    :class:`~cachellm_rl.envs.game_env.SuiteEnvConfig`, over BabyAI game files
    (``{"level", "seed"}`` JSON). ``max_episode_steps`` also ends at the level's own limit;
    ``expert`` runs the BabyAI bot; ``obs.max_actions`` must hold the six primitive actions.

    Attributes:
        memory_in_state: Append the objects and doors seen earlier this episode and now out
            of view, relative to the agent (see :class:`ObjectMemory`).
        admissible_only: Candidates are the actions that would change the state
            (:func:`admissible_actions`); False offers all six every step.
    """

    ENV_NAME = "BabyAI"
    SUITE = "babyai"

    obs: TextObsConfig = field(
        default_factory=lambda: TextObsConfig(max_state_tokens=256, max_actions=8)
    )
    max_episode_steps: int = 64
    memory_in_state: bool = True
    admissible_only: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.obs.max_actions < len(ACTION_TEXTS):
            raise ValueError(
                f"BabyAIEnvConfig.obs.max_actions must be >= {len(ACTION_TEXTS)} (the primitive "
                f"actions), got {self.obs.max_actions}"
            )


class BabyAIEnv(GameTextEnv[BabyAIGame]):
    """A BabyAI level as ``Dict(state_tokens, action_tokens, action_mask)`` observations and
    ``Discrete(max_actions)`` actions (index into ``info["candidates"]``).

    Args:
        config: A :class:`BabyAIEnvConfig` or a mapping of its fields (RLlib's ``EnvContext``
            also works).
    """

    def __init__(self, config: BabyAIEnvConfig | Mapping | None = None) -> None:
        cfg = BabyAIEnvConfig.parse(config)
        super().__init__(cfg, cfg.game_files(), config)
        self._mission = ""
        self._memory = ObjectMemory()
        self._expert: BabyAIExpert | None = None
        self._expert_action: str | None = None

    def _load_game(self, game: str) -> BabyAIGame:
        record = read_game(game)
        return BabyAIGame(record["level"], record["seed"])

    def _decide(self, obs: Mapping) -> TextDecision:
        env = self._open_env.unwrapped
        observation = describe_view(obs["image"], str(obs["mission"]))
        if self.config.memory_in_state:
            in_view = self._memory.observe(env, obs["image"])
            remembered = self._memory.describe(env, in_view, str(obs["mission"]))
            observation = f"{observation} {remembered}" if remembered else observation
        carrying = env.carrying
        return TextDecision(
            objective=self._mission,
            observation=observation,
            inventory=carrying_text(carrying) if self.config.inventory_in_state else None,
            candidates=admissible_actions(env) if self.config.admissible_only else ACTION_TEXTS,
        )

    def _info(self, won: bool, lost: bool) -> dict:
        return self._encode(
            {
                INFO_WON: won,
                INFO_LOST: lost,
                INFO_SCORE: int(won),
                INFO_MAX_SCORE: 1,
                INFO_GAME: Path(self._game).stem,
                INFO_LEVEL: self._open_env.level,
                INFO_EXPERT_ACTION: self._expert_action,
            }
        )

    def _update_expert(self, action_taken: int | None) -> None:
        a = None if self._expert is None else self._expert.act(action_taken)
        text = None if a is None else ACTION_TEXTS[a]
        # The bot never wastes a step, so its action is a candidate; None if it ever is not.
        assert self._decision is not None
        self._expert_action = text if text in self._decision.candidates else None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start an episode; ``options={"game": path}`` plays a given game."""
        self._begin_episode(seed, options)
        obs = self._open_env.reset()
        self._memory.reset()
        self._mission = str(obs["mission"])
        self._decision = self._decide(obs)
        self._expert = BabyAIExpert(self._open_env) if self.config.expert else None
        self._update_expert(None)
        info = self._info(False, False)
        return self._obs, info

    def step(self, action):
        command = self._command(action)
        if command is None:
            return self._noop_step()
        a = ACTION_TEXTS.index(command)
        obs, reward, term, trunc, _ = self._open_env.env.step(a)
        won = bool(term and reward > 0)
        self._decision = self._decide(obs)
        self._expert_action = None
        if not (term or trunc):
            self._update_expert(a)
        info = self._info(won, bool(term and not won))
        truncated = not term and (trunc or self._steps >= self.config.max_episode_steps)
        return self._obs, float(reward), bool(term), truncated, info


# -- the suite --------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class BabyAISuiteConfig:
    """A BabyAI-Text suite: how many games per split, of which levels, from which seed.

    Attributes:
        n_train: Games in the train split (the prior learns from these only). Bot-solved
            games cost milliseconds, and the prior needs many layouts to generalise.
        n_valid: Games in the valid split.
        n_test: Games in the test split.
        levels: BabyAI level ids, used in turn.
        max_bot_steps: A game is kept only when the bot solves it within this many steps.
        max_attempts: Seeds tried per game before giving up.
        seed: Base seed; game ``i`` of a split starts from a seed derived from (seed, split, i).
    """

    n_train: int = 400
    n_valid: int = 30
    n_test: int = 30
    levels: tuple[str, ...] = DEFAULT_LEVELS
    max_bot_steps: int = 64
    max_attempts: int = 20
    seed: int = 1234

    def __post_init__(self) -> None:
        for name in ("n_train", "n_valid", "n_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"BabyAISuiteConfig.{name} must be >= 0")
        if not self.levels:
            raise ValueError("BabyAISuiteConfig.levels is empty")
        for level in self.levels:
            check_level(level)
        if self.max_bot_steps < 1 or self.max_attempts < 1:
            raise ValueError("BabyAISuiteConfig.max_bot_steps and max_attempts must be >= 1")

    def count(self, split: str) -> int:
        """Games in ``split``."""
        return {"train": self.n_train, "valid": self.n_valid, "test": self.n_test}[split]

    def game_seed(self, split: str, index: int) -> int:
        """First seed tried for game ``index`` of ``split``."""
        return derive_game_seed(self.seed, split, index)


def bot_solves(level: str, seed: int, max_steps: int) -> tuple[bool, int, str]:
    """Whether the BabyAI bot solves ``level`` at ``seed`` within ``max_steps``.

    Returns:
        ``(solved, steps, mission)``.
    """
    game = BabyAIGame(level, seed)
    try:
        obs = game.reset()
        expert = BabyAIExpert(game)
        a, steps = expert.act(None), 0
        while a is not None and steps < max_steps:
            _, reward, term, trunc, _ = game.env.step(a)
            steps += 1
            if term or trunc:
                return bool(term and float(reward) > 0), steps, str(obs["mission"])
            a = expert.act(a)
        return False, steps, str(obs["mission"])
    finally:
        game.close()


def make_babyai_suite(
    config: BabyAISuiteConfig, out_dir: str | Path, *, progress: bool = True
) -> dict:
    """Write the suite's game files (keeping those already there) and the manifest.

    Each game is the first seed from its derived seed on (at most ``max_attempts``) whose
    layout the bot solves within ``max_bot_steps``.

    Args:
        config: What to generate.
        out_dir: Suite folder (``<out_dir>/<split>/<level>-<i>-s<seed>.json``).
        progress: Show a progress bar.

    Returns:
        The manifest dict (also written to ``<out_dir>/manifest.json``) plus ``generated``.

    Raises:
        RuntimeError: When no seed of a game's ``max_attempts`` is solved by the bot.
    """
    root = Path(out_dir)
    jobs = [
        (split, i, config.levels[i % len(config.levels)], config.game_seed(split, i))
        for split in SPLITS
        for i in range(config.count(split))
    ]
    entries, made = [], 0
    for split, i, level, base in tqdm(jobs, desc="games babyai", disable=not progress):
        stem = f"{split}/{level.removeprefix('BabyAI-').removesuffix('-v0')}-{i:03d}-s{base}"
        path = root / f"{stem}.json"
        if path.is_file():
            record = read_game(path)
        else:
            t0 = time.perf_counter()
            for k in range(config.max_attempts):
                solved, steps, mission = bot_solves(level, base + k, config.max_bot_steps)
                if solved:
                    break
            else:
                raise RuntimeError(
                    f"the BabyAI bot solved no seed of {level} in {base}..."
                    f"{base + config.max_attempts - 1} within {config.max_bot_steps} steps"
                )
            record = {
                "level": level,
                "seed": base + k,
                "mission": mission,
                "bot_steps": steps,
                "generation_seconds": round(time.perf_counter() - t0, 3),
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=1))
            made += 1
        entries.append({"split": split, "index": i, "file": f"{stem}.json", **record})
    manifest: dict[str, Any] = {"suite": SUITE, "config": asdict(config), "games": entries}
    write_manifest(root, manifest)
    manifest["generated"] = made
    return manifest
