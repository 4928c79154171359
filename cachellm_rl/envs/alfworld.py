"""ALFWorld (text, TextWorld PDDL engine) games as gymnasium environments with the text contract
of :mod:`cachellm_rl.envs.text_env`.

Games come from two places (``AlfWorldEnvConfig``):
- a suite written by :mod:`cachellm_rl.envs.alfworld_gen` (``cachellm-rl games make --suite
  alfworld-gen``): ``games_dir`` holds a ``manifest.json`` with train / valid / test splits;
- the official ALFWorld data (``alfworld-download``): ``games_dir`` is ``$ALFWORLD_DATA`` or its
  ``json_2.1.1`` folder. Splits map ``train`` -> ``train``, ``valid`` -> ``valid_seen`` and
  ``test`` -> ``valid_unseen``; games are the ``game.tw-pddl`` files marked ``solvable`` next to
  a ``traj_data.json``, without the ``movable``/``Sliced`` ones (the rule of ALFWorld's own
  ``AlfredTWEnv``). This path is untested here (the data is not downloadable in CI).

Design choices:
- The objective is the task sentence of the intro (``put some apple on fridge``); the intro's
  banner and task line are removed from the first observation.
- Candidates are the admissible commands minus the verbs in ``drop_verbs`` (by default ``look``,
  ``inventory``, ``examine`` and ``help``: none changes the PDDL state). The inventory is built
  from the ``holds`` facts and is part of every state.
- Reward is 1 on the step that wins; ``terminated`` when won; ``truncated`` at
  ``max_episode_steps``.
- The expert is ALFWorld's hand-coded ``HandCodedTWAgent``, told every command the agent takes,
  so it also recovers after the agent strays. Two fixes over ALFWorld's ``AlfredExpert`` wrapper:
  the ``move X to Y`` command is reported to it as ``put X to Y`` (alfworld 0.4.2 tracks its
  inventory on the word ``put``, so ``pick_two_obj_and_place`` loops forever otherwise), and a
  state-preserving command it asks for that is not a candidate (``look``, ``examine``...) is run
  by the env behind the scenes, so ``info["expert_action"]`` is always a candidate (or None).
  The expert draws from Python's global ``random``; the env swaps in its own seeded state around
  each expert call, so episodes are reproducible and the caller's ``random`` is untouched.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachellm_rl.envs.game_env import GameTextEnv, SuiteEnvConfig, kept_candidates
from cachellm_rl.envs.text_env import (
    INFO_EXPERT_ACTION,
    INFO_GAME,
    INFO_LOST,
    INFO_MAX_SCORE,
    INFO_SCORE,
    INFO_WON,
    TextDecision,
)

# ALFWorld-specific info key (the others are the shared ``text_env.INFO_*``).
INFO_TASK_TYPE = "task_type"

GAME_FILE = "game.tw-pddl"
TRAJ_FILE = "traj_data.json"
OFFICIAL_SPLITS = {"train": "train", "valid": "valid_seen", "test": "valid_unseen"}
OFFICIAL_ROOT = "json_2.1.1"
# Commands that never change the PDDL state: the env may run them for the expert unseen.
STATE_PRESERVING_VERBS = ("look", "inventory", "examine", "help")
_MAX_HIDDEN_EXPERT_STEPS = 5

_BANNER_RE = re.compile(r"-=\s*.*?\s*=-")
_TASK_RE = re.compile(r"Your task is to:\s*(.*?)\s*$", re.S)


def import_alfworld():
    """Import ALFWorld's text-engine modules without letting it create ``~/.cache/alfworld``.

    ``import alfworld`` makes the folder ``$ALFWORLD_DATA`` (default ``~/.cache/alfworld``);
    when the variable is unset it is pointed at a temporary folder first. Nothing is downloaded.

    Returns:
        The ``alfworld`` package.
    """
    if "ALFWORLD_DATA" not in os.environ:
        os.environ["ALFWORLD_DATA"] = os.path.join(tempfile.gettempdir(), "alfworld_data")
    import alfworld
    import alfworld.agents.environment.alfred_tw_env
    import alfworld.agents.expert

    memoize_textworld_parsers()
    return alfworld


_PARSE_MEMO_SIZE = 8192


def _memoized_parser(parse: Callable[..., Any]) -> Callable[..., Any]:
    """``parse`` with its results kept per (text, options), handed out as deep copies.

    TextWorld's PDDL engine re-parses the same grammar snippets and logic queries with a
    ``tatsu`` parser at every step (about 40 parses, 4 ms each, per ALFWorld step: over half
    the engine's time). The parsed objects are mutated by their callers (contexts are set on
    grammar symbols), so each call gets its own deep copy of the kept result: callers see
    exactly what a fresh parse returns.
    """
    memo: OrderedDict[tuple, Any] = OrderedDict()

    def memoized(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("trace"):
            return parse(*args, **kwargs)
        try:
            key = (args, tuple(sorted(kwargs.items())))
            hash(key)
        except TypeError:
            return parse(*args, **kwargs)
        if key in memo:
            memo.move_to_end(key)
        else:
            memo[key] = parse(*args, **kwargs)
            if len(memo) > _PARSE_MEMO_SIZE:
                memo.popitem(last=False)
        return copy.deepcopy(memo[key])

    memoized.__wrapped__ = parse  # type: ignore[attr-defined]
    memoized._cachellm_memo = memo  # type: ignore[attr-defined]
    return memoized


def memoize_textworld_parsers(enable: bool = True) -> None:
    """Keep the results of TextWorld's PDDL text-grammar and logic parsers (idempotent).

    Args:
        enable: False restores the library's own parsers (for equivalence tests).
    """
    import textworld.envs.pddl.textgen as textgen
    import textworld.logic as logic

    for module in (textgen, logic):
        current = module._parse_and_convert
        original = getattr(current, "__wrapped__", current)
        if enable and current is original:
            module._parse_and_convert = _memoized_parser(original)
        elif not enable:
            module._parse_and_convert = original


def split_intro(text: str) -> tuple[str, str]:
    """``(observation, task)`` of ALFWorld's intro text (banner and task line removed).

    Example:
        >>> split_intro("-= Welcome to TextWorld, ALFRED! =-\\n\\nYou are in the middle of "
        ...             "a room.\\n\\nYour task is to: put some apple on fridge.")
        ('You are in the middle of a room.', 'put some apple on fridge.')
    """
    task = ""
    m = _TASK_RE.search(text)
    if m:
        task = " ".join(m.group(1).split())
        text = text[: m.start()]
    return " ".join(_BANNER_RE.sub("", text).split()), task


# Object-state facts shown next to a held object, and their words.
_STATE_WORDS = {"isclean": "clean", "ishot": "hot", "iscool": "cool"}


def inventory_text(facts) -> str:
    """The inventory sentence of a state from its ``holds`` facts, with the held objects'
    clean / hot / cool state (ALFWorld's feedback says it once; the prior needs it after).
    """
    states: dict[str, list[str]] = {}
    for f in facts:
        if f.name in _STATE_WORDS:
            states.setdefault(f.arguments[0].name.strip(), []).append(_STATE_WORDS[f.name])
    held = sorted(f.arguments[1].name.strip() for f in facts if f.name == "holds")
    if not held:
        return "You are not carrying anything."
    items = [f"{h} ({', '.join(sorted(states[h]))})" if h in states else h for h in held]
    return "You are carrying: " + ", ".join(items) + "."


_NAME_RE = re.compile(r"\b([a-z]+ \d+)\b")


def seen_names(feedback: str) -> list[str]:
    """Names (``cabinet 3``, ``apple 1``) listed after "you see" in a feedback text, in order.

    Example:
        >>> seen_names("You arrive at shelf 1. On the shelf 1, you see a mug 2, and a pen 1.")
        ['mug 2', 'pen 1']
    """
    found: list[str] = []
    for part in re.split(r"you see", feedback, flags=re.IGNORECASE)[1:]:
        found += _NAME_RE.findall(part.split(".", 1)[0])
    return found


def unvisited_text(places: Sequence[str], visited: Sequence[str]) -> str:
    """The sentence listing the room's places not visited yet this episode, in the order
    ALFWorld's hand-coded expert searches them (the reverse of the intro's listing). ALFWorld's
    feedback only describes the current place, so without it an agent that sees one
    observation at a time cannot tell where it has already searched.

    Example:
        >>> unvisited_text(["fridge 1", "countertop 2", "countertop 1"], ["countertop 2"])
        'Not visited yet: countertop 1, fridge 1.'
    """
    done = set(visited)
    left = [p for p in reversed(places) if p not in done]
    return "Not visited yet: " + (", ".join(left) if left else "none") + "."


def goal_objects_text(facts, seen: Sequence[str], objective: str) -> str:
    """Where the objects the objective names were last seen (an agent's memory: only objects
    it saw this episode, at their current receptacle; held ones are in the inventory).

    Returns:
        ``""`` when none was seen, else e.g. ``"Seen: apple 1 at fridge 1."``.
    """
    words = set(re.findall(r"[a-z]+", objective.lower()))
    where = {
        f.arguments[0].name.strip(): f.arguments[1].name.strip()
        for f in facts
        if f.name.lower() == "inreceptacle"
    }
    items = [f"{o} at {where[o]}" for o in seen if o.split(" ")[0] in words and o in where]
    return "Seen: " + ", ".join(items) + "." if items else ""


def read_task_params(game_file: str | Path) -> dict:
    """The hand-coded expert's task parameters from the ``traj_data.json`` next to a game."""
    constants = _constants()
    traj = json.loads((Path(game_file).parent / TRAJ_FILE).read_text())
    params = {**traj["pddl_params"], "task_type": traj["task_type"]}
    return {k: (v.lower() if v in constants.OBJECTS else v) for k, v in params.items()}


