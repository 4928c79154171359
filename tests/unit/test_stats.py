"""Bootstrap aggregates (rliable): reproducible for a seed, memoised, exact for constants."""

from __future__ import annotations

import numpy as np
import pytest

from cachellm_rl import stats

SCORES = (np.random.default_rng(0).random((3, 6)) > 0.5).astype(float)


@pytest.fixture(autouse=True)
def _fresh_memo():
    stats._MEMO.clear()
    yield
    stats._MEMO.clear()


def test_an_interval_depends_on_its_seed_not_on_numpys_global_generator():
    np.random.seed(1)
    first = stats.mean_interval(SCORES, reps=300)
    stats._MEMO.clear()
    np.random.seed(2)
    state = np.random.get_state()
    assert stats.mean_interval(SCORES, reps=300) == first
    assert np.array_equal(np.random.get_state()[1], state[1])  # the global state is restored
    stats._MEMO.clear()
    assert stats.mean_interval(SCORES, reps=300, seed=1) != first  # another seed, other draws
    assert first.low < first.value < first.high


def test_repeated_estimates_come_from_the_memo(monkeypatch):
    from rliable import library as rly

    calls = []
    real = rly.get_interval_estimates
    monkeypatch.setattr(
        rly, "get_interval_estimates", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    a = stats.iqm_interval(SCORES, reps=200)
    assert stats.iqm_interval(SCORES.copy(), reps=200) == a and len(calls) == 1
    stats.iqm_interval(SCORES, reps=300)  # other reps: a new estimate
    assert len(calls) == 2
    draws = []
    real_poi = stats._poi_bootstrap
    monkeypatch.setattr(
        stats, "_poi_bootstrap", lambda *a, **k: draws.append(1) or real_poi(*a, **k)
    )
    b = 1.0 - SCORES
    stats.probability_of_improvement(SCORES, b, reps=200)
    stats.probability_of_improvement(SCORES, b, reps=200)
    assert len(draws) == 1


def test_probability_of_improvement_resamples_games_even_with_one_seed():
    """rliable's interval for P(improvement) resamples seeds only: with one seed it collapses
    to a point. Ours resamples games (paired) too, so it is an interval over the same
    (game, seed) population as the success CIs, and it narrows with more games."""
    from rliable import metrics

    rng = np.random.default_rng(3)
    a = (rng.random((1, 30)) < 0.6).astype(float)
    b = (rng.random((1, 30)) < 0.3).astype(float)
    iv = stats.probability_of_improvement(a, b, reps=2000)
    assert iv.value == pytest.approx(float(metrics.probability_of_improvement(a, b)))
    assert iv.low < iv.value < iv.high and iv.high - iv.low > 0.1
    many_a, many_b = np.tile(a, (1, 8)), np.tile(b, (1, 8))  # 240 games, same proportions
    wide = stats.probability_of_improvement(many_a, many_b, reps=2000)
    assert wide.value == pytest.approx(iv.value)
    assert wide.high - wide.low < 0.6 * (iv.high - iv.low)
    same = stats.probability_of_improvement(a, a.copy(), reps=500)
    assert (same.low, same.value, same.high) == (0.5, 0.5, 0.5)  # one seed, no difference


def test_constant_scores_need_no_bootstrap(monkeypatch):
    from rliable import library as rly

    monkeypatch.setattr(rly, "get_interval_estimates", lambda *a, **k: pytest.fail("bootstrapped"))
    assert stats.mean_interval(np.zeros((2, 5))).as_dict() == {"value": 0, "low": 0, "high": 0}
    assert stats.iqm_interval(np.ones((3, 4))) == stats.Interval(1.0, 1.0, 1.0)
