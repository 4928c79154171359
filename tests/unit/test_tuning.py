"""Tune spaces, settings overrides and the sweep's functional core."""

from __future__ import annotations

import json

import pytest

from cachellm_rl.algorithms.ps_dqn.methods import (
    MethodSettings,
    cache_config_for,
    settings_with,
)
from cachellm_rl.tuning import (
    METRIC,
    SweepConfig,
    best_record,
    confirmation_report,
    meta_reward,
    meta_reward_matrix,
    objective_plot,
    read_settings_file,
    space_temperatures,
    top_table,
    trial_rows,
)
from tune_spaces import PRIOR_TEMPERATURE, SPACES, space


def test_settings_with_sets_top_level_and_nested_fields_in_their_types():
    s = settings_with(
        MethodSettings(),
        {
            "adaptive_initial_capacity": 300.6,
            "meta.window_decisions": 200.0,
            "correctness.explore_probability": 0.1,
            "posterior.prior_weight": 0.5,
        },
    )
    assert s.adaptive_initial_capacity == 301 and isinstance(s.adaptive_initial_capacity, int)
    assert s.meta.window_decisions == 200 and isinstance(s.meta.window_decisions, int)
    assert s.correctness.explore_probability == 0.1
    assert s.posterior.prior_weight == 0.5
    # untouched fields keep their values
    assert s.meta.rho_max == MethodSettings().meta.rho_max


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"nope": 1}, "unknown setting 'nope'"),
        ({"meta.nope": 1}, "unknown setting 'meta.nope'"),
        ({"cache.tau": 1}, "unknown setting"),
        ({"meta": 1}, "unknown setting 'meta'"),
        ({"lr": "fast"}, "takes a number"),
        ({"lr": -1.0}, "lr"),
    ],
)
def test_settings_with_refuses_unknown_keys_and_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        settings_with(MethodSettings(), bad)


@pytest.mark.parametrize("name", sorted(SPACES))
def test_every_sample_of_every_space_is_a_valid_setting(name):
    param_space = space(name)
    assert not any("delta" in key.split(".")[-1] for key in param_space), "delta is not swept"
    for _ in range(200):
        point = {k: dom.sample() for k, dom in param_space.items()}
        t_prior = point.pop(PRIOR_TEMPERATURE, None)
        assert t_prior is None or t_prior > 0
        s = settings_with(MethodSettings(), point)
        cfg = cache_config_for("adaptive", s, env="textworld")  # the cache configs validate
        for key, value in point.items():
            head, _, leaf = key.partition(".")
            got = getattr(getattr(s, head), leaf) if leaf else getattr(s, head)
            assert got == pytest.approx(value, abs=0.5), key
        assert cfg.cache.correctness.delta == 0.05


def test_unknown_space_and_sweep_on_test_games_are_refused():
    with pytest.raises(ValueError, match="unknown search space"):
        space("everything")
    with pytest.raises(ValueError, match="never tune on the test games"):
        SweepConfig(split="test")
    with pytest.raises(ValueError, match="no cache"):
        SweepConfig(method="uncached")
    assert space_temperatures(space("prior_temperature")) == [0.25, 0.5, 1.0, 2.0]
    assert space_temperatures(space("cache_meta")) == []


def test_meta_reward_charges_queries_per_decision():
    assert meta_reward(0.5, 20, 100, 0.2) == pytest.approx(0.46)
    assert meta_reward(0.5, 100, 100, 0.2) == pytest.approx(0.3)
    assert meta_reward(0.5, 0, 0, 0.2) == pytest.approx(0.3)  # nothing decided: charged fully
    assert meta_reward(0.5, 100, 100, 0.0) == 0.5


def _result(tid, reward, steps=3000, **settings):
    return {
        "trial_id": tid,
        "metrics": {
            METRIC: reward,
            "success": 0.5,
            "queries_per_decision": 0.2,
            "hit_rate": 0.8,
            "env_steps": steps,
        },
        "config": settings,
        "budget": 3000,
    }