def _constants():
    import_alfworld()
    import alfworld.gen.constants as constants

    return constants


@contextmanager
def own_random_state(holder: dict) -> Iterator[None]:
    """Run a block on ``holder["state"]`` as the global ``random`` state, then restore the
    caller's state (ALFWorld's expert and task templates draw from the global ``random``)."""
    saved = random.getstate()
    random.setstate(holder["state"])
    try:
        yield
    finally:
        holder["state"] = random.getstate()
        random.setstate(saved)


def new_random_state(seed: int) -> dict:
    """A holder for :func:`own_random_state` seeded with ``seed``."""
    return {"state": random.Random(seed).getstate()}


def load_pddl_env(game: str | Path | Mapping):
    """A TextWorld PDDL env with ALFWorld's names (``cabinet 3``) loaded with ``game`` (a
    ``game.tw-pddl`` path or its parsed dict)."""
    import_alfworld()
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
    from textworld.envs.pddl import PddlEnv

    infos = textworld.EnvInfos(feedback=True, admissible_commands=True, won=True, facts=True)
    env = AlfredDemangler(PddlEnv(infos), shuffle=False)
    env.load(str(game) if isinstance(game, Path) else game)
    return env


# What ALFWorld's hand-coded expert raises when it loses track of the game (seen: IndexError
# from ``random.choice`` over an empty list of objects of interest).
_EXPERT_LOST_TRACK = (IndexError, KeyError, ValueError, AttributeError, TypeError)


