"""Faults at scale: a 4-runner PS-DQN run survives a killed cache actor and a killed Serve
replica, degrading to fallback priors (counted) instead of crashing."""

from __future__ import annotations

import pytest

from cachellm_rl.algorithms.ps_dqn.methods import MethodSettings
from cachellm_rl.envs.games import split_games
from cachellm_rl.faults import FaultDrill, run_fault_drill, snapshot_summary
from tests.helpers import TW_PRIOR_APP

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = MethodSettings(
    hidden=32,
    num_envs_per_env_runner=2,
    rollout_fragment_length=4,
    learning_starts=32,
    env_steps_per_iteration=64,
    train_batch_size=16,
    prior_app=TW_PRIOR_APP,
)


def _drill(fault, tw_suite, tmp_path, name):
    drill = FaultDrill(
        fault=fault,
        num_env_runners=4,
        env_steps=448,
        kill_at_env_steps=192,
        snapshot_interval_s=1.0,
    )
    env_config = {"games": split_games(tw_suite, "train")[:4], "expert": False,
                  "max_episode_steps": 20}  # fmt: skip
    return run_fault_drill(
        drill,
        SMALL,
        env="textworld",
        env_config=env_config,
        cache_name=name,
        snapshot_dir=tmp_path / "snap",
    )


def test_a_killed_cache_actor_comes_back_with_its_snapshot_and_training_goes_on(
    tw_prior_app, tw_suite, tmp_path
):
    r = _drill("cache_actor", tw_suite, tmp_path, "test-fault-cache")
    assert r["finished"] and r["decisions_raised"] == 0, r.get("error")
    assert r["env_steps"] >= 448 and r["kills"] == 1 and r["actor_restarts"] == 1
    snap = r["snapshot"]
    # the restarted actor holds exactly the entries and parameters of the snapshot it restored
    assert snap["entries"] > 0 and r["entries_restored"] == snap["entries"]
    for k in ("capacity_entries", "min_cosine_similarity", "refresh_probability"):
        assert r["params_after_restart"][k] == pytest.approx(snap[k])
    assert r["entries_after_restart"] >= snap["entries"] - 1  # more may arrive meanwhile
    # the snapshot is at most one interval old: nearly everything before the kill came back
    assert snap["entries"] <= r["entries_before_kill"]


def test_a_killed_serve_replica_is_replaced_and_training_goes_on(tw_prior_app, tw_suite, tmp_path):
    r = _drill("serve_replica", tw_suite, tmp_path, "test-fault-serve")
    assert r["finished"] and r["decisions_raised"] == 0, r.get("error")
    # a new replica (another actor) took the killed one's place
    assert r["kills"] == 1 and r["killed_replica"].startswith("SERVE_REPLICA::")
    assert r["recovery_s"] > 0
    # the LM answered again after the kill (Serve queues calls while no replica is up; a call
    # that fails or times out meanwhile is answered by a counted fallback prior)
    assert r["lm_queries"] > r["lm_queries_before_kill"] + r["lm_failures"] + r["lm_timeouts"]
    assert r["fallback_decisions_cache"] >= r["lm_failures"] + r["lm_timeouts"]


def test_drill_settings_are_checked_and_snapshots_summarised(tmp_path):
    with pytest.raises(ValueError, match="unknown fault"):
        FaultDrill(fault="network")
    with pytest.raises(ValueError, match="kill_at_env_steps"):
        FaultDrill(env_steps=100, kill_at_env_steps=100)
    assert snapshot_summary(tmp_path) is None
