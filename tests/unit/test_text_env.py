"""TextWorld env contract: checker, truncation counters, masked actions, expert, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from cachellm_rl.envs.demos import collect_demonstrations
from cachellm_rl.envs.games import CookingLevel, SuiteConfig, load_manifest, make_suite, split_games
from cachellm_rl.envs.registry import check_env_id, make_text_env
from cachellm_rl.envs.text_env import (
    OBS_ACTION_MASK,
    OBS_ACTION_TOKENS,
    OBS_STATE_TOKENS,
    TextDecision,
    TextObsConfig,
    encode_decision,
    hash_tokens,
)
from cachellm_rl.envs.textworld_env import TextWorldEnv, TextWorldEnvConfig, recipe_text


@pytest.fixture()
def env(tw_suite):
    e = TextWorldEnv({"games": split_games(tw_suite, "train"), "game_order": "cycle"})
    yield e
    e.close()


def test_check_env_passes(env):
    check_env(env, skip_render_check=True)


def test_expert_wins_and_reward_is_score_gain(env, tw_suite):
    for game in split_games(tw_suite, "train")[:3]:
        obs, info = env.reset(options={"game": game})
        assert env.observation_space.contains(obs)
        total, done = 0.0, False
        while not done:
            a = info["candidates"].index(info["expert_action"])
            obs, r, term, trunc, info = env.step(a)
            total += r
            done = term or trunc
        assert info["won"] and not trunc
        assert total == info["max_score"] > 0


def test_recipe_in_objective_and_texts_in_info(env):
    _, info = env.reset()
    assert "Recipe: ingredients:" in info["objective"]
    assert info["observation"] and info["inventory"]
    assert not any(c.startswith(("examine", "look", "inventory")) for c in info["candidates"])
    mask = env.reset()[0][OBS_ACTION_MASK]
    assert mask.sum() == len(env.decision.candidates)


def test_the_same_state_at_another_move_has_the_same_texts(env, tw_suite):
    """The interpreter's status line (room, score/moves) is not part of the observation: the
    state after ``open X`` equals the state after ``open X, close X, open X``."""

    def play(game: str, commands: list[str]) -> tuple[TextDecision, dict]:
        _, info = env.reset(options={"game": game})
        for cmd in commands:
            _, _, _, _, info = env.step(info["candidates"].index(cmd))
        assert env.decision is not None
        return env.decision, info

    for game in split_games(tw_suite, "train"):
        _, info = env.reset(options={"game": game})
        opens = [c for c in info["candidates"] if c.startswith("open ")]
        if opens:
            break
    else:
        pytest.skip("no game of the fixture suite starts with a container to open")
    thing = opens[0].removeprefix("open ")
    once, info_once = play(game, [f"open {thing}"])
    thrice, _ = play(game, [f"open {thing}", f"close {thing}", f"open {thing}"])
    assert once.observation == thrice.observation
    assert once.state_text() == thrice.state_text()
    assert "=-" not in once.observation and "/" not in info_once["observation"]


def test_masked_action_is_counted_noop_or_error(tw_suite):
    games = split_games(tw_suite, "train")
    lenient = TextWorldEnv({"games": games})
    obs, _ = lenient.reset(seed=0)
    bad = int(np.flatnonzero(obs[OBS_ACTION_MASK] == 0)[0])
    obs2, r, term, _, info2 = lenient.step(bad)
    assert info2["invalid_action"] and r == 0.0 and not term
    np.testing.assert_array_equal(obs2[OBS_STATE_TOKENS], obs[OBS_STATE_TOKENS])
    strict = TextWorldEnv({"games": games, "strict_actions": True})
    strict.reset(seed=0)
    with pytest.raises(ValueError, match="masked"):
        strict.step(bad)


def test_truncation_is_counted_never_silent(tw_suite):
    small = {"max_state_tokens": 8, "max_actions": 2, "max_action_tokens": 1}
    e = TextWorldEnv({"games": split_games(tw_suite, "train"), "obs": small})
    obs, info = e.reset(seed=0)
    assert obs[OBS_STATE_TOKENS].shape == (8,) and obs[OBS_ACTION_TOKENS].shape == (2, 1)
    assert info["state_tokens_truncated"] > 0
    assert info["candidates_dropped"] > 0 and len(info["candidates"]) == 2
    assert info["action_tokens_truncated"] > 0


def test_step_limit_truncates(tw_suite):
    e = TextWorldEnv({"games": split_games(tw_suite, "train"), "max_episode_steps": 2})
    _, info = e.reset(seed=0)
    done, n = False, 0
    while not done:
        # a non-expert action: never wins in 2 steps
        a = next(i for i, c in enumerate(info["candidates"]) if c != info["expert_action"])
        _, _, term, trunc, info = e.step(a)
        n += 1
        done = term or trunc
    assert n <= 2 and (trunc or term)


def test_bad_config_errors_name_the_problem(tw_suite, tmp_path):
    with pytest.raises(ValueError, match="games is empty"):
        TextWorldEnvConfig(games=())
    with pytest.raises(ValueError, match="not found"):
        TextWorldEnvConfig(games=(str(tmp_path / "missing.z8"),))
    with pytest.raises(ValueError, match="unknown TextWorld env_config keys"):
        TextWorldEnv({"games": split_games(tw_suite, "train"), "gamez": 1})
    with pytest.raises(ValueError, match="unknown env id"):
        check_env_id("zork")
    with pytest.raises(FileNotFoundError, match="games make"):
        split_games(tmp_path, "train")
    with pytest.raises(ValueError, match="at least one candidate"):
        encode_decision(
            TextDecision(objective="", observation="x", inventory=None, candidates=()),
            TextObsConfig(),
        )


def test_games_make_is_idempotent_and_split(tw_suite):
    manifest = load_manifest(tw_suite)
    cfg = manifest["config"]
    again = make_suite(
        SuiteConfig(
            n_train=cfg["n_train"],
            n_valid=cfg["n_valid"],
            n_test=cfg["n_test"],
            levels=tuple(CookingLevel(**lv) for lv in cfg["levels"]),
            seed=cfg["seed"],
        ),
        tw_suite,
        progress=False,
    )
    assert again["generated"] == 0
    names = {
        s: [g["file"] for g in manifest["games"] if g["split"] == s] for s in ("train", "test")
    }
    assert len(names["train"]) == 10 and len(names["test"]) == 2
    assert not set(names["train"]) & set(names["test"])
    assert json.loads((tw_suite / "manifest.json").read_text())["games"] == manifest["games"]


def test_demonstrations_include_recoveries(tw_suite):
    games = split_games(tw_suite, "train")[:2]
    e = make_text_env("textworld", {"games": games, "expert": True})
    demos, stats = collect_demonstrations(
        e, games, episodes_per_game=3, perturb_probability=0.5, seed=1, progress=False
    )
    assert stats.expert_missing == 0 and stats.episodes == 6
    assert stats.unique_decisions == len(demos) > 0
    assert all(d.action in d.decision.candidates for d in demos)
    walkthrough_states = {d.decision for d in demos if d.episode == 0}
    assert any(d.decision not in walkthrough_states for d in demos)  # recoveries


def test_hash_tokens_and_recipe_text():
    ids, cut = hash_tokens("Take the red apple", 3, 50)
    assert ids.tolist() == hash_tokens("take THE red", 3, 50)[0].tolist() and cut == 1
    assert recipe_text("Ingredients:\nred apple\n\nDirections:\n  slice the red apple\n") == (
        "Recipe: ingredients: red apple. directions: slice the red apple."
    )


def test_repeat_marks_follow_the_candidate_tokens():
    from cachellm_rl.envs.text_env import REPEAT_MARK, add_repeat_marks, token_id

    mark = token_id(REPEAT_MARK, 50)
    ids, _ = hash_tokens("go north", 4, 50)
    once, thrice = add_repeat_marks(ids, 1, 50), add_repeat_marks(ids, 3, 50)
    assert once[:2].tolist() == ids[:2].tolist() and once[2] == mark and once[3] == 0
    assert thrice[2:].tolist() == [mark, mark]  # capped at two marks
    full, _ = hash_tokens("a b c d", 4, 50)
    assert add_repeat_marks(full, 1, 50)[-1] == mark  # no room: the last token gives way
    d = TextDecision(objective="o", observation="x", inventory=None, candidates=("go", "stay"))
    cfg = TextObsConfig(max_actions=3, max_action_tokens=4, vocab_size=50, mark_repeats=True)
    obs, _ = encode_decision(d, cfg, [0, 2])
    assert (obs[OBS_ACTION_TOKENS][0] == mark).sum() == 0
    assert (obs[OBS_ACTION_TOKENS][1] == mark).sum() == 2
    off, _ = encode_decision(
        d, TextObsConfig(max_actions=3, max_action_tokens=4, vocab_size=50), [0, 2]
    )
    assert (off[OBS_ACTION_TOKENS] == mark).sum() == 0
