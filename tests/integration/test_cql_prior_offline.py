"""The offline learners on RLlib's offline loop (CQL algorithm, our learner and module)."""

from __future__ import annotations

import math

import pytest

from cachellm_rl.algorithms.cql_prior.config import OfflineLearnerSettings, offline_algo_config
from cachellm_rl.offline.datasets import DatasetConfig, make_dataset

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def expert_data(ray_session, tw_suite, tmp_path_factory):
    from cachellm_rl.envs.registry import env_split_games

    out = tmp_path_factory.mktemp("offline") / "expert"
    cfg = DatasetConfig(env="textworld", policy="expert", episodes=10, games_dir=str(tw_suite))
    make_dataset(cfg, out, progress=False, log=lambda *_: None)
    return out, env_split_games("textworld", tw_suite, "train")


def _train(expert_data, settings, iters=3):
    out, games = expert_data
    algo = offline_algo_config("textworld", games, [str(out)], settings).build_algo()
    try:
        return [algo.train()["learners"]["default_policy"] for _ in range(iters)]
    finally:
        algo.stop()


def test_behaviour_cloning_learns_the_experts_actions(expert_data):
    """BC's loss falls on the expert data (with lr = 0 it would stay where it started)."""
    logs = _train(expert_data, OfflineLearnerSettings(mode="bc", lr=3e-3, iters_per_train=5))
    first, last = float(logs[0]["bc_loss"]), float(logs[-1]["bc_loss"])
    assert last < 0.8 * first


def test_discrete_cql_runs_on_the_offline_loop(expert_data):
    logs = _train(expert_data, OfflineLearnerSettings(mode="cql", alpha_cql=1.0), iters=2)
    for key in ("td_loss", "cql_loss", "qf_loss"):
        assert all(math.isfinite(float(log[key])) for log in logs)
    assert float(logs[-1]["kl_to_prior"]) == 0.0  # no prior asked for


def test_bad_offline_settings_are_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        OfflineLearnerSettings(mode="td3")
    with pytest.raises(ValueError, match="iters_per_train"):
        OfflineLearnerSettings(iters_per_train=1)
    with pytest.raises(ValueError, match=">= 0"):
        OfflineLearnerSettings(alpha_cql=-1.0)
