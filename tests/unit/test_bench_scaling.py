"""The scaling benchmark's summaries and argument checks."""

from __future__ import annotations

import math

import pytest

from experiments.bench_scaling import (
    batch_size_summary,
    combine_cache_stats,
    latency_summary,
    parse_args,
    sharing_ratios,
)


def test_isolated_caches_are_summed_before_the_hit_rate_is_taken():
    # a busy cache with few hits and an idle one with many: the rate is over all decisions
    c = combine_cache_stats(
        [
            {"decisions": 90, "lm_queries": 80, "hits_exact": 10, "hits_semantic": 0},
            {"decisions": 10, "lm_queries": 0, "hits_exact": 5, "hits_semantic": 5},
        ]
    )
    assert c["hits"] == 20 and c["decisions"] == 100 and c["lm_queries"] == 80
    assert c["hit_rate"] == pytest.approx(0.2)  # not the mean of 0.11 and 1.0
    assert math.isnan(combine_cache_stats([])["hit_rate"])


def test_shared_over_isolated_ratios_pair_rows_by_runner_count():
    rows = [
        {"runners": 1, "mode": "shared", "hit_rate": 0.5, "lm_per_1k_steps": 500.0},
        {"runners": 1, "mode": "isolated", "hit_rate": 0.5, "lm_per_1k_steps": 500.0},
        {"runners": 8, "mode": "shared", "hit_rate": 0.7, "lm_per_1k_steps": 300.0},
        {"runners": 8, "mode": "isolated", "hit_rate": 0.35, "lm_per_1k_steps": 650.0},
        {"runners": 4, "mode": "shared", "hit_rate": 0.6, "lm_per_1k_steps": 400.0},
    ]
    ratios = {r["runners"]: r for r in sharing_ratios(rows)}
    assert set(ratios) == {1, 8}  # 4 has no isolated row yet
    assert ratios[1]["hit_rate_ratio"] == 1.0
    assert ratios[8]["hit_rate_ratio"] == pytest.approx(2.0)
    assert ratios[8]["lm_queries_ratio"] == pytest.approx(300 / 650, abs=1e-4)


def test_batch_and_latency_summaries():
    b = batch_size_summary([1, 3, 3, 1])
    assert b["batches"] == 4 and b["mean"] == 2 and b["max"] == 3
    assert b["batched_request_share"] == pytest.approx(6 / 8)
    assert math.isnan(batch_size_summary([])["mean"])
    lat = latency_summary(list(range(1, 101)))
    assert lat["p50_ms"] == pytest.approx(50.5) and lat["p99_ms"] == pytest.approx(99.01)


@pytest.mark.parametrize(
    "argv",
    [["--method", "uncached"], ["--runners", "0,2"], ["--callers", ""], ["--capacity", "0"]],
)
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
