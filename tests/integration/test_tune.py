"""A real Ray Tune sweep over the cache's settings (two short trials on the tiny suite)."""

from __future__ import annotations

import json

import pytest
import ray

from cachellm_rl.tuning import METRIC, SweepConfig, run_sweep
from tune_spaces import space

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_sweep_runs_trials_with_their_own_caches_writes_best_and_resumes(
    ray_session, tw_suite, tw_prior, tmp_path
):
    model_dir, _ = tw_prior
    cfg = SweepConfig(
        env="textworld",
        space="cache_meta",
        num_samples=2,
        trial_env_steps=250,
        num_games=1,
        searcher="random",
        cpus_per_trial=0.5,
        games_dir=str(tw_suite),
        prior_model=str(model_dir),
        prior_app="tune_test_prior",
    )
    out = tmp_path / "sweep"
    best = run_sweep(cfg, out, progress=False)
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 2 and not any(t["error"] for t in trials), trials
    # each trial trained and was scored by its own cache actor, then removed it
    for t in trials:
        m = t["metrics"]
        assert m["env_steps"] >= 250 and m["decisions"] >= 250 and m["lm_queries"] > 0
        assert t["config"].keys() == space("cache_meta").keys()
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    assert not any(n.startswith("tune_cache_") for n in names), names
    # the two trials ran with different settings, and best.json holds the better one's
    assert trials[0]["config"] != trials[1]["config"]
    top = max(trials, key=lambda t: t["metrics"][METRIC])
    saved = json.loads((out / "best.json").read_text())
    assert saved == best and saved["settings"] == top["config"]
    assert saved["split"] == "valid"
    assert (out / "objective.png").stat().st_size > 0 and "| 1 |" in (out / "table.md").read_text()
    # a second call restores the finished sweep instead of starting new trials
    again = run_sweep(cfg, out, progress=False)
    assert again["settings"] == best["settings"] and again["trial_id"] == best["trial_id"]