class HandCodedExpert:
    """ALFWorld's ``HandCodedTWAgent`` driven per step (with the ``move``/``put`` fix).

    Args:
        task_params: Output of :func:`read_task_params`.
        seed: Seed of the expert's random draws.
        max_steps: Expert calls before it gives up (``None`` from then on).
    """

    def __init__(self, task_params: Mapping, *, seed: int, max_steps: int = 200) -> None:
        import_alfworld()
        from alfworld.agents.expert import HandCodedTWAgent

        self._rand = new_random_state(seed)
        self._agent = HandCodedTWAgent(max_steps=max_steps)
        with own_random_state(self._rand):
            policy = self._agent.get_task_policy(task_params)
            self._agent.policy = policy(dict(task_params), max_steps=max_steps)
        self.failed = False
        self.error: str | None = None  # why the expert stopped answering, if it raised

    def observe_intro(self, intro: str) -> None:
        """Give the expert the intro text (it lists the receptacles)."""
        self._agent.observe(intro)

    def act(self, state: Mapping, last_command: str) -> str | None:
        """The expert's next command after ``last_command`` led to ``state`` (None once it has
        failed or timed out)."""
        if self.failed:
            return None
        from alfworld.agents.expert import HandCodedAgentFailed, HandCodedAgentTimeout

        if last_command.startswith("move "):
            last_command = "put " + last_command[len("move ") :]
        try:
            with own_random_state(self._rand):
                return self._agent.act(state, 0, bool(state["won"]), last_command)
        except (HandCodedAgentTimeout, HandCodedAgentFailed):
            self.failed = True
            return None
        except _EXPERT_LOST_TRACK as e:
            # Off its own trajectory (random steps of a ``medium`` behaviour policy) the
            # hand-coded expert can index an empty list of objects it expected to see; it has
            # no answer from then on, as when it fails.
            self.failed = True
            self.error = f"{type(e).__name__}: {e}"
            return None


