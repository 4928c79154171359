"""Meta-update directions and projection (see docs/cache.md), and the temperature schedule
(see docs/algorithms.md)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from cachellm_rl.cache.meta import (
    CacheParams,
    MetaConfig,
    SPSATau,
    WindowSignals,
    heuristic_update,
    posterior_temperature,
    project,
)

CFG = MetaConfig(stale_signal="kl")
P = CacheParams(1000, 0.9, 0.1)


def sig(**kw):
    base = dict(
        decisions=500,
        hit_rate=0.9,
        refresh_kl=0.01,
        capacity_miss_rate=0.0,
        unused_fraction=0.0,
        lm_queries=50,
        return_trend=None,
    )
    base.update(kw)
    return WindowSignals(**base)


def test_tau_rises_when_refresh_kl_is_high():
    new = heuristic_update(P, sig(refresh_kl=1.0), CFG)
    assert new.min_cosine_similarity > P.min_cosine_similarity
    assert new.refresh_probability > P.refresh_probability


def test_tau_falls_when_kl_low_and_hit_rate_low():
    new = heuristic_update(P, sig(refresh_kl=0.0, hit_rate=0.2), CFG)
    assert new.min_cosine_similarity < P.min_cosine_similarity
    assert new.refresh_probability < P.refresh_probability


def test_tau_holds_when_kl_low_and_hit_rate_high():
    new = heuristic_update(P, sig(refresh_kl=0.0, hit_rate=0.95), CFG)
    assert new.min_cosine_similarity == P.min_cosine_similarity


def test_capacity_follows_capacity_misses_and_unused_entries():
    up = heuristic_update(P, sig(capacity_miss_rate=0.1), CFG)
    assert up.capacity_entries == round(1000 * (1 + CFG.capacity_gain * 0.1))
    down = heuristic_update(P, sig(unused_fraction=0.9), CFG)
    assert down.capacity_entries < 1000
    # a cache below K has no memory to release: unused entries there do not shrink K
    held = heuristic_update(P, sig(unused_fraction=0.9, fill_fraction=0.5), CFG)
    assert held.capacity_entries == 1000
    full = heuristic_update(P, sig(unused_fraction=0.9, fill_fraction=CFG.full_fraction), CFG)
    assert full.capacity_entries < 1000
    with pytest.raises(ValueError, match="full_fraction"):
        MetaConfig(full_fraction=0.0)


def test_rho_rises_when_return_falls():
    new = heuristic_update(P, sig(return_trend=-1.0), CFG)
    assert new.refresh_probability > P.refresh_probability


def test_nan_kl_uses_only_the_hit_rate_rule():
    assert (
        heuristic_update(P, sig(refresh_kl=math.nan, hit_rate=0.1), CFG).min_cosine_similarity < 0.9
    )


def test_error_rate_signal_drives_tau_and_rho():
    cfg = MetaConfig(target_refresh_error_rate=0.3)
    up = heuristic_update(P, sig(refresh_kl=5.0, refresh_error_rate=0.6), cfg)
    assert up.min_cosine_similarity > 0.9 and up.refresh_probability > 0.1
    # a high KL alone (peaked priors disagreeing about unlikely actions) is not staleness
    calm = heuristic_update(P, sig(refresh_kl=5.0, refresh_error_rate=0.1, hit_rate=0.5), cfg)
    assert calm.min_cosine_similarity < 0.9 and calm.refresh_probability < 0.1
    unknown = heuristic_update(P, sig(refresh_kl=5.0, hit_rate=0.5), cfg)  # no refresh yet
    assert unknown.min_cosine_similarity < 0.9


def test_meta_config_rejects_bad_signal_settings():
    with pytest.raises(ValueError, match="stale_signal"):
        MetaConfig(stale_signal="loss")
    with pytest.raises(ValueError, match="target_refresh_error_rate"):
        MetaConfig(target_refresh_error_rate=1.5)


def test_projection_ranges():
    hi = project(CacheParams(10**9, 2.0, 3.0), CFG)
    lo = project(CacheParams(1, -5.0, -1.0), CFG)
    assert (hi.capacity_entries, hi.min_cosine_similarity, hi.refresh_probability) == (
        10**6,
        0.995,
        0.5,
    )
    assert (lo.capacity_entries, lo.min_cosine_similarity, lo.refresh_probability) == (
        64,
        0.80,
        0.0,
    )
    p = CacheParams(64, 0.995, 0.5)
    for _ in range(20):
        p = heuristic_update(p, sig(refresh_kl=5.0, capacity_miss_rate=0.0), CFG)
    assert p.min_cosine_similarity == 0.995 and p.refresh_probability == 0.5


def test_bad_meta_config():
    with pytest.raises(ValueError, match="mode"):
        MetaConfig(mode="magic")
    with pytest.raises(ValueError, match="tau"):
        MetaConfig(tau_min=0.99, tau_max=0.9)


@pytest.mark.parametrize("better", [+1, -1])
def test_spsa_steps_toward_the_better_side(better):
    cfg = MetaConfig(mode="spsa", window_decisions=100, spsa_delta=0.01, spsa_learning_rate=0.01)
    spsa = SPSATau(cfg)
    spsa.record(+1, decisions=50, lm_queries=10)
    spsa.record(-1, decisions=50, lm_queries=10)
    spsa.record_returns(better, [1.0, 1.0])
    spsa.record_returns(-better, [0.0, 0.0])
    new = spsa.maybe_step(0.9)
    assert np.sign(new - 0.9) == better and spsa.steps == 1


def test_spsa_single_caller_alternates_signs():
    spsa = SPSATau(MetaConfig(mode="spsa", window_decisions=10))
    assert spsa.sign_for(None) == +1
    spsa.record(+1, decisions=5)
    assert spsa.maybe_step(0.9) == 0.9 and spsa.sign_for(None) == -1
    # Two callers split by order of arrival, whatever their ids' parity.
    assert spsa.sign_for(1) == -1  # still one caller: the single-caller sign
    assert spsa.sign_for(3) == -1 and spsa.sign_for(1) == +1


def test_spsa_steps_with_one_numbered_env_runner():
    """One env runner (caller id 0) must still produce both signs and a step; the + side
    queries the LM more, so the step goes down."""
    spsa = SPSATau(MetaConfig(mode="spsa", window_decisions=10, spsa_learning_rate=0.05))
    value, signs = 0.9, []
    for _ in range(4):
        sign = spsa.sign_for(0)
        signs.append(sign)
        spsa.record(sign, decisions=5, lm_queries=5 if sign > 0 else 0)
        value = spsa.maybe_step(value)
    assert set(signs) == {+1, -1}
    assert spsa.steps == 2 and value < 0.9


def test_spsa_perturbs_the_exploration_rate_under_the_delta_rule():
    spsa = SPSATau(MetaConfig(mode="spsa", reuse_rule="delta", explore_min=0.0, explore_max=0.3))
    assert spsa.bounds() == (0.0, 0.3)


def test_temperature_schedule():
    assert posterior_temperature(0.0, t0=2.0, t_min=0.2) == pytest.approx(2.0)
    assert posterior_temperature(1.0, t0=2.0, t_min=0.2) == pytest.approx(0.2)
    ts = [posterior_temperature(h) for h in np.linspace(0, 1, 11)]
    assert all(a >= b for a, b in itertools.pairwise(ts))
    assert posterior_temperature(7.0) == posterior_temperature(1.0)
    with pytest.raises(ValueError):
        posterior_temperature(0.5, t0=0.0)


def test_delta_rule_tunes_exploration_not_tau():
    cfg = MetaConfig(reuse_rule="delta", target_refresh_error_rate=0.3)
    p = CacheParams(1000, 0.9, 0.1, 0.05)
    bad = heuristic_update(p, sig(served_label_error_rate=0.5, hit_rate=0.1), cfg)
    assert bad.explore_probability > 0.05 and bad.min_cosine_similarity == 0.9
    good = heuristic_update(p, sig(served_label_error_rate=0.0, hit_rate=0.1), cfg)
    assert good.explore_probability < 0.05 and good.min_cosine_similarity == 0.9
    floor = heuristic_update(CacheParams(1000, 0.9, 0.1, 0.0), sig(), cfg)
    assert floor.explore_probability == cfg.explore_min


def test_meta_state_round_trips():
    from cachellm_rl.cache.meta import MetaOptimizer

    m = MetaOptimizer(MetaConfig(mode="spsa", window_decisions=10))
    m.record_returns([1.0, 0.0])
    m.return_trend()
    m.spsa.sign_for(7)
    m.spsa.sign_for(3)
    m.spsa.steps = 4
    m.history.append({"K": 5.0})
    again = MetaOptimizer(MetaConfig(mode="spsa", window_decisions=10))
    again.load_state(m.state_dict())
    assert again.state_dict() == m.state_dict()
    assert again.spsa.sign_for(3) == m.spsa.sign_for(3) == -1
