"""The shell shared by the game-file text envs (TextWorld, ALFWorld): game choice per episode,
the fixed-size observation and info of the current decision, masked-action no-ops, and config
parsing from RLlib's ``env_config``. Subclasses load games and turn game states into
:class:`~cachellm_rl.envs.text_env.TextDecision` s.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import gymnasium as gym
import numpy as np

from cachellm_rl.envs.games import SPLITS, split_games
from cachellm_rl.envs.text_env import (
    INFO_INVALID_ACTION,
    TextDecision,
    TextObsConfig,
    check_action,
    decision_info,
    encode_decision,
    text_observation_space,
)

GAME_ORDERS = ("random", "cycle")


class ClosableGame(Protocol):
    """What :class:`GameTextEnv` needs of a loaded game beyond what its subclass uses."""

    def close(self) -> None:
        """Release the game's resources."""


GameT = TypeVar("GameT", bound=ClosableGame)


def check_game_order(value: str, owner: str) -> None:
    """A ``ValueError`` naming ``owner`` when ``value`` is not a known game order."""
    if value not in GAME_ORDERS:
        raise ValueError(f"{owner}.game_order must be 'random' or 'cycle', got {value!r}")


def config_kwargs(cls, config: Mapping, env_name: str) -> dict:
    """Keyword arguments of config dataclass ``cls`` from a plain mapping (RLlib's
    ``env_config``): unknown keys are an error; ``obs``, ``games`` and ``drop_verbs`` are
    converted to their field types (an ``obs`` mapping overrides the env's default
    observation sizes, so ``{"mark_repeats": True}`` keeps the rest)."""
    known = {f.name: f for f in fields(cls)}
    extra = set(config) - set(known)
    if extra:
        raise ValueError(f"unknown {env_name} env_config keys: {sorted(extra)}")
    kw = dict(config)
    if isinstance(kw.get("obs"), Mapping):
        default = known["obs"].default_factory()  # type: ignore[misc,operator]
        unknown_obs = set(kw["obs"]) - {f.name for f in fields(TextObsConfig)}
        if unknown_obs:
            raise ValueError(f"unknown {env_name} env_config obs keys: {sorted(unknown_obs)}")
        kw["obs"] = replace(default, **kw["obs"])
    if "games" in kw:
        kw["games"] = tuple(str(g) for g in kw["games"])
    if "drop_verbs" in kw:
        kw["drop_verbs"] = tuple(kw["drop_verbs"])
    return kw


def kept_candidates(commands: Iterable[str], drop_verbs: tuple[str, ...]) -> tuple[str, ...]:
    """Admissible commands whose first word is not in ``drop_verbs`` (``("look",)`` when only
    dropped verbs apply).

    Example:
        >>> kept_candidates(["look", "take apple", "examine apple"], ("look", "examine"))
        ('take apple',)
    """
    cands = tuple(c for c in commands if c.split(" ", 1)[0] not in drop_verbs)
    return cands or ("look",)


@dataclass(frozen=True, kw_only=True)
class SuiteEnvConfig:
    """Settings shared by the envs that play the games of a generated suite (ALFWorld,
    BabyAI). Give ``games`` or ``games_dir``, not both. Subclasses add their own fields and set
    ``ENV_NAME`` (in errors) and ``SUITE`` (the ``games make --suite`` that makes them).

    Attributes:
        games: Game files the env draws from, one per episode.
        games_dir: A suite folder; the games of ``split`` are used.
        split: ``train``, ``valid`` or ``test`` (with ``games_dir``).
        obs: Sizes of the fixed-size observation.
        max_episode_steps: Step limit (``truncated`` after it).
        inventory_in_state: Put the inventory sentence in the state (else ``inventory`` is None).
        game_order: ``"random"`` (seeded draw per episode) or ``"cycle"`` (round robin).
        seed: Seed of the game draws (with the worker and vector index).
        expert: Run the env's expert (``info["expert_action"]``).
        strict_actions: Raise on a masked action; otherwise it is a no-op step (reward 0, state
            unchanged, ``info["invalid_action"] = True``).
    """

    ENV_NAME = "suite"
    SUITE = ""

    games: tuple[str, ...] = ()
    games_dir: str | None = None
    split: str = "train"
    obs: TextObsConfig = field(default_factory=TextObsConfig)
    max_episode_steps: int = 50
    inventory_in_state: bool = True
    game_order: str = "random"
    seed: int = 0
    expert: bool = True
    strict_actions: bool = False

    def __post_init__(self) -> None:
        name = type(self).__name__
        make = f"`cachellm-rl games make --suite {self.SUITE}`"
        if bool(self.games) == bool(self.games_dir):
            raise ValueError(
                f"{name} needs exactly one of `games` (game files) or `games_dir` (a suite "
                f"made by {make})"
            )
        if self.split not in SPLITS:
            raise ValueError(f"{name}.split must be one of {SPLITS}, got {self.split!r}")
        missing = [g for g in self.games if not Path(g).is_file()]
        if missing:
            raise ValueError(
                f"{name}.games: {len(missing)} game file(s) not found, e.g. {missing[0]} "
                f"(generate them with {make})"
            )
        if self.games_dir is not None and not Path(self.games_dir).is_dir():
            raise ValueError(f"{name}.games_dir {self.games_dir} is not a folder")
        if self.max_episode_steps < 1:
            raise ValueError(f"{name}.max_episode_steps must be >= 1")
        check_game_order(self.game_order, name)

    @classmethod
    def from_mapping(cls, config: Mapping):
        """Build from a plain mapping (RLlib's ``env_config``); unknown keys are an error."""
        kw = config_kwargs(cls, config, cls.ENV_NAME)
        if kw.get("games_dir") is not None:
            kw["games_dir"] = str(kw["games_dir"])
        return cls(**kw)

    @classmethod
    def parse(cls, config):
        """``config`` itself when it is one, else :meth:`from_mapping` of it."""
        if config is None:
            raise ValueError(f"the {cls.ENV_NAME} env needs a config with `games` or `games_dir`")
        return config if isinstance(config, cls) else cls.from_mapping(config)

    def to_mapping(self) -> dict:
        """Plain-dict form (for RLlib's ``env_config`` and result folders)."""
        return asdict(self)

    def split_games(self, games_dir: str, split: str) -> list[str]:
        """The games of ``split`` in ``games_dir`` (from its manifest)."""
        return split_games(games_dir, split)

    def game_files(self) -> tuple[str, ...]:
        """The games the env draws from."""
        if self.games:
            return self.games
        assert self.games_dir is not None
        return tuple(self.split_games(self.games_dir, self.split))


