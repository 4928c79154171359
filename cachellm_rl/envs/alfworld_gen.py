"""Offline, seeded generation of ALFWorld-domain games from the floor plans shipped with the
``alfworld`` package (no THOR, no download).

Each game is a PDDL problem over ALFWorld's ``alfred.pddl`` domain and ``alfred.twl2`` grammar:
the receptacles of one floor plan (``alfworld/gen/layouts/FloorPlanN-openable.json``), the
target object(s) and a few distractors of object types that floor plan has, placed where
ALFRED's priors (``VAL_RECEPTACLE_OBJECTS``) allow them, and the goal of one of six task types.
A game is kept only when ALFWorld's hand-coded expert solves it (its step count is recorded) and
its goal does not already hold at reset. Game folders (``game.tw-pddl`` + ``traj_data.json``)
have the official layout, so ALFWorld's own tools load them too.

Splits are by floor plan: test uses ALFRED's ``TEST_SCENE_NUMBERS``; valid is carved out of
``TRAIN_SCENE_NUMBERS`` (the ``valid_floor_plans_per_room`` highest train floor plans of each
room type); train is the rest. No floor plan is in two splits.

Simplifications against the official data (see docs/envs.md): one location per receptacle
(receptacles sharing an agent pose would make ``go to`` inadmissible, as TextWorld binds distinct
objects to the start and end location); no sliced objects and no movable-receptacle task; lamps
(``DeskLamp``/``FloorLamp``) stand on a furniture receptacle.

``make_alfworld_suite`` is idempotent like :func:`cachellm_rl.envs.games.make_suite`.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from cachellm_rl.envs.alfworld import (
    GAME_FILE,
    TRAJ_FILE,
    HandCodedExpert,
    import_alfworld,
    load_pddl_env,
    new_random_state,
    next_expert_command,
    own_random_state,
)
from cachellm_rl.envs.games import SPLITS, derive_game_seed, write_manifest

SUITE = "alfworld-gen"
TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
# The receptacle a task type needs in the floor plan (clean: the expert falls back to a bathtub).
_TOOL_RECEPTACLES = {
    "pick_clean_then_place_in_recep": ("SinkBasin", "BathtubBasin"),
    "pick_heat_then_place_in_recep": ("Microwave",),
    "pick_cool_then_place_in_recep": ("Fridge",),
}
_ABILITY = {
    "pick_clean_then_place_in_recep": "Cleanable",
    "pick_heat_then_place_in_recep": "Heatable",
    "pick_cool_then_place_in_recep": "Coolable",
}
LAMP_TYPES = ("DeskLamp", "FloorLamp")
LAMP_HOSTS = ("Desk", "SideTable", "Dresser", "Shelf", "DiningTable", "CoffeeTable")
_PROPERTIES = (
    ("cleanable", "Cleanable"),
    ("heatable", "Heatable"),
    ("coolable", "Coolable"),
    ("sliceable", "Sliceable"),
    ("toggleable", "Toggleable"),
)
_ROOMS = ((1, 31), (201, 231), (301, 331), (401, 431))


@dataclass(frozen=True, kw_only=True)
class AlfWorldSuiteConfig:
    """A generated ALFWorld suite.

    Attributes:
        n_train: Games in the train split.
        n_valid: Games in the valid split.
        n_test: Games in the test split.
        task_types: Task types, used in turn (game ``i`` has ``task_types[i % len]``).
        valid_floor_plans_per_room: Train floor plans per room type moved to valid.
        min_distractors: Fewest distractor objects per game.
        max_distractors: Most distractor objects per game.
        expert_max_steps: Expert steps before a candidate problem is rejected (kept below the
            50-step episode limit, so the expert's plan fits an episode with room to stray).
        max_attempts: Candidate problems per game before generation fails.
        seed: Base seed; game ``i`` of a split has a seed derived from (seed, split, i).
    """

    n_train: int = 200
    n_valid: int = 30
    n_test: int = 30
    task_types: tuple[str, ...] = TASK_TYPES
    valid_floor_plans_per_room: int = 2
    min_distractors: int = 2
    max_distractors: int = 6
    expert_max_steps: int = 40
    max_attempts: int = 20
    seed: int = 1234

    def __post_init__(self) -> None:
        for name in ("n_train", "n_valid", "n_test", "min_distractors"):
            if getattr(self, name) < 0:
                raise ValueError(f"AlfWorldSuiteConfig.{name} must be >= 0")
        if not self.task_types:
            raise ValueError("AlfWorldSuiteConfig.task_types is empty")
        unknown = [t for t in self.task_types if t not in TASK_TYPES]
        if unknown:
            raise ValueError(f"unknown ALFWorld task type {unknown[0]!r}; known: {TASK_TYPES}")
        if not 0 <= self.valid_floor_plans_per_room < 24:
            raise ValueError("AlfWorldSuiteConfig.valid_floor_plans_per_room must be in 0..23")
        if self.max_distractors < self.min_distractors:
            raise ValueError("AlfWorldSuiteConfig.max_distractors must be >= min_distractors")
        if self.expert_max_steps < 1 or self.max_attempts < 1:
            raise ValueError("AlfWorldSuiteConfig.expert_max_steps and max_attempts must be >= 1")

    def count(self, split: str) -> int:
        """Games in ``split``."""
        return {"train": self.n_train, "valid": self.n_valid, "test": self.n_test}[split]

    def game_seed(self, split: str, index: int) -> int:
        """Seed of game ``index`` of ``split``."""
        return derive_game_seed(self.seed, split, index)


def floor_plan_splits(valid_per_room: int = 2) -> dict[str, tuple[int, ...]]:
    """Floor-plan numbers of each split (ALFRED's train/test scenes; valid carved from train).

    Example:
        >>> s = floor_plan_splits(2)
        >>> s["valid"][:2], len(s["train"]), len(s["test"])
        ((29, 30), 88, 24)
    """
    constants = _constants()
    train = sorted(constants.TRAIN_SCENE_NUMBERS)
    valid = []
    for lo, hi in _ROOMS:
        room = [n for n in train if lo <= n < hi]
        valid += room[len(room) - valid_per_room :] if valid_per_room else []
    return {
        "train": tuple(n for n in train if n not in valid),
        "valid": tuple(valid),
        "test": tuple(sorted(constants.TEST_SCENE_NUMBERS)),
    }


def _constants():
    import_alfworld()
    import alfworld.gen.constants as constants

    return constants


def _package_dir() -> Path:
    return Path(import_alfworld().__file__).parent


def fix_pddl_name(text: str) -> str:
    """ALFRED's PDDL name mangling (``gen/game_states/planned_game_state.fix_pddl_str_chars``).

    Example:
        >>> fix_pddl_name("Cabinet|+00.68|-02.20")
        'Cabinet_bar__plus_00_dot_68_bar__minus_02_dot_20'
    """
    for a, b in (("-", "_minus_"), ("#", "-"), ("|", "_bar_"), ("+", "_plus_"), (".", "_dot_")):
        text = text.replace(a, b)
    return text.replace(",", "_comma_")


@dataclass(frozen=True)
class FloorPlan:
    """What a floor plan offers: receptacle id -> (type, agent pose), object types present."""

    number: int
    receptacles: dict[str, tuple[str, tuple[float, ...]]]
    object_types: frozenset[str]

    def of_type(self, rtype: str) -> list[str]:
        """Receptacle ids of ``rtype`` (sorted)."""
        return sorted(r for r, (t, _) in self.receptacles.items() if t == rtype)

    @property
    def receptacle_types(self) -> set[str]:
        """Receptacle types present."""
        return {t for t, _ in self.receptacles.values()}


def load_floor_plan(number: int) -> FloorPlan:
    """The receptacles and object types of ``FloorPlan<number>`` from the package's layouts."""
    constants = _constants()
    layouts = _package_dir() / "gen" / "layouts"
    poses = json.loads((layouts / f"FloorPlan{number}-openable.json").read_text())
    receptacles = {}
    for rid, pose in poses.items():
        parts = rid.split("|")
        rtype = parts[-1] if len(parts) == 5 else parts[0]
        # ALFWorld names a receptacle by its id's first field (+ "basin"); a "Bathtub|...|SinkBasin"
        # would be called "bathtubbasin" while typed SinkBasin, which misleads the expert.
        shown = parts[0] + ("Basin" if "Basin" in rid else "")
        if len(parts) == 5 and shown != rtype:
            continue
        if rtype in constants.RECEPTACLES:
            receptacles[rid] = (rtype, tuple(pose))
    objects = json.loads((layouts / f"FloorPlan{number}-objects.json").read_text())
    return FloorPlan(number, receptacles, frozenset(objects))


def _pickupable_types(plan: FloorPlan) -> list[str]:
    """Object types of the plan that some receptacle of the plan may hold."""
    constants = _constants()
    fixed = set(constants.RECEPTACLES) - set(constants.MOVABLE_RECEPTACLES_SET)
    out = []
    for t in sorted(plan.object_types):
        if t in fixed or "Sliced" in t or t not in constants.OBJECTS_SET:
            continue
        if _hosts(plan, t):
            out.append(t)
    return out


def _hosts(plan: FloorPlan, otype: str, exclude: tuple[str, ...] = ()) -> list[str]:
    allowed = _constants().VAL_RECEPTACLE_OBJECTS
    return sorted(
        r
        for r, (t, _) in plan.receptacles.items()
        if otype in allowed.get(t, ()) and t not in exclude
    )


@dataclass(frozen=True)
class TaskSpec:
    """One sampled problem: task parameters and where every object starts."""

    task_type: str
    object_target: str
    parent_target: str
    toggle_target: str
    placements: tuple[tuple[str, str], ...]  # (object type, receptacle id)

    def traj_params(self) -> dict:
        """ALFWorld's ``pddl_params``."""
        return {
            "object_target": self.object_target,
            "parent_target": self.parent_target,
            "toggle_target": self.toggle_target,
            "mrecep_target": "",
            "object_sliced": False,
        }


def feasible(plan: FloorPlan, task_type: str) -> bool:
    """Whether ``task_type`` can be posed in ``plan`` at all."""
    if task_type in _TOOL_RECEPTACLES and not (
        plan.receptacle_types & set(_TOOL_RECEPTACLES[task_type])
    ):
        return False
    if task_type == "look_at_obj_in_light":
        has_host = any(plan.of_type(h) for h in LAMP_HOSTS)
        return has_host and bool(plan.object_types & set(LAMP_TYPES))
    return True


def sample_task(plan: FloorPlan, task_type: str, rng: random.Random, cfg) -> TaskSpec | None:
    """A random problem of ``task_type`` in ``plan`` (None when the draw finds none).

    The targets never start in a receptacle of the parent type, so the goal does not hold at
    reset, and no distractor has the target type (the goal names exactly the targets).
    """
    constants = _constants()
    pickable = _pickupable_types(plan)
    ability = _ABILITY.get(task_type)
    if ability:
        objs = [t for t in pickable if t in constants.VAL_ACTION_OBJECTS[ability]]
    else:
        objs = [t for t in pickable if t not in LAMP_TYPES]
    rng.shuffle(objs)
    tools = set(_TOOL_RECEPTACLES.get(task_type, ()))
    for obj in objs:
        toggle, parent = "", ""
        if task_type == "look_at_obj_in_light":
            toggle = rng.choice(sorted(plan.object_types & set(LAMP_TYPES)))
            hosts = _hosts(plan, obj)
        else:
            parents = sorted(
                t
                for t in plan.receptacle_types - tools
                if obj in constants.VAL_RECEPTACLE_OBJECTS.get(t, ())
            )
            if not parents:
                continue
            parent = rng.choice(parents)
            hosts = _hosts(plan, obj, exclude=(parent,))
        if not hosts:
            continue
        n_targets = 2 if task_type == "pick_two_obj_and_place" else 1
        placements = [(obj, rng.choice(hosts)) for _ in range(n_targets)]
        if toggle:
            lamp_hosts = [r for h in LAMP_HOSTS for r in plan.of_type(h)]
            placements.append((toggle, rng.choice(lamp_hosts)))
        others = [t for t in pickable if t not in (obj, toggle) and t not in LAMP_TYPES]
        for _ in range(rng.randint(cfg.min_distractors, cfg.max_distractors)):
            if not others:
                break
            t = rng.choice(others)
            placements.append(
                (t, rng.choice(_hosts(plan, t, exclude=(parent,)) or _hosts(plan, t)))
            )
        return TaskSpec(task_type, obj, parent, toggle, tuple(placements))
    return None


def problem_pddl(plan: FloorPlan, spec: TaskSpec) -> str:
    """The PDDL problem text (ALFRED's ``initial_state.pddl`` format) of ``spec`` in ``plan``."""
    constants = _constants()
    from alfworld.gen import goal_library

    # One location per receptacle (see the module docstring), named after its agent pose.
    locs = {}
    for i, (rid, (_, p)) in enumerate(sorted(plan.receptacles.items())):
        step = constants.AGENT_STEP_SIZE
        gx, gz = round(p[0] / step), round(p[1] / step)
        locs[rid] = f"loc|{gx}|{gz}|{int(p[2]) // 90}|{int(p[3])}|r{i}"
    start = "loc|start|0|0|0"
    rtypes = sorted(set(constants.RECEPTACLES) - set(constants.MOVABLE_RECEPTACLES_SET))
    otypes = sorted(set(constants.OBJECTS_SET) - set(rtypes))
    objs = {f"{t}|{i}|0|0": (t, r) for i, (t, r) in enumerate(spec.placements)}
    decl = ["agent1 # agent"]
    decl += [f"{t} # object" for t in otypes] + [f"{t}Type # otype" for t in otypes]
    decl += [f"{t}Type # rtype" for t in rtypes] + [f"{o} # object" for o in objs]
    decl += [f"{r} # receptacle" for r in sorted(plan.receptacles)]
    decl += [f"{loc} # location" for loc in sorted(set(locs.values()))] + [f"{start} # location"]
    present = sorted({t for t, _ in objs.values()})
    init = ["(= (totalCost) 0)"]
    for rt in sorted(plan.receptacle_types):
        allowed = constants.VAL_RECEPTACLE_OBJECTS.get(rt, ())
        init += [f"(canContain {rt}Type {ot}Type)" for ot in present if ot in allowed]
    for rid, (rt, _) in sorted(plan.receptacles.items()):
        init += [f"(receptacleType {rid} {rt}Type)", f"(receptacleAtLocation {rid} {locs[rid]})"]
        if rt in constants.OPENABLE_CLASS_LIST:
            init.append(f"(openable {rid})")
    for oid, (ot, rid) in objs.items():
        init.append(f"(objectType {oid} {ot}Type)")
        if ot not in LAMP_TYPES:  # lamps stay where they stand
            init.append(f"(pickupable {oid})")
        init += [f"(inReceptacle {oid} {rid})", f"(objectAtLocation {oid} {locs[rid]})"]
        init += [f"({p} {oid})" for p, k in _PROPERTIES if ot in constants.VAL_ACTION_OBJECTS[k]]
    init.append(f"(atLocation agent1 {start})")
    goal = goal_library.gdict[spec.task_type]["pddl"].format(
        obj=spec.object_target, recep=spec.parent_target, toggle=spec.toggle_target, mrecep=""
    )
    objects, facts = "\n  ".join(decl), "\n  ".join(init)
    text = (
        f"(define (problem plan_{plan.number})\n(:domain alfred)\n"
        f"(:objects\n  {objects}\n)\n(:init\n  {facts}\n)\n{goal}"
    )
    return fix_pddl_name(text)


def game_data(plan: FloorPlan, spec: TaskSpec, seed: int) -> tuple[dict, dict]:
    """``(game.tw-pddl dict, traj_data dict)`` of a problem; the task sentence's template is
    drawn with ``seed``."""
    from alfworld.agents.utils.misc import add_task_to_grammar

    pkg = _package_dir() / "data"
    traj = {
        "task_type": spec.task_type,
        "scene": {"floor_plan": f"FloorPlan{plan.number}", "scene_num": plan.number},
        "pddl_params": spec.traj_params(),
    }
    with own_random_state(new_random_state(seed)):
        grammar = add_task_to_grammar((pkg / "alfred.twl2").read_text(), traj)
    game = {
        "pddl_domain": (pkg / "alfred.pddl").read_text(),
        "grammar": grammar,
        "pddl_problem": problem_pddl(plan, spec),
        "solvable": True,
    }
    return game, traj


def run_expert(game: Mapping, traj: Mapping, *, seed: int, max_steps: int) -> list[str] | None:
    """The hand-coded expert's winning command list on ``game`` (None when it does not win, when
    the goal already holds at reset, or when TextWorld's PDDL engine cannot load the problem)."""
    constants = _constants()
    try:
        env = load_pddl_env(game)
    except KeyError:
        # Rare: fast-downward's translation yields an atom over a value TextWorld does not
        # know (seen as KeyError 'val1' on a FloorPlan429 problem). The draw is skipped.
        return None
    try:
        state = env.reset()
        if state["won"]:
            return None
        params = {**traj["pddl_params"], "task_type": traj["task_type"]}
        params = {k: (v.lower() if v in constants.OBJECTS else v) for k, v in params.items()}
        expert = HandCodedExpert(params, seed=seed, max_steps=max_steps)
        expert.observe_intro(state["feedback"])
        state, _, _ = env.step("look")
        last, plan = "look", []
        while not state["won"]:
            cmd, state = next_expert_command(env, expert, state, last, state["admissible_commands"])
            if cmd is None:
                return None
            state, _, _ = env.step(cmd)
            last = cmd
            plan.append(cmd)
        return plan
    finally:
        env.close()


def make_alfworld_game(
    folder: Path, split: str, task_type: str, seed: int, cfg: AlfWorldSuiteConfig
) -> dict:
    """Generate one expert-solved game into ``folder`` (written atomically).

    Returns:
        The generation record also stored in its ``traj_data.json`` (floor plan, expert steps,
        attempts, seconds).

    Raises:
        RuntimeError: No solvable problem in ``cfg.max_attempts`` draws.
    """
    t0 = time.perf_counter()
    rng = random.Random(seed)
    scenes = [
        n
        for n in floor_plan_splits(cfg.valid_floor_plans_per_room)[split]
        if feasible(load_floor_plan(n), task_type)
    ]
    if not scenes:
        raise RuntimeError(f"no {split} floor plan can pose {task_type}")
    for attempt in range(1, cfg.max_attempts + 1):
        plan = load_floor_plan(rng.choice(scenes))
        spec = sample_task(plan, task_type, rng, cfg)
        if spec is None:
            continue
        game, traj = game_data(plan, spec, seed)
        walkthrough = run_expert(game, traj, seed=seed, max_steps=cfg.expert_max_steps)
        if walkthrough is None:
            continue
        record = {
            "floor_plan": plan.number,
            "expert_steps": len(walkthrough),
            "attempts": attempt,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        traj = {**traj, "expert_plan": walkthrough, "generation": {**record, "seed": seed}}
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / GAME_FILE).write_text(json.dumps(game))
        (tmp / TRAJ_FILE).write_text(json.dumps(traj, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)
        return record
    raise RuntimeError(
        f"no expert-solvable {task_type} game in {cfg.max_attempts} attempts (seed {seed})"
    )


def make_alfworld_suite(
    config: AlfWorldSuiteConfig, out_dir: str | Path, *, progress: bool = True
) -> dict:
    """Generate the suite's games (skipping those already there) and write the manifest.

    Args:
        config: What to generate.
        out_dir: Suite folder (``<out_dir>/<split>/<task_type>-<i>-s<seed>/game.tw-pddl``).
        progress: Show a progress bar.

    Returns:
        The manifest dict (also written to ``<out_dir>/manifest.json``) plus ``generated``, the
        number of games made by this call.
    """
    root = Path(out_dir)
    jobs = []
    for split in SPLITS:
        for i in range(config.count(split)):
            task_type = config.task_types[i % len(config.task_types)]
            seed = config.game_seed(split, i)
            v = config.valid_floor_plans_per_room  # split rule in the name: reruns never mix
            jobs.append((split, i, task_type, seed, f"{split}/{task_type}-v{v}-{i:03d}-s{seed}"))
    entries = []
    made = 0
    for split, i, task_type, seed, name in tqdm(
        jobs, desc=f"games {SUITE}", disable=not progress, unit="game"
    ):
        folder = root / name
        if (folder / GAME_FILE).is_file() and (folder / TRAJ_FILE).is_file():
            record = json.loads((folder / TRAJ_FILE).read_text())["generation"]
            record = {k: v for k, v in record.items() if k != "seed"}
        else:
            record = make_alfworld_game(folder, split, task_type, seed, config)
            made += 1
        entries.append(
            {
                "split": split,
                "index": i,
                "file": f"{name}/{GAME_FILE}",
                "seed": seed,
                "task_type": task_type,
                **record,
            }
        )
    manifest: dict[str, Any] = {"suite": SUITE, "config": asdict(config), "games": entries}
    write_manifest(root, manifest)
    manifest["generated"] = made
    return manifest
