"""PS-DQN through RLlib with a real Serve prior and the shared cache actor."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import ray

from cachellm_rl.algorithms.ps_dqn.learner import CONSERVATIVE_KEY
from cachellm_rl.algorithms.ps_dqn.methods import (
    MethodSettings,
    algo_config_for,
    collect_reports,
    start_cache,
)
from cachellm_rl.cache.actor import DEFAULT_NAMESPACE, kill_cache
from cachellm_rl.envs.games import split_games
from cachellm_rl.envs.textworld_env import TextWorldEnv
from tests.helpers import TW_PRIOR_APP

pytestmark = pytest.mark.integration

SMALL = MethodSettings(
    hidden=32,
    num_envs_per_env_runner=3,
    rollout_fragment_length=4,
    learning_starts=24,
    env_steps_per_iteration=48,
    train_batch_size=16,
    prior_app=TW_PRIOR_APP,
)


def test_one_actor_call_per_vector_step_and_prior_reaches_learner(tw_prior_app, tw_suite):
    name = "test-psdqn-adaptive"
    handle = start_cache("adaptive", SMALL, name, DEFAULT_NAMESPACE)
    games = split_games(tw_suite, "test")
    cfg = algo_config_for(
        "adaptive",
        SMALL,
        env_class=TextWorldEnv,
        env_config={"games": games, "expert": False, "max_episode_steps": 20},
        cache_name=name,
        num_env_runners=1,
        total_env_steps=96,
        seed=0,
    )
    algo = cfg.build_algo()
    try:
        results = [algo.train() for _ in range(2)]
        report = collect_reports(algo)
        calls = ray.get(handle.call_counts.remote())
        learner = results[-1]["learners"]["default_policy"]
    finally:
        algo.stop()
        kill_cache(name, DEFAULT_NAMESPACE)
    # One remote env runner: one caller. Each vector step makes one call that carries every
    # sub-env's state, except final observations (never acted on), which are not queried.
    assert len(calls) == 1
    (n_calls, n_queries) = next(iter(calls.values()))
    assert n_calls == report.actor_calls > 0
    assert n_queries == report.decisions
    all_final = report.vector_steps - report.actor_calls
    assert 0 <= all_final <= report.final_observations
    assert n_queries + report.final_observations == 3 * report.vector_steps
    assert report.final_observations > 0  # episodes did end (20-step limit)
    # The learner's loss saw the prior columns (it logs the KL only when they are in the batch).
    assert "kl_posterior_to_prior" in learner
    assert learner["kl_posterior_to_prior"] >= 0.0


def test_schedules_follow_global_env_steps_with_two_runners(tw_prior_app, tw_suite):
    """RLlib passes every runner the *global* env step count as ``t``: with 2 runners each one
    samples about half the steps, yet its exploration ``t`` tracks the total. (The run also
    carries the conservative term, whose gap the learner reports.)"""
    games = split_games(tw_suite, "test")
    cfg = algo_config_for(
        "no_prior",
        replace(SMALL, conservative_alpha=0.5),
        env_class=TextWorldEnv,
        env_config={"games": games, "expert": False, "max_episode_steps": 20},
        cache_name="unused",
        num_env_runners=2,
        total_env_steps=400,
        seed=0,
    )
    algo = cfg.build_algo()
    try:
        for _ in range(4):
            result = algo.train()
            total = result["env_runners"]["num_env_steps_sampled_lifetime"]
        ts = algo.env_runner_group.foreach_env_runner(
            lambda r: r.module.last_t, local_env_runner=False
        )
    finally:
        algo.stop()
    assert len(ts) == 2
    for t in ts:
        assert 0.75 * total <= t <= 1.25 * total, (t, total)
    assert CONSERVATIVE_KEY in result["learners"]["default_policy"]


def _runner_weights(algo) -> list:
    return algo.env_runner_group.foreach_env_runner(
        lambda r: {k: v.detach().clone() for k, v in r.module.state_dict().items()},
        local_env_runner=False,
    )


def test_overlap_sampling_keeps_every_fragment_and_the_replay_ratio(tw_suite, tmp_path):
    """With ``overlap_sampling`` the learner updates while the runners sample: every sampled
    fragment still reaches the buffer (a checkpoint first stores the one in flight), the
    updates per sampled step are the configured replay ratio, and the runners get the
    learner's weights."""
    games = split_games(tw_suite, "test")
    settings = replace(SMALL, overlap_sampling=True)
    algo = algo_config_for(
        "no_prior",
        settings,
        env_class=TextWorldEnv,
        env_config={"games": games, "expert": False, "max_episode_steps": 20},
        cache_name="unused",
        num_env_runners=1,
        total_env_steps=400,
        seed=0,
    ).build_algo()
    try:
        before = _runner_weights(algo)[0]
        for _ in range(5):
            result = algo.train()
        assert algo._pending_sample  # a fragment is in flight between iterations
        sampled_at_update = int(result["env_runners"]["num_env_steps_sampled_lifetime"])
        trained = int(result["learners"]["__all_modules__"]["num_env_steps_trained_lifetime"])
        # Saving stores the fragment in flight and sends every runner the latest weights.
        algo.save_to_path(str(tmp_path / "ckpt"))
        assert not algo._pending_sample
        sampled = int(algo.metrics.peek(("env_runners", "num_env_steps_sampled_lifetime")))
        stored = algo.local_replay_buffer.get_num_timesteps()
        learner = algo.learner_group.get_weights()["default_policy"]
        after = _runner_weights(algo)[0]
        local = algo.get_module().state_dict()  # what greedy evaluation plays
    finally:
        algo.stop()
    assert stored == sampled > sampled_at_update  # nothing was dropped on the way
    # Replayed / sampled transitions: the configured ratio, counted from learning_starts.
    ratio = trained / (sampled_at_update - settings.learning_starts)
    assert 0.7 * settings.training_intensity <= ratio <= 1.3 * settings.training_intensity
    changed = [k for k in after if not np.allclose(after[k].numpy(), before[k].numpy())]
    assert changed, "the runners never got the learner's weights"
    for k in changed:
        np.testing.assert_allclose(after[k].numpy(), np.asarray(learner[k]), atol=1e-6)
        np.testing.assert_allclose(np.asarray(local[k]), np.asarray(learner[k]), atol=1e-6)


