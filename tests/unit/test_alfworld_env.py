"""ALFWorld generator and env: checker, expert wins every generated game, splits by floor plan,
idempotent generation, masked actions, config errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

pytest.importorskip("fast_downward", reason="needs textworld[pddl] (fast-downward-textworld)")

from cachellm_rl.envs import alfworld as alfworld_module
from cachellm_rl.envs.alfworld import (
    AlfWorldEnv,
    AlfWorldEnvConfig,
    alfworld_split_games,
    goal_objects_text,
    inventory_text,
    seen_names,
    split_intro,
    unvisited_text,
)
from cachellm_rl.envs.alfworld_gen import (
    AlfWorldSuiteConfig,
    floor_plan_splits,
    make_alfworld_suite,
)
from cachellm_rl.envs.games import load_manifest
from cachellm_rl.envs.registry import (
    default_games_dir,
    env_split_games,
    has_games,
    make_text_env,
)
from cachellm_rl.envs.text_env import OBS_ACTION_MASK, OBS_STATE_TOKENS
from cachellm_rl.prior.embedded import train_embedded_prior

# Fast task types; pick_two exercises the expert's "move"/"put" fix.
_CFG = AlfWorldSuiteConfig(
    n_train=2,
    n_valid=0,
    n_test=1,
    task_types=("pick_two_obj_and_place", "look_at_obj_in_light"),
    max_distractors=3,
    seed=3,
)


@pytest.fixture(scope="module")
def alf_suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("alf_suite")
    manifest = make_alfworld_suite(_CFG, root, progress=False)
    assert manifest["generated"] == 3
    return root


@pytest.fixture()
def env(alf_suite):
    e = AlfWorldEnv({"games_dir": str(alf_suite), "split": "train", "game_order": "cycle"})
    yield e
    e.close()


def test_check_env_passes(env):
    check_env(env, skip_render_check=True)


def test_expert_solves_every_generated_game(alf_suite):
    games = alfworld_split_games(alf_suite, "train") + alfworld_split_games(alf_suite, "test")
    e = make_text_env("alfworld", {"games": games, "max_episode_steps": 80})
    random.seed(11)
    before = random.getstate()
    for game in games:
        obs, info = e.reset(options={"game": game})
        assert e.observation_space.contains(obs)
        assert info["objective"] and "Your task" not in info["observation"]
        assert info["inventory"] == "You are not carrying anything."
        places = seen_names(info["observation"])
        assert places and info["observation"].endswith(unvisited_text(places, []))
        total, done, n, went = 0.0, False, 0, []
        while not done:
            cands = info["candidates"]
            assert not any(c.split()[0] in ("look", "inventory", "examine", "help") for c in cands)
            a = cands.index(info["expert_action"])
            if info["expert_action"].startswith("take "):  # a goal object it has seen
                obj, place = info["expert_action"][len("take ") :].split(" from ")
                assert f"{obj} at {place}" in info["observation"], info["observation"]
            if info["expert_action"].startswith("go to "):
                went.append(info["expert_action"][len("go to ") :])
            obs, r, term, trunc, info = e.step(a)
            total, n, done = total + r, n + 1, term or trunc
            if not done:  # the observation remembers where the agent has not been yet
                assert unvisited_text(places, went) in info["observation"], info["observation"]
        assert info["won"] and term and not trunc and total == 1.0
        assert info["task_type"] in game
    assert random.getstate() == before  # the expert's draws do not touch the caller's random
    e.close()


def _random_play(games, steps: int) -> list:
    """What the env shows along a fixed random walk (observations, masks, rewards, infos)."""
    e = make_text_env("alfworld", {"games": games, "max_episode_steps": 25})
    rng = random.Random(5)
    obs, info = e.reset(seed=0)
    seen = []
    for _ in range(steps):
        valid = np.flatnonzero(obs[OBS_ACTION_MASK])
        obs, r, term, trunc, info = e.step(int(rng.choice(list(valid))))
        seen.append((info["observation"], tuple(info["candidates"]), r, term, trunc, info["won"]))
        if term or trunc:
            obs, info = e.reset()
            seen.append(("reset", info["observation"], tuple(info["candidates"])))
    e.close()
    return seen


def test_memoized_parsers_play_exactly_as_the_library_and_are_used(alf_suite, monkeypatch):
    import textworld.envs.pddl.textgen as textgen
    import textworld.logic as logic

    games = alfworld_split_games(alf_suite, "train")
    fast = _random_play(games, 60)
    memos = [m._parse_and_convert._cachellm_memo for m in (textgen, logic)]
    assert all(len(memo) > 0 for memo in memos)  # the engine went through the memo
    alfworld_module.memoize_textworld_parsers(enable=False)
    monkeypatch.setattr(alfworld_module, "memoize_textworld_parsers", lambda enable=True: None)
    assert not hasattr(textgen._parse_and_convert, "_cachellm_memo")
    slow = _random_play(games, 60)
    assert fast == slow
    monkeypatch.undo()
    alfworld_module.memoize_textworld_parsers()
    assert hasattr(textgen._parse_and_convert, "_cachellm_memo")


def test_generator_is_idempotent_and_splits_by_floor_plan(alf_suite):
    manifest = load_manifest(alf_suite)
    assert all(g["expert_steps"] > 0 and g["seconds"] > 0 for g in manifest["games"])
    again = make_alfworld_suite(_CFG, alf_suite, progress=False)
    assert again["generated"] == 0
    assert json.loads((alf_suite / "manifest.json").read_text())["games"] == manifest["games"]
    splits = floor_plan_splits(_CFG.valid_floor_plans_per_room)
    assert len(set().union(*splits.values())) == sum(len(s) for s in splits.values()) == 120
    for g in manifest["games"]:
        assert g["floor_plan"] in splits[g["split"]]
        traj = json.loads((alf_suite / g["file"]).with_name("traj_data.json").read_text())
        assert traj["scene"]["scene_num"] == g["floor_plan"]


def test_masked_action_is_noop_or_error(alf_suite):
    lenient = AlfWorldEnv({"games_dir": str(alf_suite), "expert": False})
    obs, _ = lenient.reset(seed=0)
    bad = int(np.flatnonzero(obs[OBS_ACTION_MASK] == 0)[0])
    obs2, r, term, trunc, info = lenient.step(bad)
    assert info["invalid_action"] and r == 0.0 and not term and not trunc
    np.testing.assert_array_equal(obs2[OBS_STATE_TOKENS], obs[OBS_STATE_TOKENS])
    strict = AlfWorldEnv({"games_dir": str(alf_suite), "expert": False, "strict_actions": True})
    strict.reset(seed=0)
    with pytest.raises(ValueError, match="masked"):
        strict.step(bad)


def test_bad_config_errors_name_the_problem(alf_suite, tmp_path):
    with pytest.raises(ValueError, match="exactly one of `games`"):
        AlfWorldEnvConfig()
    with pytest.raises(ValueError, match="not found"):
        AlfWorldEnvConfig(games=(str(tmp_path / "game.tw-pddl"),))
    with pytest.raises(ValueError, match="split must be one of"):
        AlfWorldEnvConfig(games_dir=str(alf_suite), split="dev")
    with pytest.raises(ValueError, match="unknown ALFWorld env_config keys"):
        AlfWorldEnv({"games_dir": str(alf_suite), "gamez": 1})
    with pytest.raises(FileNotFoundError, match="alfworld-download"):
        AlfWorldEnv({"games_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="unknown ALFWorld task type"):
        AlfWorldSuiteConfig(task_types=("pick_and_slice",))


def test_split_intro():
    obs, task = split_intro(
        "-= Welcome to TextWorld, ALFRED! =-\n\nYou are in the middle of a room.\n\n"
        "Your task is to: put two pencil in drawer."
    )
    assert obs == "You are in the middle of a room." and task == "put two pencil in drawer."


class _Arg:
    def __init__(self, name):
        self.name = name


class _Fact:
    def __init__(self, name, *args):
        self.name, self.arguments = name, [_Arg(a) for a in args]


def test_inventory_shows_held_objects_state():
    assert inventory_text([]) == "You are not carrying anything."
    facts = [
        _Fact("holds", "agent1", "mug 1"),
        _Fact("holds", "agent1", "apple 2"),
        _Fact("ishot", "apple 2"),
        _Fact("isclean", "apple 2"),
        _Fact("iscool", "lettuce 1"),  # not held: not shown
    ]
    assert inventory_text(facts) == "You are carrying: apple 2 (clean, hot), mug 1."


def test_memory_sentences():
    assert seen_names("You arrive at desk 1. On the desk 1, you see a mug 2, and a pen 1.") == [
        "mug 2",
        "pen 1",
    ]
    assert seen_names("You close the drawer 2.") == []
    places = ["fridge 1", "countertop 2", "countertop 1"]
    assert unvisited_text(places, []) == "Not visited yet: countertop 1, countertop 2, fridge 1."
    assert unvisited_text(places, places) == "Not visited yet: none."
    facts = [_Fact("inreceptacle", "mug 2", "desk 1"), _Fact("inreceptacle", "pen 1", "desk 1")]
    # only objects the objective names, that were seen, and are still in a receptacle
    assert goal_objects_text(facts, ["mug 2", "pen 1"], "put a mug in shelf.") == (
        "Seen: mug 2 at desk 1."
    )
    assert goal_objects_text(facts, ["pen 1"], "put a mug in shelf.") == ""
    assert goal_objects_text(facts[1:], ["mug 2"], "put a mug in shelf.") == ""


def test_official_data_layout(alf_suite, tmp_path, monkeypatch):
    """``games_dir=$ALFWORLD_DATA``: the official folder layout (json_2.1.1/<split>/<task>/
    <trial>/), built here from generated games (same file formats); movable, Sliced and
    unsolvable games are skipped, splits map to train / valid_seen / valid_unseen."""
    import shutil

    root = tmp_path / "alfworld_data"
    layout = {
        "train": alfworld_split_games(alf_suite, "train"),
        "valid_unseen": alfworld_split_games(alf_suite, "test"),
    }
    for split, games in layout.items():
        for i, game in enumerate(games):
            for task in (f"task-{i}", f"task-{i}-movable", f"task-{i}-Sliced"):
                shutil.copytree(Path(game).parent, root / "json_2.1.1" / split / task / "trial_1")
    unsolvable = root / "json_2.1.1" / "train" / "task-x" / "trial_1"
    shutil.copytree(Path(layout["train"][0]).parent, unsolvable)
    game = json.loads((unsolvable / "game.tw-pddl").read_text())
    (unsolvable / "game.tw-pddl").write_text(json.dumps({**game, "solvable": False}))

    train = alfworld_split_games(root, "train")
    assert [Path(g).parent.parent.name for g in train] == ["task-0", "task-1"]
    assert alfworld_split_games(root / "json_2.1.1", "train") == train
    with pytest.raises(FileNotFoundError, match="valid_seen"):
        alfworld_split_games(root, "valid")
    # $ALFWORLD_DATA holding the official data makes it ALFWorld's default games
    monkeypatch.setenv("ALFWORLD_DATA", str(root))
    assert default_games_dir("alfworld") == root and has_games("alfworld", root)
    assert env_split_games("alfworld", default_games_dir("alfworld"), "train") == train
    with pytest.raises(ValueError, match="valid_seen"):
        env_split_games("alfworld", root, "valid")
    report = train_embedded_prior(
        "alfworld",
        games_dir=None,
        out_dir=tmp_path / "prior",
        episodes_per_game=1,
        epochs=1,
        renumber_copies=0,
        eval_splits=("valid", "test"),
        progress=False,
    )
    assert report["games_dir"] == str(root) and report["train_games"] == 2
    assert set(report["direct_success"]) == {"train", "test"}  # no valid_seen here
    monkeypatch.delenv("ALFWORLD_DATA")
    assert default_games_dir("alfworld") == Path("data/games/alfworld-gen")
    e = AlfWorldEnv({"games_dir": str(root), "split": "test", "max_episode_steps": 80})
    _, info = e.reset(seed=0)
    done = False
    while not done:
        _, _, term, trunc, info = e.step(info["candidates"].index(info["expert_action"]))
        done = term or trunc
    assert info["won"]
    e.close()


def test_an_expert_that_raises_stops_answering_instead_of_crashing_the_episode(alf_suite):
    # ALFWorld's hand-coded expert can raise IndexError off its own trajectory (medium data).
    game = alfworld_split_games(alf_suite, "train")[0]
    e = make_text_env("alfworld", {"games": [game], "expert": True, "max_episode_steps": 10})
    info = e.reset(options={"game": game})[1]
    assert info["expert_action"] is not None
    expert = e._expert

    def broken(*args, **kwargs):
        raise IndexError("Cannot choose from an empty sequence")

    expert._agent.act = broken
    info = e.step(0)[-1]
    assert info["expert_action"] is None and expert.failed
    assert expert.error == "IndexError: Cannot choose from an empty sequence"
    info = e.step(0)[-1]  # the episode goes on, the expert stays silent
    assert info["expert_action"] is None
    e.close()
