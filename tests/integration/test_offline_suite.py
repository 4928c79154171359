"""The offline suite's quick preset end to end: dataset, annotations through the real cache
actor and Serve prior, every method on RLlib's offline loop, greedy play on the test games, the
results folder, and resume. The quick preset's grids have one point each, so no selection run
is trained here; choosing among several points is tested in ``tests/unit/test_suite_layer.py``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def offline_run(tw_suite, tw_prior, tw_prior_app, tmp_path_factory):
    from cachellm_rl.algorithms.cql_prior.suite import offline_preset, run_offline_suite
    from cachellm_rl.algorithms.ps_dqn.methods import MethodSettings

    model_dir, _ = tw_prior
    root = tmp_path_factory.mktemp("offline_suite")
    cfg = offline_preset(
        "quick",
        games_dir=str(tw_suite),
        prior_model=str(model_dir),
        dataset_dir=str(root / "data" / "random"),
        dataset_episodes=6,
        progress=False,
    )
    settings = MethodSettings(prior_app=tw_prior_app)
    out = root / "results"
    summary = run_offline_suite(cfg, out, settings, log=lambda *_: None)
    return cfg, settings, out, summary


def test_every_offline_method_runs_through_the_quick_preset(offline_run):
    from cachellm_rl.algorithms.cql_prior.suite import OFFLINE_METHODS

    cfg, _, out, summary = offline_run
    methods = summary["methods"]
    assert set(methods) == {"random", "expert", *OFFLINE_METHODS}
    for f in ("summary.json", "table.md", "config.json", "selection.json", "runs.jsonl"):
        assert (out / f).is_file(), f
    assert (out / "learning_curves.png").stat().st_size > 1000
    assert list((out / "tb").rglob("events.out.tfevents.*"))
    rows = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    card = summary["datasets"]["none"]
    by = {r["method"]: r for r in rows}
    # LM queries: the uncached prior paid one per transition; the learners none at play time
    assert by["cql_prior_uncached"]["train_lm_queries"] == card["transitions"]
    assert by["cql"]["train_lm_queries"] == 0 and by["bc"]["eval_lm_queries"] == 0
    assert by["direct_lm"]["eval_lm_queries"] > 0
    # CQL-Prior acts on the posterior: the prior is asked at play time, as evaluation traffic
    assert by["cql_prior_uncached"]["policy"] == "posterior" and by["cql"]["policy"] == "q"
    assert by["cql_prior_uncached"]["eval_lm_queries"] > 0
    # every learner trained the updates asked for, and its settings are the chosen ones
    for m in ("bc", "cql", "cql_prior_uncached", "cql_prior_static", "cql_prior_adaptive"):
        assert by[m]["updates"] == cfg.train_iters * cfg.learner.iters_per_train, m
    assert by["cql_prior_adaptive"]["settings"]["alpha_prior"] == 1.0
    assert by["cql"]["settings"]["alpha_prior"] == 0.0 and by["bc"]["settings"]["mode"] == "bc"
    selection = json.loads((out / "selection.json").read_text())
    assert set(selection["chosen"]) == {"cql", "cql_prior"}
    # the expert solves these easy games; references sit in every table
    assert methods["expert"]["success_mean"] == 1.0
    text = (out / "table.md").read_text()
    assert "Offline `textworld-random`" in text and "cql_prior_adaptive" in text


def test_a_finished_offline_suite_resumes_without_rerunning(offline_run):
    from cachellm_rl.algorithms.cql_prior.suite import run_offline_suite

    cfg, settings, out, _ = offline_run
    before = (out / "runs.jsonl").read_text()
    run_offline_suite(cfg, out, settings, log=lambda *_: None)
    assert (out / "runs.jsonl").read_text() == before


def test_offline_suite_cli_refuses_bad_input_in_one_line():
    res = subprocess.run(
        [sys.executable, "experiments/offline_suite.py", "--datasets", "human"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert "unknown datasets ['human']" in res.stderr and "Traceback" not in res.stderr


def test_data_make_shows_its_progress_and_keeps_ray_noise_in_its_log(tw_suite, tmp_path):
    out = tmp_path / "random"
    cmd = [sys.executable, "-m", "cachellm_rl.cli", "data", "make", "--env", "textworld"]
    cmd += ["--games", str(tw_suite), "--episodes", "2", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert '"episodes": 2' in res.stdout and "textworld random" in res.stdout  # result, bar
    terminal = res.stdout + res.stderr
    assert "WARNING" not in terminal and "INFO" not in terminal, terminal
    log = (tmp_path / "random.log").read_text()
    assert "ray" in log.lower(), log  # Ray's start-up lines went to the log file
    assert (out / "dataset.json").is_file()