def test_trials_are_ranked_and_the_best_is_written_as_settings(tmp_path):
    results = [
        _result("a", 0.1, **{"meta.rho_min": 0.01}),
        _result("b", 0.4, **{"meta.rho_min": 0.02}),
        _result("c", 0.2, steps=1000, **{"meta.rho_min": 0.03}),
        {"trial_id": "d", "metrics": {}, "config": {"meta.rho_min": 0.04}, "budget": 3000},
    ]
    rows = trial_rows(results)
    assert [r["trial_id"] for r in rows] == ["b", "c", "a"]
    assert rows[1]["stopped_early"] and not rows[0]["stopped_early"]
    table = top_table(rows, k=2, protocol="protocol line")
    assert table.startswith("protocol line") and "meta.rho_min" in table
    assert table.count("\n| ") == 3  # header + 2 rows
    best = best_record(SweepConfig(), rows)
    assert best["trial_id"] == "b" and best["settings"] == {"meta.rho_min": 0.02}
    path = tmp_path / "best.json"
    path.write_text(json.dumps(best))
    assert read_settings_file(path) == {"meta.rho_min": 0.02}
    assert objective_plot(rows, tmp_path / "objective.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="no trial reported"):
        best_record(SweepConfig(), [])


def test_tied_trials_rank_the_same_in_any_order():
    tied = [
        _result("z", 0.3, **{"meta.rho_min": 0.01}),
        _result("y", 0.3, **{"meta.rho_min": 0.02}),
    ]
    assert [r["trial_id"] for r in trial_rows(tied)] == ["y", "z"]
    assert [r["trial_id"] for r in trial_rows(tied[::-1])] == ["y", "z"]


def test_settings_file_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_settings_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        read_settings_file(bad)
    bad.write_text(json.dumps({"best": 1}))
    with pytest.raises(ValueError, match="no 'settings'"):
        read_settings_file(bad)


def _suite_rows(method, seeds, success_by_seed, queries):
    return [
        {
            "method": method,
            "seed": s,
            "train_lm_queries": queries,
            "train_env_steps": 1000,
            "per_game_success": dict(zip(["g1", "g2", "g3"], success_by_seed[i], strict=True)),
        }
        for i, s in enumerate(seeds)
    ]


def test_confirmation_compares_tuned_and_default_paired_on_meta_reward():
    seeds = [100, 101]
    default = _suite_rows("adaptive", seeds, [[1, 0, 0], [0, 1, 0]], 500)
    tuned = _suite_rows("adaptive", seeds, [[1, 0, 0], [0, 1, 0]], 100)  # same wins, fewer calls
    rep = confirmation_report(
        default, tuned, method="adaptive", games=["g1", "g2", "g3"], seeds=seeds, lambda_q=0.2,
        reps=200,
    )  # fmt: skip
    # same success; meta-reward better by 0.2 * (0.5 - 0.1) = 0.08 in every cell
    assert rep["success"]["difference"]["value"] == pytest.approx(0.0)
    diff = rep[METRIC]["difference"]
    assert diff["value"] == pytest.approx(0.08) and diff["low"] == pytest.approx(0.08)
    assert rep["tuned_queries_per_decision"] == pytest.approx(0.1)
    assert rep["default_queries_per_decision"] == pytest.approx(0.5)
    worse = _suite_rows("adaptive", seeds, [[0, 0, 0], [0, 0, 0]], 100)
    rep = confirmation_report(
        default, worse, method="adaptive", games=["g1", "g2", "g3"], seeds=seeds, lambda_q=0.2,
        reps=200,
    )  # fmt: skip
    assert rep[METRIC]["difference"]["value"] < 0


def test_confirmation_refuses_runs_that_miss_a_seed():
    default = _suite_rows("adaptive", [100], [[1, 0, 0]], 500)
    with pytest.raises(ValueError, match="do not cover"):
        confirmation_report(
            default, default, method="adaptive", games=["g1"], seeds=[100, 101], lambda_q=0.2
        )
    assert meta_reward_matrix(default, "adaptive", ["g1"], [101], 0.2) is None