def next_expert_command(env, expert: HandCodedExpert, state, last: str, allowed) -> tuple:
    """Ask ``expert`` for a command in ``allowed``, running hidden state-preserving commands
    it asks for in between (``look`` for an inadmissible one, as ALFWorld's wrapper does).

    Returns:
        ``(command or None, state)``: the state after any hidden command.
    """
    for _ in range(_MAX_HIDDEN_EXPERT_STEPS):
        cmd = expert.act(state, last)
        if cmd is None or cmd in allowed:
            return cmd, state
        if cmd not in state["admissible_commands"]:
            cmd = "look"
        if cmd.split(" ", 1)[0] not in STATE_PRESERVING_VERBS:
            return None, state  # a real move that is not offered (candidate list cut)
        state, _, _ = env.step(cmd)
        last = cmd
    return None, state


def is_official_data(path: str | Path) -> bool:
    """Whether ``path`` is the official ALFWorld data: ``$ALFWORLD_DATA`` holding
    ``json_2.1.1``, or that folder itself."""
    root = Path(path)
    return (root / OFFICIAL_ROOT).is_dir() or (root.name == OFFICIAL_ROOT and root.is_dir())


def official_split_games(data_dir: str | Path, split: str) -> list[str]:
    """Solvable ``game.tw-pddl`` files of a split of the official ALFWorld data.

    Args:
        data_dir: ``$ALFWORLD_DATA`` or its ``json_2.1.1`` folder.
        split: ``train``, ``valid`` (``valid_seen``) or ``test`` (``valid_unseen``).
    """
    if split not in OFFICIAL_SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {list(OFFICIAL_SPLITS)}")
    root = Path(data_dir)
    if root.name != OFFICIAL_ROOT:
        root = root / OFFICIAL_ROOT
    folder = root / OFFICIAL_SPLITS[split]
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no official ALFWorld split at {folder} (run `alfworld-download` with "
            f"ALFWORLD_DATA set, or generate games with `cachellm-rl games make --suite "
            f"alfworld-gen`)"
        )
    games = []
    for traj in sorted(folder.rglob(TRAJ_FILE)):
        game = traj.parent / GAME_FILE
        if "movable" in str(traj.parent) or "Sliced" in str(traj.parent) or not game.is_file():
            continue
        if json.loads(game.read_text()).get("solvable"):
            games.append(str(game.resolve()))
    if not games:
        raise ValueError(f"no solvable ALFWorld games under {folder}")
    return games


def alfworld_split_games(games_dir: str | Path, split: str) -> list[str]:
    """Game files of ``split`` in a generated suite (has ``manifest.json``) or the official
    ALFWorld data (has ``json_2.1.1``)."""
    from cachellm_rl.envs.games import MANIFEST, split_games

    if (Path(games_dir) / MANIFEST).is_file():
        return split_games(games_dir, split)
    return official_split_games(games_dir, split)


@dataclass(frozen=True, kw_only=True)
class AlfWorldEnvConfig(SuiteEnvConfig):
    """Settings of :class:`AlfWorldEnv`: the fields of
    :class:`~cachellm_rl.envs.game_env.SuiteEnvConfig` plus the ones below. ``games`` are
    ``game.tw-pddl`` files (each with a ``traj_data.json`` beside it); ``games_dir`` is a
    generated suite or the official data (``$ALFWORLD_DATA``); ``expert`` runs the hand-coded
    expert.

    Attributes:
        drop_verbs: Admissible commands starting with one of these words are not candidates.
        memory_in_state: Append the agent's memory to the observation: the places not visited
            yet this episode (:func:`unvisited_text`) and where the objects the objective
            names were seen (:func:`goal_objects_text`).
        expert_max_steps: Expert calls per episode before it gives up.
    """

    ENV_NAME = "ALFWorld"
    SUITE = "alfworld-gen"

    drop_verbs: tuple[str, ...] = STATE_PRESERVING_VERBS
    memory_in_state: bool = True
    expert_max_steps: int = 200

    def __post_init__(self) -> None:
        super().__post_init__()
        no_traj = [g for g in self.games if not (Path(g).parent / TRAJ_FILE).is_file()]
        if no_traj:
            raise ValueError(f"AlfWorldEnvConfig.games: no {TRAJ_FILE} next to {no_traj[0]}")
        if self.expert_max_steps < 1:
            raise ValueError("AlfWorldEnvConfig.expert_max_steps must be >= 1")

    def split_games(self, games_dir: str, split: str) -> list[str]:
        """A generated suite's split, or the official data's (no manifest)."""
        return alfworld_split_games(games_dir, split)


