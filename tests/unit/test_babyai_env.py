"""BabyAI-Text env and suite: checker, text rendering, the bot wins every generated game,
idempotent generation with disjoint splits, masked actions, config errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

pytest.importorskip("minigrid", reason="needs minigrid")

from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX, STATE_TO_IDX

from cachellm_rl.envs.babyai import (
    ACTION_TEXTS,
    BabyAIEnv,
    BabyAIEnvConfig,
    BabyAISuiteConfig,
    admissible_actions,
    describe_view,
    make_babyai_suite,
    object_text,
    relative_position,
)
from cachellm_rl.envs.games import load_manifest, split_games
from cachellm_rl.envs.registry import make_text_env
from cachellm_rl.envs.text_env import OBS_ACTION_MASK, OBS_ACTION_TOKENS, OBS_STATE_TOKENS

_CFG = BabyAISuiteConfig(n_train=4, n_valid=1, n_test=4, seed=5)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("babyai_suite")
    manifest = make_babyai_suite(_CFG, root, progress=False)
    assert manifest["generated"] == 9
    return root


@pytest.fixture()
def env(suite):
    e = BabyAIEnv({"games_dir": str(suite), "split": "train", "game_order": "cycle"})
    yield e
    e.close()


def test_check_env_passes(env):
    check_env(env, skip_render_check=True)


def _cell(name, color="red", state="open"):
    return (OBJECT_TO_IDX[name], COLOR_TO_IDX[color], STATE_TO_IDX[state])


def test_describe_view_positions_doors_and_nearest_walls():
    img = np.zeros((7, 7, 3), np.uint8)
    img[1, 5] = _cell("ball")  # 2 left, 1 forward
    img[4, 6] = _cell("key", "blue")  # 1 right, same row
    img[3, 0] = _cell("door", "yellow", "locked")  # 6 forward
    img[3, 2] = _cell("wall", "grey")  # 4 forward (nearer than the door's row)
    img[0, 6] = _cell("wall", "grey")  # 3 left
    img[5, 3] = _cell("wall", "grey")  # diagonal: not described
    img[3, 6] = _cell("agent")  # the agent's own cell is skipped
    text = describe_view(img)
    assert text == (
        "You see a blue key 1 step right. "
        "You see a red ball 2 steps left and 1 step forward. "
        "You see a locked yellow door 6 steps forward. "
        "You see a wall 4 steps forward. You see a wall 3 steps left."
    )
    # objects the mission names come first, then the others nearest first
    assert describe_view(img, "open the yellow door").startswith(
        "You see a locked yellow door 6 steps forward. You see a blue key 1 step right. "
    )
    assert describe_view(img, "pick up a ball").startswith("You see a red ball")
    assert describe_view(img, "pick up the green ball").startswith("You see a blue key")
    assert describe_view(np.zeros((7, 7, 3), np.uint8)) == "You see nothing special."
    with pytest.raises(ValueError, match="7, 7, 3"):
        describe_view(np.zeros((5, 5, 3), np.uint8))


def test_bot_solves_every_generated_game(suite):
    games = split_games(suite, "train") + split_games(suite, "test")
    e = make_text_env("babyai", {"games": games, "max_episode_steps": 64})
    levels = set()
    for game in games:
        obs, info = e.reset(options={"game": game})
        assert e.observation_space.contains(obs)
        assert info["objective"] and info["observation"].startswith("You see")
        assert info["inventory"] == "You are not carrying anything."
        total, done, n, offered = 0.0, False, 0, set()
        while not done:
            cands = info["candidates"]
            assert cands == list(admissible_actions(e._env.unwrapped))
            assert cands[:2] == ["turn left", "turn right"] and "drop" not in cands[:1]
            offered.update(cands)
            obs, r, term, trunc, info = e.step(cands.index(info["expert_action"]))
            total, n, done = total + r, n + 1, term or trunc
        assert "go forward" in offered and offered <= set(ACTION_TEXTS)
        assert info["won"] and term and not trunc and 0 < total <= 1
        assert info["state_tokens_truncated"] == 0
        levels.add(info["level"])
    assert levels == set(_CFG.levels)  # every default level is played and won
    e.close()


def test_same_game_same_layout_and_expert_recovers(suite):
    game = split_games(suite, "train")[0]
    e = BabyAIEnv({"games": [game]})
    _, first = e.reset(seed=1)
    _, again = e.reset(seed=2)
    assert first["observation"] == again["observation"]
    # Stray for a few steps, then follow the bot: it still wins.
    for a in ("turn left", "turn left", "go forward"):
        _, _, term, _, info = e.step(ACTION_TEXTS.index(a))
        assert term or info["expert_action"] in ACTION_TEXTS
    done = term
    while not done:
        _, _, term, trunc, info = e.step(ACTION_TEXTS.index(info["expert_action"]))
        done = term or trunc
    assert info["won"]
    e.close()


def test_generator_is_idempotent_and_splits_disjoint(suite):
    manifest = load_manifest(suite)
    again = make_babyai_suite(_CFG, suite, progress=False)
    assert again["generated"] == 0
    assert json.loads((suite / "manifest.json").read_text())["games"] == manifest["games"]
    keys = {}
    for g in manifest["games"]:
        assert g["bot_steps"] <= _CFG.max_bot_steps
        keys.setdefault(g["split"], set()).add((g["level"], g["seed"]))
    assert not (keys["train"] & keys["test"]) and not (keys["train"] & keys["valid"])


def test_masked_action_is_noop_or_error(suite):
    lenient = BabyAIEnv({"games_dir": str(suite), "expert": False})
    obs, info = lenient.reset(seed=0)
    bad = int(np.flatnonzero(obs[OBS_ACTION_MASK] == 0)[0])
    assert bad == len(info["candidates"])
    obs2, r, term, trunc, info = lenient.step(bad)
    assert info["invalid_action"] and r == 0.0 and not term and not trunc
    np.testing.assert_array_equal(obs2[OBS_STATE_TOKENS], obs[OBS_STATE_TOKENS])
    strict = BabyAIEnv({"games_dir": str(suite), "expert": False, "strict_actions": True})
    strict.reset(seed=0)
    with pytest.raises(ValueError, match="masked"):
        strict.step(bad)


def test_truncates_at_max_episode_steps(suite):
    e = BabyAIEnv({"games_dir": str(suite), "expert": False, "max_episode_steps": 3})
    e.reset(seed=0)
    outs = [e.step(ACTION_TEXTS.index("turn left")) for _ in range(3)]
    assert [o[3] for o in outs] == [False, False, True] and not any(o[2] for o in outs)


def test_bad_config_errors_name_the_problem(suite, tmp_path):
    with pytest.raises(ValueError, match="exactly one of `games`"):
        BabyAIEnvConfig()
    with pytest.raises(ValueError, match="not found"):
        BabyAIEnvConfig(games=(str(tmp_path / "g.json"),))
    with pytest.raises(ValueError, match="split must be one of"):
        BabyAIEnvConfig(games_dir=str(suite), split="dev")
    with pytest.raises(ValueError, match="unknown BabyAI env_config keys"):
        BabyAIEnv({"games_dir": str(suite), "gamez": 1})
    with pytest.raises(ValueError, match="max_actions must be >= 6"):
        BabyAIEnv({"games_dir": str(suite), "obs": {"max_actions": 4}})
    with pytest.raises(ValueError, match="unknown BabyAI level"):
        BabyAISuiteConfig(levels=("BabyAI-GoToMars-v0",))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"level": "BabyAI-GoToLocal-v0"}))
    with pytest.raises(ValueError, match="'level' and 'seed'"):
        BabyAIEnv({"games": [str(bad)]}).reset()


def test_memory_recalls_mission_objects_out_of_view(suite):
    """After turning around, every mission object seen at reset is remembered behind the agent
    at the mirrored position; objects the mission does not name are not remembered."""
    e = BabyAIEnv({"games_dir": str(suite), "expert": False})
    plain = BabyAIEnv({"games_dir": str(suite), "expert": False, "memory_in_state": False})
    checked = 0
    for game in split_games(suite, "train") + split_games(suite, "test"):
        e.reset(options={"game": game})
        plain.reset(options={"game": game})
        assert "remember" not in e.decision.observation  # nothing is out of view yet
        genv = e._env.unwrapped
        words = set(genv.mission.split())
        start, fwd, right = np.array(genv.agent_pos), genv.dir_vec, genv.right_vec
        expected = []
        for x in range(genv.grid.width):
            for y in range(genv.grid.height):
                obj = genv.grid.get(x, y)
                if obj is None or obj.type not in ("key", "ball", "box", "door"):
                    continue
                rel = np.array([x, y]) - start
                f, s = int(rel @ fwd), int(rel @ right)
                seen = f"You see a {object_text(obj)} {relative_position(s, f)}."
                if seen in e.decision.observation and obj.type in words:
                    # after a half turn: s -> -s and f -> -f
                    expected.append(
                        f"You remember a {object_text(obj)} {relative_position(-s, -f)}."
                    )
        left = ACTION_TEXTS.index("turn left")
        for _ in range(2):
            e.step(left)
            plain.step(left)
        text = e.decision.observation
        assert text.startswith(plain.decision.observation)
        remembered = text[len(plain.decision.observation) :].strip()
        colours = words & {"red", "green", "blue", "purple", "yellow", "grey"}
        for sentence in expected:
            named = any(c in sentence for c in colours) or not colours
            if named and sentence.replace("remember", "see") not in text:  # not still in view
                assert sentence in remembered, (genv.mission, sentence, remembered)
                checked += 1
        for sentence in filter(None, remembered.split(".")):
            kinds = [k for k in ("key", "ball", "box", "door") if k in sentence.split()]
            assert kinds and kinds[0] in words, (genv.mission, sentence)
    assert checked > 0
    e.close()
    plain.close()


def test_admissible_actions_drop_no_ops(suite):
    """Only state-changing actions are offered: never `go forward` into a wall or object,
    `pick up` with nothing in front, or `drop` with empty hands; all six without the filter."""
    game = split_games(suite, "train")[0]
    e = BabyAIEnv({"games": [game], "expert": False})
    everything = BabyAIEnv({"games": [game], "expert": False, "admissible_only": False})
    _, info = everything.reset()
    assert info["candidates"] == list(ACTION_TEXTS)
    _, info = e.reset()
    genv = e._env.unwrapped
    for _ in range(30):  # walk forward until blocked, turning when blocked
        front = genv.grid.get(*genv.front_pos)
        cands = info["candidates"]
        assert ("go forward" in cands) == (front is None or front.can_overlap())
        assert ("pick up" in cands) == (front is not None and front.can_pickup())
        assert "drop" not in cands and genv.carrying is None
        a = "go forward" if "go forward" in cands else "turn left"
        _, _, term, trunc, info = e.step(cands.index(a))
        assert not info["invalid_action"]
        if term or trunc:
            break
    e.close()
    everything.close()


def test_repeat_marks_count_earlier_choices_in_the_same_state(suite):
    """With ``obs.mark_repeats`` each candidate's action tokens carry one repeat mark per
    earlier time this episode it was taken in the same state text (at most two), counted
    independently here; without it, or in a new episode, there are none."""
    from cachellm_rl.envs.text_env import MAX_REPEAT_MARKS, REPEAT_MARK, token_id

    e = BabyAIEnv({"games_dir": str(suite), "expert": False, "obs": {"mark_repeats": True}})
    assert e.config.obs.max_actions == 8  # a partial obs mapping keeps the env's sizes
    vocab = e.config.obs.vocab_size
    mark = token_id(REPEAT_MARK, vocab)
    obs, info = e.reset(seed=0)
    taken: dict[tuple[str, str], int] = {}
    marked_steps = 0
    for t in range(16):  # turning back and forth revisits the same views
        want = [
            min(taken.get((e.decision.state_text(), c), 0), MAX_REPEAT_MARKS)
            for c in info["candidates"]
        ]
        got = [int((obs[OBS_ACTION_TOKENS][i] == mark).sum()) for i in range(len(want))]
        assert got == want, t
        marked_steps += any(want)
        command = "turn left" if t % 2 == 0 else "turn right"
        key = (e.decision.state_text(), command)
        taken[key] = taken.get(key, 0) + 1
        obs, _, _, _, info = e.step(info["candidates"].index(command))
    assert marked_steps >= 4  # the loop was seen, so the check above was exercised
    obs, info = e.reset(seed=0)
    assert not (obs[OBS_ACTION_TOKENS] == mark).any()  # a new episode forgets
    plain = BabyAIEnv({"games_dir": str(suite), "expert": False})
    obs, info = plain.reset(seed=0)
    for t in range(8):
        obs, _, _, _, info = plain.step(
            info["candidates"].index(("turn left", "turn right")[t % 2])
        )
        assert not (obs[OBS_ACTION_TOKENS] == mark).any()
    with pytest.raises(ValueError, match="unknown BabyAI env_config obs keys"):
        BabyAIEnv({"games_dir": str(suite), "obs": {"mark_repeat": True}})


def test_a_run_with_repeat_marks_builds_its_envs_with_them(suite):
    """``MethodSettings.mark_repeats`` reaches the env config of every run (the checkpoint's
    ``obs_config`` is read off such an env)."""
    from cachellm_rl.algorithms.ps_dqn.methods import MethodSettings
    from cachellm_rl.algorithms.ps_dqn.suite import TextSuiteConfig, env_config_for

    games = split_games(suite, "test")[:1]
    for marks in (False, True):
        cfg = TextSuiteConfig(
            env="babyai", games_dir=str(suite), settings=MethodSettings(mark_repeats=marks)
        )
        e = make_text_env("babyai", env_config_for(cfg, games, 0))
        assert e.config.obs.mark_repeats is marks and e.config.obs.max_actions == 8
        e.close()
