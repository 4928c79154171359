"""Offline datasets with Ray: recorded through Ray Data, read back by RLlib's pre-learner."""

from __future__ import annotations

import numpy as np
import pytest

from cachellm_rl.offline.datasets import (
    COL_INFOS,
    DatasetConfig,
    make_dataset,
    read_card,
)

pytestmark = pytest.mark.integration


def _spaces(tw_suite):
    from cachellm_rl.envs.registry import env_split_games, make_text_env

    env = make_text_env("textworld", {"games": env_split_games("textworld", tw_suite, "train")})
    try:
        return env.observation_space, env.action_space
    finally:
        env.close()


def test_a_dataset_round_trips_through_rllibs_offline_prelearner(ray_session, tw_suite, tmp_path):
    """Dict observations written as Arrow structs come back from RLlib's offline pre-learner
    as tensors of the observation space's shapes, with the recorded values."""
    from cachellm_rl.algorithms.ps_dqn.config import PSDQNConfig
    from cachellm_rl.offline.reader import TextOfflinePreLearner, decode_observation

    out = tmp_path / "ds"
    cfg = DatasetConfig(env="textworld", policy="random", episodes=3, games_dir=str(tw_suite))
    card = make_dataset(cfg, out, progress=False, log=lambda *_: None)
    assert card["episodes"] == 3 and card["transitions"] >= 3
    assert read_card(out)["fingerprint"] == card["fingerprint"]

    obs_space, act_space = _spaces(tw_suite)
    ds = ray_session.data.read_parquet(str(out))
    rows = ds.take_all()
    assert len(rows) == card["transitions"]
    assert {r["eps_id"] for r in rows} == {f"random-0-{i:06d}" for i in range(3)}
    assert all(r[COL_INFOS]["candidates"] for r in rows)  # the state's texts travel along

    algo_cfg = (
        PSDQNConfig()
        .environment(observation_space=obs_space, action_space=act_space)
        .offline_data(input_=[str(out)], input_read_episodes=False)
        .learners(num_learners=0)
    )
    spec = algo_cfg.get_multi_rl_module_spec(spaces={"default_policy": (obs_space, act_space)})
    pre = TextOfflinePreLearner(config=algo_cfg, spaces=(obs_space, act_space), module_spec=spec)
    batch = next(iter(ds.iter_batches(batch_size=len(rows), batch_format="numpy")))
    got = pre(batch)
    tokens = got["default_policy/obs/state_tokens"].numpy()
    assert tokens.shape == (len(rows), *obs_space["state_tokens"].shape)
    acts = got["default_policy/obs/action_tokens"]
    assert tuple(acts.shape) == (len(rows), *obs_space["action_tokens"].shape)
    assert got["default_policy/actions"].shape == (len(rows),)
    recorded = sorted(
        decode_observation(r["obs"], obs_space)["state_tokens"].tolist() for r in rows
    )
    assert sorted(tokens.tolist()) == recorded
    assert float(got["default_policy/rewards"].sum()) == pytest.approx(
        float(np.sum([r["rewards"] for r in rows]))
    )


def test_making_a_dataset_twice_with_the_same_settings_does_nothing(
    ray_session, tw_suite, tmp_path
):
    out = tmp_path / "ds"
    cfg = DatasetConfig(env="textworld", policy="expert", episodes=2, games_dir=str(tw_suite))
    first = make_dataset(cfg, out, progress=False, log=lambda *_: None)
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    messages: list[str] = []
    again = make_dataset(cfg, out, progress=False, log=messages.append)
    assert again == first and "already made" in messages[0]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == files
    assert first["behaviour_success"] == 1.0  # the expert solves these games
    other = make_dataset(
        DatasetConfig(env="textworld", policy="expert", episodes=3, games_dir=str(tw_suite)),
        out,
        progress=False,
        log=lambda *_: None,
    )
    assert other["episodes"] == 3  # other settings replace it
