"""The offline learners on RLlib's offline loop (CQL algorithm, our learner and module)."""

from __future__ import annotations

import math

import numpy as np
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


def test_the_evaluated_module_is_the_trained_one(expert_data):
    """An offline algorithm never syncs its env runner's module: ``learned_module`` must
    return the learner's weights (with ``algo.get_module()`` they never change)."""
    import torch

    from cachellm_rl.algorithms.cql_prior.config import learned_module

    out, games = expert_data
    settings = OfflineLearnerSettings(mode="bc", lr=3e-3, iters_per_train=2)
    algo = offline_algo_config("textworld", games, [str(out)], settings).build_algo()
    try:
        before = {k: v.clone() for k, v in learned_module(algo).state_dict().items()}
        algo.train()
        after = learned_module(algo).state_dict()
        learner = algo.learner_group._learner.module["default_policy"].state_dict()
    finally:
        algo.stop()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for k, v in after.items():
        assert torch.equal(v, learner[k]), k


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


@pytest.fixture(scope="module")
def annotations(expert_data, tw_prior_app):
    """The expert dataset annotated under exact_only and uncached, through the real cache
    actor and the Serve deployment of the briefly trained TextWorld prior."""
    from cachellm_rl.algorithms.ps_dqn.methods import MethodSettings
    from cachellm_rl.offline.annotate import annotate_dataset

    out, _ = expert_data
    s = MethodSettings(prior_app=tw_prior_app)
    return {p: annotate_dataset(out, p, s, log=lambda *_: None) for p in ("exact_only", "uncached")}


def test_annotation_counts_lm_queries_per_preset(expert_data, annotations):
    from cachellm_rl.offline.annotate import annotated_dir

    exact, uncached = annotations["exact_only"]["annotation"], annotations["uncached"]["annotation"]
    n, distinct = exact["transitions"], exact["distinct_states"]
    assert 0 < exact["lm_queries"] <= distinct  # at most one LM call per distinct state
    assert uncached["lm_queries"] == n  # one per transition
    assert exact["prior_model_version"] == uncached["prior_model_version"] != ""
    out, _ = expert_data
    import ray

    rows = ray.data.read_parquet(str(annotated_dir(out, "exact_only"))).take(3)
    for r in rows:
        logp = np.asarray(r["prior_logp"])
        k = len(r["infos"]["candidates"])
        assert logp.shape == (len(r["obs"]["action_mask"]),)
        assert np.exp(logp[:k]).sum() == pytest.approx(1.0, abs=1e-3)


def test_cql_prior_trains_on_an_annotated_dataset(expert_data, annotations):
    from cachellm_rl.offline.annotate import annotated_dir

    out, games = expert_data
    settings = OfflineLearnerSettings(mode="cql", alpha_cql=1.0, alpha_prior=1.0)
    algo = offline_algo_config(
        "textworld", games, [str(annotated_dir(out, "exact_only"))], settings
    ).build_algo()
    try:
        logs = [algo.train()["learners"]["default_policy"] for _ in range(2)]
    finally:
        algo.stop()
    kl = float(logs[-1]["kl_to_prior"])
    assert math.isfinite(kl) and kl > 0