class AlfWorldEnv(GameTextEnv[Any]):  # ALFWorld's TextWorld PDDL envs are untyped
    """An ALFWorld text game as ``Dict(state_tokens, action_tokens, action_mask)`` observations
    and ``Discrete(max_actions)`` actions (index into ``info["candidates"]``).

    Args:
        config: An :class:`AlfWorldEnvConfig` or a mapping of its fields. RLlib's ``EnvContext``
            (a dict with ``worker_index``/``vector_index`` attributes) also works.
    """

    def __init__(self, config: AlfWorldEnvConfig | Mapping | None = None) -> None:
        cfg = AlfWorldEnvConfig.parse(config)
        super().__init__(cfg, cfg.game_files(), config)
        self._task = ""
        self._task_type = ""
        self._places: list[str] = []
        self._visited: list[str] = []
        self._seen: list[str] = []
        self._expert: HandCodedExpert | None = None
        self._expert_action: str | None = None

    # -- game handling ------------------------------------------------------------------------
    def _load_game(self, game: str):
        return load_pddl_env(Path(game))

    def _decide(self, state, observation: str) -> TextDecision:
        inventory = inventory_text(state["facts"]) if self.config.inventory_in_state else None
        if self.config.memory_in_state:
            memory = [
                unvisited_text(self._places, self._visited),
                goal_objects_text(state["facts"], self._seen, self._task),
            ]
            observation = " ".join([observation, *filter(None, memory)])
        return TextDecision(
            objective=self._task,
            observation=observation,
            inventory=inventory,
            candidates=kept_candidates(state["admissible_commands"], self.config.drop_verbs),
        )

    def _update_expert(self, state, last: str):
        """The expert's next action (a kept candidate or None), and the state after any hidden
        state-preserving command it needed."""
        if self._expert is None:
            return None, state
        assert self._decision is not None
        allowed = self._decision.candidates[: self.config.obs.max_actions]
        return next_expert_command(self._open_env, self._expert, state, last, allowed)

    def _info(self, state) -> dict:
        won = bool(state["won"])
        return self._encode(
            {
                INFO_WON: won,
                INFO_LOST: False,
                INFO_SCORE: int(won),
                INFO_MAX_SCORE: 1,
                INFO_GAME: Path(self._game).parent.name,
                INFO_TASK_TYPE: self._task_type,
                INFO_EXPERT_ACTION: self._expert_action,
            }
        )

    # -- gym API ------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start an episode; ``options={"game": path}`` plays a given game."""
        self._begin_episode(seed, options)
        self._visited, self._seen = [], []
        state = self._open_env.reset()
        observation, self._task = split_intro(state["feedback"])
        self._places = seen_names(observation)
        params = read_task_params(self._game)
        self._task_type = params["task_type"]
        self._decision = self._decide(state, observation)
        self._expert, self._expert_action = None, None
        if self.config.expert:
            self._expert = HandCodedExpert(
                params,
                seed=int(self._rng.integers(2**31 - 1)),
                max_steps=self.config.expert_max_steps,
            )
            self._expert.observe_intro(state["feedback"])
            # ALFWorld's expert starts from a "look" (state-preserving, run unseen).
            state, _, _ = self._open_env.step("look")
            self._expert_action, state = self._update_expert(state, "look")
        info = self._info(state)
        return self._obs, info

    def step(self, action):
        command = self._command(action)
        if command is None:
            return self._noop_step()
        state, _, _ = self._open_env.step(command)
        place = command[len("go to ") :] if command.startswith("go to ") else None
        if place and place not in self._visited and state["feedback"].startswith("You arrive"):
            self._visited.append(place)
        for name in seen_names(state["feedback"]):
            if name not in self._seen and name not in self._places:
                self._seen.append(name)
        won = bool(state["won"])
        self._decision = self._decide(state, " ".join(state["feedback"].split()))
        self._expert_action = None
        if not won:
            self._expert_action, state = self._update_expert(state, command)
        info = self._info(state)
        truncated = not won and self._steps >= self.config.max_episode_steps
        return self._obs, float(won), won, truncated, info