class GameTextEnv(gym.Env, Generic[GameT]):
    """Base of the text envs that play game files, one per episode.

    The subclass's config needs ``obs``, ``max_episode_steps``, ``game_order``, ``seed`` and
    ``strict_actions``; the subclass implements :meth:`_load_game`, which returns its game type
    ``GameT``.

    Args:
        cfg: The parsed config.
        games: Game files to draw from.
        source: What the env was built from; RLlib's ``EnvContext`` carries ``worker_index``
            and ``vector_index``, which seed a distinct game stream per sub-env.
    """

    metadata = {"render_modes": []}  # noqa: RUF012

    def __init__(self, cfg, games: tuple[str, ...], source) -> None:
        self.config = cfg
        self._games = tuple(games)
        self.observation_space = text_observation_space(cfg.obs)
        self.action_space = gym.spaces.Discrete(cfg.obs.max_actions)
        worker = int(getattr(source, "worker_index", 0))
        vector = int(getattr(source, "vector_index", 0))
        self._stream = (worker, vector)
        self._rng = np.random.default_rng([cfg.seed, worker, vector])
        self._first_game = (worker * 7 + vector) % len(self._games)
        self._next_game = self._first_game
        self._envs: dict[str, GameT] = {}
        self._env: GameT | None = None
        self._game = ""
        self._decision: TextDecision | None = None
        self._steps = 0
        self._obs: dict = {}
        self._last_info: dict = {}
        # (state text, command) -> times taken this episode (for ``obs.mark_repeats``)
        self._taken: Counter[tuple[str, str]] = Counter()

    @property
    def games(self) -> tuple[str, ...]:
        """The game files the env draws from."""
        return self._games

    @property
    def decision(self) -> TextDecision | None:
        """Texts of the current decision."""
        return self._decision

    # -- game handling ------------------------------------------------------------------------
    def _load_game(self, game: str) -> GameT:
        """Open one game (called once per game file; the result is kept)."""
        raise NotImplementedError

    def _start(self, game: str) -> GameT:
        if game not in self._envs:
            self._envs[game] = self._load_game(game)
        return self._envs[game]

    def _pick_game(self) -> str:
        games = self._games
        if self.config.game_order == "cycle":
            g = games[self._next_game % len(games)]
            self._next_game += 1
            return g
        return games[int(self._rng.integers(len(games)))]

    @property
    def _open_env(self) -> GameT:
        """The game of the current episode (a ``RuntimeError`` before :meth:`reset`)."""
        if self._env is None:
            raise RuntimeError("call reset() before step()")
        return self._env

    def _begin_episode(self, seed: int | None, options: dict | None) -> None:
        """Reseed (when ``seed`` is given), choose the game and open it."""
        super().reset(seed=seed)
        if seed is not None:
            self._rng = np.random.default_rng([seed, *self._stream])
            self._next_game = self._first_game
        game = (options or {}).get("game") or self._pick_game()
        self._game = str(game)
        self._env = self._start(self._game)
        self._steps = 0
        self._taken.clear()

    # -- observation and info -----------------------------------------------------------------
    def _encode(self, extra: Mapping) -> dict:
        """Encode the current decision into ``self._obs`` and return its info with ``extra``.

        From here on the decision holds only the candidates the observation has slots for.
        """
        assert self._decision is not None
        repeats = None
        if self.config.obs.mark_repeats:
            key = self._decision.state_text()
            repeats = [self._taken[(key, c)] for c in self._decision.candidates]
        obs, cut = encode_decision(self._decision, self.config.obs, repeats)
        self._obs = obs
        self._decision = replace(
            self._decision, candidates=self._decision.candidates[: self.config.obs.max_actions]
        )
        info = decision_info(self._decision, self.config.obs)
        info.update(cut)
        info.update(extra)
        info[INFO_INVALID_ACTION] = False
        self._last_info = info
        return info

    # -- stepping -----------------------------------------------------------------------------
    def _command(self, action) -> str | None:
        """The command of ``action`` (None: a masked action, a counted no-op); counts the step."""
        if self._env is None or self._decision is None:
            raise RuntimeError("call reset() before step()")
        command = check_action(action, self._decision.candidates, strict=self.config.strict_actions)
        self._steps += 1
        if command is not None and self.config.obs.mark_repeats:
            self._taken[(self._decision.state_text(), command)] += 1
        return command

    def _noop_step(self):
        """The step result of a masked action: same state, reward 0, ``invalid_action``."""
        info = {**self._last_info, INFO_INVALID_ACTION: True}
        truncated = self._steps >= self.config.max_episode_steps
        return self._obs, 0.0, False, truncated, info

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()