def test_every_method_builds_trains_and_acts(suite_run):
    tmp_path, cfg, summary = suite_run
    methods = summary["methods"]
    assert set(methods) == {
        "no_prior",
        "direct_lm",
        "uncached",
        "frozen_q",
        "exact_only",
        "lru",
        "static",
        "adaptive",
    }
    for m, agg in methods.items():
        for key in (
            "success_mean",
            "success_ci95",
            "return_mean",
            "lm_queries",
            "hit_rate",
            "latency_hit_p50_ms",
            "latency_miss_p50_ms",
            "env_steps_per_s",
            "wall_s",
        ):
            assert key in agg, (m, key)
        assert 0.0 <= agg["success_mean"] <= 1.0
    assert methods["no_prior"]["lm_queries"] == 0
    assert methods["uncached"]["hit_rate"] == 0.0 and methods["uncached"]["lm_queries"] > 0
    # the exact tier alone never serves a semantic hit; reuse there is exact or coalesced
    assert "semantic_share" not in methods["exact_only"]
    assert methods["exact_only"]["lm_queries"] > 0
    for f in ("summary.json", "table.md", "config.json", "runs.jsonl", "curves.jsonl"):
        assert (tmp_path / f).is_file(), f
    for png in ("learning_curves.png", "lm_queries.png", "hit_rate.png", "latency_hist.png"):
        assert (tmp_path / png).stat().st_size > 1000, png
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    rows = [json.loads(x) for x in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert all(r["invalid_actions"] == 0 for r in rows if "invalid_actions" in r)
    assert all(r["protocol"] == "same_games" for r in rows)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["methods"].keys() == methods.keys() and on_disk["protocol"] == "same_games"
    assert "uncached vs frozen_q" in on_disk["comparisons"]
    assert "Protocol `same_games`" in (tmp_path / "table.md").read_text()
    # frozen_q is uncached with no Q updates: its Q stays 0, so it plays the prior's argmax.
    frozen = next(r for r in rows if r["method"] == "frozen_q")
    direct = next(r for r in rows if r["method"] == "direct_lm")
    assert frozen["per_game_success"] == direct["per_game_success"]
    # Every RL run left a complete checkpoint with its metadata.
    for r in rows:
        if r["method"] != "direct_lm":
            meta = json.loads((Path(r["checkpoint"]) / "cachellm_checkpoint.json").read_text())
            assert meta["method"] == r["method"] and meta["env"] == cfg.env
            assert (meta["prior_version"] is None) == (r["method"] == "no_prior")


def test_the_suite_layer_keeps_the_text_suites_files_and_keys(suite_run):
    """The files and keys the text suite wrote before its loop, aggregation and tables moved
    into the shared suite layer (recorded from the old code in tests/data)."""
    tmp_path, _, _ = suite_run
    golden = json.loads((Path(__file__).parents[1] / "data" / "text_suite_keys.json").read_text())
    files = {f.name for f in tmp_path.iterdir()} - {"checkpoints", "tb", "labels"}
    assert files == set(golden["files"]) - {"run.log"}  # run.log is the CLI's
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(summary) == golden["summary"]
    rows = {r["method"]: r for r in summary["runs"]}
    for m, keys in golden["run_row"].items():
        assert sorted(rows[m]) == keys, m
        agg, want = set(summary["methods"][m]), set(golden["method_aggregate"][m])
        # the golden suite had no ``uncached`` run to relate LM queries to
        assert want <= agg and agg - want <= {"train_lm_queries_vs_uncached"}, m


def test_an_interrupted_suite_resumes(suite_run):
    """Rerunning a finished results folder does no run twice."""
    from cachellm_rl.algorithms.ps_dqn.suite import run_text_suite

    tmp_path, cfg, _ = suite_run
    before = (tmp_path / "runs.jsonl").read_text()
    run_text_suite(cfg, tmp_path)
    assert (tmp_path / "runs.jsonl").read_text() == before


def test_an_unfinished_run_restarts_from_its_checkpoint(suite_run, tmp_path, monkeypatch):
    """A run with a checkpoint but no row restarts from the checkpoint's env steps, also when
    the results folder is given as a relative path."""
    import dataclasses
    import shutil

    from cachellm_rl.algorithms.ps_dqn.suite import run_text_suite

    src, cfg, _ = suite_run
    shutil.copytree(src, tmp_path / "res")
    rows = (tmp_path / "res" / "runs.jsonl").read_text().splitlines()
    kept = [r for r in rows if json.loads(r)["method"] != "uncached"]
    (tmp_path / "res" / "runs.jsonl").write_text("".join(r + "\n" for r in kept))
    monkeypatch.chdir(tmp_path)
    again = dataclasses.replace(cfg, methods=("uncached",), env_steps=2 * cfg.env_steps)
    summary = run_text_suite(again, Path("res"))
    (row,) = [r for r in summary["runs"] if r["method"] == "uncached"]
    assert row["resumed_from_env_steps"] >= cfg.env_steps
    assert row["train_env_steps"] >= again.env_steps


@pytest.fixture(scope="module")
def suite_run(tw_prior_app, tw_suite, tw_prior, tmp_path_factory):
    """Every method of the suite, briefly, on one tiny game, sampled in the driver."""
    from cachellm_rl.algorithms.ps_dqn.suite import TextSuiteConfig, run_text_suite

    model_dir, _ = tw_prior
    out = tmp_path_factory.mktemp("suite")
    cfg = TextSuiteConfig(
        games_dir=str(tw_suite),
        num_games=1,
        prior_model=str(model_dir),
        seeds=(0,),
        env_steps=48,
        max_episode_steps=15,
        num_env_runners=0,  # sample in the driver: no runner process per method (remote
        # runners are tested above)
        settings=SMALL,
        progress=False,
    )
    summary = run_text_suite(cfg, out)
    return out, cfg, summary
