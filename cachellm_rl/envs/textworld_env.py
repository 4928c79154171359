"""TextWorld games (tw-cooking) as gymnasium environments with the text contract of
:mod:`cachellm_rl.envs.text_env`.

Design choices (see docs/envs.md):
- Candidates are the game's admissible commands minus the verbs in ``drop_verbs`` (by default
  ``examine``, ``look`` and ``inventory``: they never change the game state, and the inventory is
  in every observation anyway).
- The recipe the cookbook would show is appended to the objective (``recipe_in_objective``), so
  a state says what to cook without a memory of an earlier ``examine cookbook``.
- Reward is the score gain of the step; ``terminated`` when the game is won or lost;
  ``truncated`` at ``max_episode_steps``.
- The expert action of each state is the game's own walkthrough from that state
  (``policy_commands``), also after the agent has strayed, which gives expert recoveries.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cachellm_rl.envs.game_env import (
    GameTextEnv,
    check_game_order,
    config_kwargs,
    kept_candidates,
)
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

_TITLE_RE = re.compile(r"-=\s*(.*?)\s*=-")
_PROMPT_RE = re.compile(r"\s*>\s*$")
# The interpreter's status line, printed after the prompt at the end of every step's feedback:
# ``>   -= Kitchen =-1/3`` (room, then score/moves).
_STATUS_RE = re.compile(r"(?:\s*>)?\s*-=[^=\n]*=-\s*-?\d+/\d+\s*$")


def clean_text(text: str) -> str:
    """Collapse whitespace, turn ``-= Kitchen =-`` into ``[Kitchen]``, drop the ``>`` prompt and
    the status line that ends a step's feedback (room and score/moves).

    The move counter of the status line would make the same state reached at another move a
    different text: a different cache key and LM prompt for an unchanged game state.

    Example:
        >>> clean_text("-= Kitchen =-\\nYou are in a kitchen.\\n\\n>")
        '[Kitchen] You are in a kitchen.'
        >>> clean_text("\\nYou open the fridge.\\n\\n>          -= Kitchen =-0/2")
        'You open the fridge.'
    """
    text = _STATUS_RE.sub("", text)
    text = _TITLE_RE.sub(r"[\1]", text)
    text = _PROMPT_RE.sub("", text)
    return " ".join(text.split())


def recipe_text(recipe: str) -> str:
    """One-line form of a tw-cooking recipe (ingredients and directions).

    Example:
        >>> recipe_text("Recipe #1\\n---\\nGather...\\n\\nIngredients:\\napple\\n\\n"
        ...             "Directions:\\nslice the apple\\n  prepare meal\\n")
        'Recipe: ingredients: apple. directions: slice the apple, prepare meal.'
    """
    lines = [ln.strip() for ln in recipe.splitlines()]
    try:
        i_ing, i_dir = lines.index("Ingredients:"), lines.index("Directions:")
    except ValueError:
        return "Recipe: " + " ".join(ln for ln in lines if ln)
    ingredients = [ln for ln in lines[i_ing + 1 : i_dir] if ln]
    directions = [ln for ln in lines[i_dir + 1 :] if ln]
    return f"Recipe: ingredients: {', '.join(ingredients)}. directions: {', '.join(directions)}."


@dataclass(frozen=True, kw_only=True)
class TextWorldEnvConfig:
    """Settings of :class:`TextWorldEnv`.

    Attributes:
        games: Game files (``.z8``/``.ulx``) the env draws from; one per episode.
        obs: Sizes of the fixed-size observation.
        max_episode_steps: Step limit (``truncated`` after it).
        drop_verbs: Admissible commands starting with one of these words are not candidates.
        recipe_in_objective: Append the game's recipe to the objective.
        game_order: ``"random"`` (seeded draw per episode) or ``"cycle"`` (round robin).
        seed: Seed of the game draws (combined with the env's worker and vector index).
        expert: Ask the game for its walkthrough from each state (``info["expert_action"]``).
        strict_actions: Raise on a masked action; otherwise it is a no-op step (reward 0, state
            unchanged, ``info["invalid_action"] = True``, counted in the metrics).
    """

    games: tuple[str, ...]
    obs: TextObsConfig = field(default_factory=TextObsConfig)
    max_episode_steps: int = 50
    drop_verbs: tuple[str, ...] = ("examine", "look", "inventory")
    recipe_in_objective: bool = True
    game_order: str = "random"
    seed: int = 0
    expert: bool = True
    strict_actions: bool = False

    def __post_init__(self) -> None:
        if not self.games:
            raise ValueError("TextWorldEnvConfig.games is empty: give at least one game file")
        missing = [g for g in self.games if not Path(g).is_file()]
        if missing:
            raise ValueError(
                f"TextWorldEnvConfig.games: {len(missing)} game file(s) not found, e.g. "
                f"{missing[0]} (generate them with `cachellm-rl games make`)"
            )
        if self.max_episode_steps < 1:
            raise ValueError("TextWorldEnvConfig.max_episode_steps must be >= 1")
        check_game_order(self.game_order, "TextWorldEnvConfig")

    @classmethod
    def from_mapping(cls, config: Mapping) -> TextWorldEnvConfig:
        """Build from a plain mapping (RLlib's ``env_config``); unknown keys are an error."""
        kw = config_kwargs(cls, config, "TextWorld")
        return cls(**kw)

    def to_mapping(self) -> dict:
        """Plain-dict form (for RLlib's ``env_config`` and result folders)."""
        return asdict(self)


class TextWorldEnv(GameTextEnv[Any]):  # TextWorld's envs are untyped
    """A TextWorld game as ``Dict(state_tokens, action_tokens, action_mask)`` observations and
    ``Discrete(max_actions)`` actions (index into ``info["candidates"]``).

    Args:
        config: A :class:`TextWorldEnvConfig` or a mapping of its fields. RLlib's ``EnvContext``
            (a dict with ``worker_index``/``vector_index`` attributes) also works.
    """

    def __init__(self, config: TextWorldEnvConfig | Mapping | None = None) -> None:
        if config is None:
            raise ValueError("TextWorldEnv needs a config with at least `games`")
        cfg = (
            config
            if isinstance(config, TextWorldEnvConfig)
            else TextWorldEnvConfig.from_mapping(config)
        )
        super().__init__(cfg, cfg.games, config)
        self._recipes: dict[str, str] = {}
        self._state = None
        self._last_score = 0

    # -- game handling ------------------------------------------------------------------------
    def _load_game(self, game: str):
        import textworld

        infos = textworld.EnvInfos(
            admissible_commands=True,
            policy_commands=self.config.expert,
            objective=True,
            inventory=True,
            description=True,
            won=True,
            lost=True,
            score=True,
            max_score=True,
        )
        self._recipes[game] = _read_recipe(game)
        return textworld.start(game, request_infos=infos)

    def _decide(self, gs, feedback: str | None) -> TextDecision:
        description = clean_text(gs.description or "")
        if feedback is None:
            observation = description
        else:
            fb = clean_text(feedback)
            observation = fb if description in fb else f"{fb} {description}".strip()
        objective = clean_text(gs.objective or "")
        recipe = self._recipes.get(self._game, "")
        if self.config.recipe_in_objective and recipe:
            objective = f"{objective} {recipe}"
        cands = kept_candidates(gs.admissible_commands or [], self.config.drop_verbs)
        return TextDecision(
            objective=objective,
            observation=observation,
            inventory=clean_text(gs.inventory or ""),
            candidates=cands,
        )

    def _info(self, gs) -> dict:
        expert = None
        if self.config.expert and gs.policy_commands:
            expert = gs.policy_commands[0]
        return self._encode(
            {
                INFO_WON: bool(gs.won),
                INFO_LOST: bool(gs.lost),
                INFO_SCORE: int(gs.score or 0),
                INFO_MAX_SCORE: int(gs.max_score or 0),
                INFO_GAME: Path(self._game).name,
                INFO_EXPERT_ACTION: expert,
            }
        )

    # -- gym API ------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start an episode; ``options={"game": path}`` plays a given game."""
        self._begin_episode(seed, options)
        gs = self._open_env.reset()
        self._last_score = int(gs.score or 0)
        self._state = gs
        self._decision = self._decide(gs, None)
        info = self._info(gs)
        return self._obs, info

    def step(self, action):
        command = self._command(action)
        if command is None:
            return self._noop_step()
        gs, _, done = self._open_env.step(command)
        score = int(gs.score or 0)
        reward = float(score - self._last_score)
        self._last_score = score
        self._state = gs
        self._decision = self._decide(gs, gs.feedback)
        info = self._info(gs)
        terminated = bool(gs.won or gs.lost or done)
        truncated = not terminated and self._steps >= self.config.max_episode_steps
        return self._obs, reward, terminated, truncated, info


def _read_recipe(game: str) -> str:
    meta = Path(game).with_suffix(".json")
    if not meta.is_file():
        return ""
    try:
        recipe = json.loads(meta.read_text()).get("metadata", {}).get("recipe", "")
    except (OSError, json.JSONDecodeError):
        return ""
    return recipe_text(recipe) if recipe else ""
