"""Offline datasets without Ray: behaviour policies, medium calibration, the card, decoding."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from cachellm_rl.envs.text_env import INFO_CANDIDATES, INFO_EXPERT_ACTION
from cachellm_rl.offline.datasets import (
    COL_INFOS,
    DatasetConfig,
    EpisodeLog,
    behaviour_action,
    calibrate_medium_mix,
    dataset_card,
)
from cachellm_rl.offline.reader import decode_observation

INFO = {INFO_CANDIDATES: ["a", "b", "c", "d"], INFO_EXPERT_ACTION: "c"}


def test_behaviour_policies_follow_their_definitions():
    rng = np.random.default_rng(0)
    assert {behaviour_action("expert", 0.0, INFO, rng) for _ in range(50)} == {2}
    random = [behaviour_action("random", 0.0, INFO, rng) for _ in range(4000)]
    assert np.bincount(random, minlength=4) / 4000 == pytest.approx([0.25] * 4, abs=0.03)
    medium = np.array([behaviour_action("medium", 0.4, INFO, rng) for _ in range(4000)])
    # expert 60% of the time, plus its share of the uniform 40%
    assert (medium == 2).mean() == pytest.approx(0.6 + 0.4 / 4, abs=0.03)
    no_expert = {INFO_CANDIDATES: ["a", "b"], INFO_EXPERT_ACTION: None}
    assert {behaviour_action("expert", 0.0, no_expert, rng) for _ in range(50)} == {0, 1}


def test_medium_calibration_lands_halfway_between_random_and_expert():
    for curve in (lambda m: 0.9 * (1 - m), lambda m: 0.1 + 0.8 * (1 - m) ** 3):
        mix, got, trace = calibrate_medium_mix(curve, random_success=curve(1.0), expert_success=0.9)
        target = 0.5 * (curve(1.0) + 0.9)
        assert abs(got - target) <= 0.05 and got == pytest.approx(curve(mix))
        assert 1 <= len(trace) <= 6
    # the cubic curve reaches the halfway point at a small mix, not at 0.5
    mix, _, _ = calibrate_medium_mix(
        lambda m: 0.1 + 0.8 * (1 - m) ** 3, random_success=0.1, expert_success=0.9
    )
    assert mix < 0.3


def test_bad_dataset_settings_are_refused():
    with pytest.raises(ValueError, match="unknown behaviour policy"):
        DatasetConfig(env="textworld", policy="greedy", episodes=3)
    with pytest.raises(ValueError, match="episodes must be >= 1"):
        DatasetConfig(env="textworld", policy="random", episodes=0)
    with pytest.raises(ValueError, match="medium policy only"):
        DatasetConfig(env="textworld", policy="random", episodes=3, medium_mix=0.2)


def _row(obs_text: str) -> dict:
    info = {"observation": obs_text, "candidates": ["a"], "objective": "", "inventory": ""}
    return {COL_INFOS: info}


def test_the_card_counts_transitions_distinct_states_and_success():
    logs = [
        EpisodeLog(rows=[_row("x"), _row("y"), _row("x")], won=True, ret=1.0),
        EpisodeLog(rows=[_row("y")], won=False, ret=0.0),
    ]
    cfg = DatasetConfig(env="textworld", policy="random", episodes=2)
    card = dataset_card(
        cfg, logs, games=["g1"], mix=1.0, calibration=None, prior_version="v", seconds=1.0
    )
    assert (card["episodes"], card["transitions"], card["distinct_states"]) == (2, 4, 2)
    assert card["behaviour_success"] == 0.5 and card["behaviour_return"] == 0.5
    assert card["medium_mix"] is None and card["prior_model_version"] == "v"
    assert card["expert_silent_steps"] is None  # random never asks the expert
    logs[0].expert_silent, logs[1].expert_silent = 2, 1
    medium = DatasetConfig(env="textworld", policy="medium", episodes=2)
    card = dataset_card(
        medium, logs, games=["g1"], mix=0.5, calibration=None, prior_version="v", seconds=1.0
    )
    assert card["expert_silent_steps"] == 3


def test_stored_observations_decode_to_the_spaces_shapes():
    space = gym.spaces.Dict(
        {
            "mask": gym.spaces.Box(0.0, 1.0, (3,), np.float32),
            "tokens": gym.spaces.Box(0, 9, (3, 2), np.int64),
        }
    )
    # as Arrow hands a struct of list<list<int>> back: object arrays of arrays
    tokens = np.empty(3, dtype=object)
    for i in range(3):
        tokens[i] = np.array([i, i + 1])
    out = decode_observation({"mask": [1.0, 0.0, 1.0], "tokens": tokens}, space)
    assert out["tokens"].dtype == np.int64 and out["tokens"].shape == (3, 2)
    assert out["tokens"].tolist() == [[0, 1], [1, 2], [2, 3]]
    assert out["mask"].dtype == np.float32
    with pytest.raises(ValueError, match="has no 'tokens' field"):
        decode_observation({"mask": [1.0, 0.0, 1.0]}, space)
    with pytest.raises(ValueError, match="shape"):
        decode_observation({"mask": [1.0, 0.0], "tokens": tokens}, space)


def test_a_vector_envs_space_is_read_as_one_envs():
    from cachellm_rl.offline.reader import single_space

    vec = gym.spaces.Dict(
        {
            "mask": gym.spaces.Box(0.0, 1.0, (1, 3), np.float32),
            "tokens": gym.spaces.Box(0, 9, (1, 3, 2), np.int64),
        }
    )
    one = single_space(vec)
    assert one["mask"].shape == (3,) and one["tokens"].shape == (3, 2)
    assert one["tokens"].dtype == np.int64
    plain = gym.spaces.Dict({"mask": gym.spaces.Box(0.0, 1.0, (3,), np.float32)})
    assert single_space(plain) is plain


def test_an_annotation_names_the_encoder_of_its_adaptive_preset(tmp_path):
    """The adaptive preset's annotation is keyed by its state encoder (MiniLM or a learned
    encoder's tag), so switching encoders annotates again; other presets embed nothing."""
    from cachellm_rl.algorithms.ps_dqn.methods import MethodSettings
    from cachellm_rl.cache.learned_encoder import DecisionStateEncoder
    from cachellm_rl.offline.annotate import annotation_encoder

    enc = DecisionStateEncoder()
    enc.save(tmp_path / "enc")
    learned = MethodSettings(state_encoder_dir=str(tmp_path / "enc"))
    assert annotation_encoder("adaptive", MethodSettings()) == "minilm"
    assert annotation_encoder("adaptive", learned) == f"learned:{enc.tag}"
    assert annotation_encoder("static", learned) == "minilm"
    assert annotation_encoder("uncached", learned) == "minilm"


def test_the_offline_suite_refuses_a_folder_without_an_encoder(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "experiments" / "offline_suite.py"
    spec = importlib.util.spec_from_file_location("offline_suite_cli", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--state-encoder", str(tmp_path)]) == 2
    assert "holds no learned encoder" in capsys.readouterr().err
