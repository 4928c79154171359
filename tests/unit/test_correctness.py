"""Reuse labels, the correctness model and the delta reuse rule (see docs/cache.md) without Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cachellm_rl.cache.adaptive import AdaptiveCache
from cachellm_rl.cache.correctness import (
    CorrectnessConfig,
    CorrectnessModel,
    fit_logistic,
    make_label,
    reuse_is_correct,
    tv_distance,
)
from cachellm_rl.contracts import HitTier, PriorResponse
from tests.helpers import query, small_config, unit

E = np.eye(8, dtype=np.float32)


def resp(p, version="v1"):
    lp = np.log(np.asarray(p, np.float64))
    lp -= np.log(np.exp(lp).sum())
    return PriorResponse(logp=lp.astype(np.float32), model_version=version)


def near(i: int, sim: float) -> np.ndarray:
    """A unit vector at cosine ``sim`` from basis vector ``i`` (towards axis 7)."""
    return unit(sim * E[i] + np.sqrt(1 - sim**2) * E[7])


def delta_cache(**corr) -> AdaptiveCache:
    base = {
        "min_labels": 20,
        "explore_probability": 0.0,
        "guard_explore_probability": 0.0,
        "refit_every": 1,
    }
    base.update(corr)
    return AdaptiveCache(
        small_config(reuse_rule="delta", correctness=CorrectnessConfig(**base)), model_version="v1"
    )


# -- labels ------------------------------------------------------------------------------------
def test_a_label_needs_the_same_top_action_and_a_small_tv():
    fresh = np.log([0.6, 0.3, 0.1])
    assert reuse_is_correct(fresh, np.log([0.65, 0.25, 0.1]), 0.2)
    assert not reuse_is_correct(fresh, np.log([0.3, 0.6, 0.1]), 1.0)  # other top action
    assert not reuse_is_correct(fresh, np.log([0.98, 0.01, 0.01]), 0.2)  # same top, TV 0.38
    assert tv_distance(fresh, np.log([0.98, 0.01, 0.01])) == pytest.approx(0.38)
    lab = make_label(fresh, np.log([0.98, 0.01, 0.01]), 0.97, max_tv=0.5, source="miss")
    assert lab.correct and lab.same_top and lab.similarity == pytest.approx(0.97)
    with pytest.raises(ValueError, match="cannot be compared"):
        reuse_is_correct(fresh, np.log([0.5, 0.5]), 0.2)


def test_a_miss_is_labelled_against_its_nearest_usable_neighbour():
    c = delta_cache()
    c.insert(query("s0", E[0]), resp([0.7, 0.2, 0.1]))
    q_same = query("q1", near(0, 0.98))
    lab = c.record_label(q_same, resp([0.6, 0.3, 0.1]).logp, source="miss")
    assert lab is not None and lab.correct and lab.similarity == pytest.approx(0.98, abs=1e-5)
    assert lab.query_text == "text of q1" and lab.neighbour_text == "text of s0"
    lab2 = c.record_label(query("q2", near(0, 0.95)), resp([0.1, 0.8, 0.1]).logp, source="miss")
    assert lab2 is not None and not lab2.correct and not lab2.same_top
    assert c.stats.labels == 2 and c.stats.labels_wrong == 1 and c.correctness.num_labels == 2
    # No neighbour covering the candidates: no label.
    other = query("q3", near(0, 0.99), ("x", "y", "z"))
    assert c.record_label(other, np.log([1 / 3] * 3), source="miss") is None
    # An audit is stored but never trains the model that decides.
    c.record_label(query("q4", near(0, 0.97)), resp([0.6, 0.3, 0.1]).logp, source="audit")
    assert c.correctness.num_labels == 2 and len(c.labels) == 3


# -- the logistic fit ---------------------------------------------------------------------------
def test_the_logistic_fit_recovers_a_known_curve_and_its_bound_shrinks_with_data():
    rng = np.random.default_rng(1)
    true = np.array([0.5, 1.5])

    def sample(n):
        s = rng.uniform(0.8, 1.0, n)
        p = 1 / (1 + np.exp(-(true[0] + true[1] * (s - 0.9) / 0.05)))
        return s, rng.random(n) < p

    s, y = sample(8000)
    fit = fit_logistic(s, y, prior_precision=1e-6)
    np.testing.assert_allclose(fit.theta, true, atol=0.15)
    se = np.sqrt(np.diag(fit.cov))
    assert np.all(np.abs(fit.theta - true) < 4 * se)  # the covariance is honest
    small = fit_logistic(*sample(200), prior_precision=1e-6)
    gap_small = float(small.p_wrong_ucb(0.95, 1.645) - (1 - small.p_correct(0.95)))
    gap_big = float(fit.p_wrong_ucb(0.95, 1.645) - (1 - fit.p_correct(0.95)))
    assert gap_small > gap_big > 0


def test_the_rule_serves_nothing_before_enough_labels():
    m = CorrectnessModel(CorrectnessConfig(min_labels=30, refit_every=1))
    for _ in range(29):
        m.record(0.99, True)
    assert m.pooled_fit() is None and m.p_wrong_ucb(0.999) == 1.0 and not m.allows(0.999)
    for _ in range(400):
        m.record(0.99, True)
    assert m.allows(0.99)


def test_the_rule_never_serves_where_the_bound_fails():
    rng = np.random.default_rng(0)
    m = CorrectnessModel(CorrectnessConfig(min_labels=30, refit_every=1, delta=0.05))
    for _ in range(2000):  # true P(wrong) is 10% everywhere: above delta
        m.record(float(rng.uniform(0.85, 1.0)), bool(rng.random() > 0.10))
    assert not any(m.allows(s) for s in np.linspace(0.5, 1.0, 51))
    m2 = CorrectnessModel(CorrectnessConfig(min_labels=30, refit_every=1, delta=0.05))
    for _ in range(3000):  # wrong below 0.95, right above
        s = float(rng.uniform(0.85, 1.0))
        m2.record(s, s >= 0.95)
    served = [s for s in np.linspace(0.85, 1.0, 151) if m2.allows(s)]
    assert served and min(served) >= 0.95  # served only where reuse was right
    for s in served:
        assert m2.p_wrong_ucb(s) <= 0.05


def test_an_entry_with_enough_labels_gets_its_own_curve():
    cfg = CorrectnessConfig(
        min_labels=30, entry_min_labels=20, refit_every=1, pooled_max_labels=10_000
    )
    m = CorrectnessModel(cfg)
    for s in np.linspace(0.9, 1.0, 4000):
        m.record(float(s), True)
    assert m.allows(0.97, entry_id=5)
    for _ in range(19):
        m.record(0.97, False, entry_id=5)  # this entry misleads at 0.97
    assert m.fit_for(5) is m.pooled_fit()
    m.record(0.97, False, entry_id=5)
    assert m.fit_for(5) is not m.pooled_fit()
    assert not m.allows(0.97, entry_id=5) and m.allows(0.97, entry_id=6)
    m.forget_entry(5)
    assert m.entry_label_count(5) == 0


# -- the delta rule inside the cache -----------------------------------------------------------
def _train(c: AdaptiveCache, n: int, correct_above: float) -> None:
    """Labels wrong below ``correct_above`` and right above it; those above it are also what
    exploration of the served region would have measured (on-policy, all right)."""
    rng = np.random.default_rng(0)
    for _ in range(n):
        s = float(rng.uniform(0.85, 1.0))
        c.correctness.record(s, s >= correct_above, on_policy=s >= correct_above)


def test_the_cache_serves_semantic_hits_only_once_the_rule_allows():
    c = delta_cache()
    c.insert(query("s0", E[0]), resp([0.7, 0.2, 0.1]))
    q = query("q", near(0, 0.999))
    assert c.lookup(q).tier is HitTier.MISS  # no labels yet, however close
    assert c.stats.semantic_refused == 1
    _train(c, 3000, correct_above=0.95)
    assert c.lookup(q).tier is HitTier.SEMANTIC
    assert c.lookup(query("q2", near(0, 0.92))).tier is HitTier.MISS
    # tau plays no part under the delta rule
    c.set_params(min_cosine_similarity=1.0)
    assert c.lookup(q).tier is HitTier.SEMANTIC


def test_every_served_semantic_hit_satisfies_the_bound():
    c = delta_cache()
    for i in range(6):
        c.insert(query(f"s{i}", E[i]), resp([0.7, 0.2, 0.1]))
    _train(c, 2000, correct_above=0.96)
    rng = np.random.default_rng(3)
    served = 0
    for j in range(300):
        r = c.lookup(query(f"r{j}", near(int(rng.integers(6)), float(rng.uniform(0.85, 1.0)))))
        if r.tier is HitTier.SEMANTIC:
            served += 1
            assert r.similarity is not None
            assert c.correctness.p_wrong_ucb(r.similarity, r.entry_id) <= 0.05
    assert served > 0


def test_a_servable_hit_is_explored_with_the_exploration_probability():
    c = delta_cache(explore_probability=1.0)
    c.insert(query("s0", E[0]), resp([0.7, 0.2, 0.1]))
    _train(c, 3000, correct_above=0.95)
    r = c.lookup(query("q", near(0, 0.99)))
    assert r.tier is HitTier.MISS and r.explore and r.entry_id >= 0
    assert c.stats.explore_calls == 1
    lab = c.record_label(
        query("q", near(0, 0.99)),
        resp([0.7, 0.2, 0.1]).logp,
        source="explore",
        entry_id=r.entry_id,
        similarity=r.similarity,
    )
    assert lab is not None and lab.correct and c.window.served_labels == 1


def test_coalesced_answers_count_as_reuse():
    c = delta_cache()
    c.lookup(query("a", None))
    c.lookup(query("b", None))
    assert c.stats.misses == 2
    c.record_coalesced(semantic=False)
    c.record_coalesced(semantic=True)
    s = c.snapshot_stats()
    assert (s.misses, s.hits_exact, s.hits_semantic) == (0, 1, 1)
    assert (s.coalesced_exact, s.coalesced_semantic, s.coalesced_misses) == (1, 1, 2)
    assert s.hit_rate == 1.0


def test_a_new_prior_version_resets_the_labels():
    c = delta_cache()
    c.insert(query("s0", E[0]), resp([0.7, 0.2, 0.1]))
    _train(c, 100, correct_above=0.9)
    c.insert(query("s1", E[1]), resp([0.7, 0.2, 0.1], version="v2"))
    assert c.correctness.num_labels == 0


# -- the on-policy guard ------------------------------------------------------------------------
def test_the_guard_opens_only_on_enough_right_on_policy_labels():
    m = CorrectnessModel(CorrectnessConfig(delta=0.05, guard_alpha=0.05, guard_close_after=2))
    right, _wrong, opening, cap = m.guard_steps()
    need = math.ceil(opening / right)  # log(20) / log(0.975 / 0.95): 116 right labels
    assert need == 116 and not m.guard_open()
    for _ in range(2000):  # labels of misses do not open it, however right
        m.record(0.99, True)
    assert not m.guard_open() and m.served_labels == 0
    for _ in range(need - 1):
        m.record(0.99, True, on_policy=True)
    assert not m.guard_open()
    m.record(0.99, True, on_policy=True)
    assert m.guard_open()
    for _ in range(500):  # evidence is capped: a shift shows within guard_close_after labels
        m.record(0.99, True, on_policy=True)
    assert m.guard_llr == pytest.approx(cap)
    m.record(0.99, False, on_policy=True)
    assert m.guard_open() and m.guard_closures == 0
    m.record(0.99, False, on_policy=True)
    assert not m.guard_open() and m.guard_closures == 1
    assert m.guard_llr <= 0.0  # a closed guard reopens only on a full test's evidence
    for _ in range(300):  # a bad past costs at most twice the opening evidence
        m.record(0.99, False, on_policy=True)
    assert m.guard_llr == pytest.approx(-opening)
    r = CorrectnessModel.from_state(m.state_dict())
    assert (r.served_labels, r.served_wrong) == (m.served_labels, m.served_wrong)
    assert r.guard_llr == m.guard_llr and not r.guard_open() and r.guard_closures == 1
    # a snapshot of the earlier, windowed guard (its config had a window): its on-policy
    # labels are replayed through the test
    old = {k: v for k, v in m.state_dict().items() if k not in ("guard_llr", "served_labels")}
    old["config"] = {k: v for k, v in old["config"].items() if not k.startswith("guard_")} | {
        "served_window": 300,
        "served_recent": 20,
    }
    old["served"] = [True] * need
    assert CorrectnessModel.from_state(old).guard_open()
    assert not CorrectnessModel.from_state({**old, "served": [True] * (need - 1)}).guard_open()
    # a saved ratio is kept within the bounds of the config it is restored into
    at_cap = CorrectnessModel(CorrectnessConfig(guard_close_after=4))
    at_cap.guard_llr = at_cap.guard_steps()[3]
    tight = CorrectnessModel.from_state(at_cap.state_dict(), CorrectnessConfig(guard_close_after=1))
    assert tight.guard_llr == pytest.approx(tight.guard_steps()[3])
    tight.record(0.99, False, on_policy=True)
    assert not tight.guard_open()
    off = CorrectnessModel(CorrectnessConfig(served_guard=False))
    assert off.guard_open()


def test_the_guard_rarely_opens_on_served_reuse_wrong_at_delta():
    """Read after every label, a fixed-level interval on a sliding window opens by chance on a
    long enough stream whose wrong share is delta (about one stream in four of 600 labels);
    the sequential test opens with probability at most guard_alpha."""
    rng = np.random.default_rng(0)
    opened = 0
    for _ in range(200):
        m = CorrectnessModel(CorrectnessConfig(delta=0.05, guard_alpha=0.05))
        for w in rng.random(600) < 0.05:
            m.record(0.99, not w, on_policy=True)
            if m.guard_open():
                opened += 1
                break
    assert opened / 200 <= 0.08
    # and at a quarter of delta it opens in every stream
    m = CorrectnessModel(CorrectnessConfig(delta=0.05))
    for w in rng.random(1000) < 0.0125:
        m.record(0.99, not w, on_policy=True)
    assert m.guard_open()


def _cache_with_certain_curve(**corr) -> AdaptiveCache:
    """A delta cache holding s0 whose curve (labels of misses, right above 0.95, none of them
    on-policy) allows a semantic hit at 0.99."""
    c = delta_cache(**corr)
    c.insert(query("s0", E[0]), resp([0.7, 0.2, 0.1]))
    rng = np.random.default_rng(0)
    for _ in range(3000):
        s = float(rng.uniform(0.85, 1.0))
        c.correctness.record(s, s >= 0.95)
    assert c.correctness.allows(0.99, 0)
    return c


def test_the_guard_sends_what_the_curve_certifies_to_the_lm_until_served_reuse_is_right():
    c = _cache_with_certain_curve(guard_explore_probability=0.0)
    r = c.lookup(query("q", near(0, 0.99)))
    assert r.tier is HitTier.MISS and r.explore and r.entry_id == 0
    assert c.stats.guard_held == 1 and c.stats.explore_calls == 1
    assert c.lookup(query("q", near(0, 0.99)), update=False).tier is HitTier.MISS  # a peek
    # the full path: the held lookups' LM answers agree with s0's prior, as labels of their own
    # (on-policy), and the guard opens once they bound the served error under delta
    k = 0
    while c.lookup(query(f"x{k}", near(0, 0.99))).tier is HitTier.MISS:
        lab = c.record_label(
            query(f"x{k}", near(0, 0.99)),
            resp([0.7, 0.2, 0.1]).logp,
            source="explore",
            entry_id=0,
            similarity=0.99,
        )
        assert lab is not None and lab.correct
        k += 1
        assert k < 200
    assert c.correctness.served_labels == k and k == 116  # see the test above
    assert c.stats.guard_held == k + 1


def test_the_guard_holds_back_what_on_policy_labels_show_wrong():
    c = _cache_with_certain_curve()
    for k in range(100):  # what the curve would serve is wrong one time in five
        c.correctness.record(0.999, k % 5 != 0, on_policy=True)
    assert c.correctness.allows(0.99, 0) and not c.correctness.guard_open()
    r = c.lookup(query("q2", near(0, 0.99)))
    assert r.tier is HitTier.MISS and r.explore and c.stats.guard_held == 1
    # without the guard the curve alone serves
    c2 = _cache_with_certain_curve(served_guard=False)
    for k in range(100):
        c2.correctness.record(0.999, k % 5 != 0, on_policy=True)
    assert c2.lookup(query("q2", near(0, 0.99))).tier is HitTier.SEMANTIC


def test_the_guard_floors_the_exploration_rate_the_cache_applies():
    c = delta_cache(guard_explore_probability=0.1)
    c.set_params(explore_probability=0.01)  # as the meta-optimiser might
    assert c.explore_probability == 0.1
    c.set_params(explore_probability=0.15)
    assert c.explore_probability == 0.15
    off = delta_cache(guard_explore_probability=0.1, served_guard=False)
    off.set_params(explore_probability=0.01)
    assert off.explore_probability == 0.01


def test_a_snapshot_config_of_the_windowed_guard_still_loads():
    from cachellm_rl.cache.adaptive import CacheConfig

    stored = {"dim": 8, "reuse_rule": "delta", "correctness": {"delta": 0.05, "served_window": 300}}
    assert CacheConfig(**stored).correctness.delta == 0.05


def test_an_open_guard_keeps_reading_what_is_served():
    c = _cache_with_certain_curve(guard_explore_probability=1.0)
    c.correctness.guard_llr = c.correctness.guard_steps()[3]  # open, at its cap
    r = c.lookup(query("q", near(0, 0.99)))
    assert r.tier is HitTier.MISS and r.explore and c.stats.guard_held == 0
    c2 = _cache_with_certain_curve(guard_explore_probability=1.0, served_guard=False)
    assert c2.lookup(query("q", near(0, 0.99))).tier is HitTier.SEMANTIC


def test_an_on_policy_wrong_label_stops_its_entry_serving_there():
    c = _cache_with_certain_curve(served_guard=False)
    assert c.lookup(query("q", near(0, 0.99))).tier is HitTier.SEMANTIC
    lab = c.record_label(
        query("q1", near(0, 0.99)),
        resp([0.1, 0.2, 0.7]).logp,  # the LM disagrees with s0's prior
        source="explore",
        entry_id=0,
        similarity=0.99,
    )
    assert lab is not None and not lab.correct and c.stats.radius_narrowed == 1
    assert c.lookup(query("q2", near(0, 0.99))).tier is HitTier.MISS
    assert c.lookup(query("q3", near(0, 0.999))).tier is HitTier.SEMANTIC  # above the floor
    # a label of a miss (off-policy) does not narrow
    c.record_label(query("q4", near(0, 0.995)), resp([0.1, 0.2, 0.7]).logp, source="miss")
    assert c.stats.radius_narrowed == 1


def _stream(shift_at: int, n: int = 8000) -> list[tuple[float, bool] | None]:
    """Lookups at cosine U(0.85, 1): reuse right above 0.95 and wrong below it, until
    ``shift_at``; from there on also wrong on one reuse in five above 0.95."""
    rng = np.random.default_rng(1)
    pairs: list[tuple[float, bool] | None] = []
    for i in range(n):
        s = float(rng.uniform(0.85, 1.0))
        pairs.append((s, s >= 0.95 and (i < shift_at or rng.random() > 0.2)))
    return pairs


def test_the_guard_keeps_served_error_down_where_the_labels_of_misses_mislead():
    """The replay of the delta rule as the cache runs it. The curve is fitted on every label,
    most of them from misses below the served region, which never show that served reuses
    are wrong one time in five; only on-policy labels (exploration, and the guard's own) do."""
    from cachellm_rl.cache.fidelity import simulate_delta_on

    base = {"delta": 0.05, "min_labels": 50, "explore_probability": 0.05, "refit_every": 10}

    def run(shift_at: int, guard: bool):
        cfg = CorrectnessConfig(**base, served_guard=guard)
        return simulate_delta_on(_stream(shift_at), cfg, seed=0)

    # served reuse wrong from the start: the curve alone serves it, the guard never opens
    assert run(0, False).served > 500 and run(0, False).served_error_rate > 0.15
    assert run(0, True).served == 0
    # nothing misleads: the guard costs only its first on-policy labels and its exploration
    # (at least 1 in 10 of what it would serve, against 1 in 20 without it)
    ok_guarded, ok_free = run(10**6, True), run(10**6, False)
    assert ok_guarded.served >= 0.85 * ok_free.served and ok_guarded.served_wrong == 0
    # a shift half-way: caught within a few wrong on-policy labels
    shifted_guarded, shifted_free = run(4000, True), run(4000, False)
    assert shifted_free.served_error_rate > 0.08
    assert shifted_guarded.served_error_rate <= 0.05
    assert shifted_guarded.served_error_rate < shifted_free.served_error_rate / 2
    assert shifted_guarded.served_wrong < shifted_free.served_wrong / 3


# -- persistence --------------------------------------------------------------------------------
def test_a_snapshot_keeps_params_the_correctness_model_labels_and_versions(tmp_path):
    c = AdaptiveCache(
        small_config(reuse_rule="delta", correctness=CorrectnessConfig(min_labels=20)),
        model_version="v1",
        encoder_tag="enc-3",
    )
    c.insert(query("s0", E[0]), resp([0.7, 0.2, 0.1]))
    c.record_label(query("q", near(0, 0.97)), resp([0.6, 0.3, 0.1]).logp, source="miss")
    _train(c, 500, correct_above=0.94)
    c.set_params(capacity_entries=77, min_cosine_similarity=0.93, refresh_probability=0.07)
    c.set_params(explore_probability=0.11)
    c.save(tmp_path, extra={"meta": {"history": [{"K": 77}]}})
    r = AdaptiveCache.restore(tmp_path, c.config)
    assert (r.capacity_entries, r.min_cosine_similarity, r.refresh_probability) == (77, 0.93, 0.07)
    assert r.explore_probability == pytest.approx(0.11)
    assert r.encoder_tag == "enc-3" and r.model_version == "v1"
    assert r.correctness.num_labels == c.correctness.num_labels
    for s in (0.9, 0.95, 0.99):
        assert r.correctness.p_wrong_ucb(s) == pytest.approx(c.correctness.p_wrong_ucb(s))
    assert [x.query_text for x in r.labels.labels()] == ["text of q"]
    assert r.snapshot_stats().labels == 1
    assert AdaptiveCache.read_extra(tmp_path) == {"meta": {"history": [{"K": 77}]}}
    assert r._entries[next(iter(r._entries))].text == "text of s0"


# -- the fidelity replays -----------------------------------------------------------------------
def test_replays_measure_hit_rate_and_served_error():
    """Anchor states in random directions, each followed by a state at a chosen cosine from it:
    at cosine >= 0.95 reusing the anchor's prior is correct, below it wrong. The tau rule at
    0.7 serves every follower (two thirds of them wrongly); the delta rule learns where reuse is
    right from the replay's own labels and keeps its served error low."""
    from cachellm_rl.cache.client import TextState
    from cachellm_rl.cache.fidelity import reliability, simulate_delta, simulate_tau

    rng = np.random.default_rng(0)
    m, dim = 800, 64
    states, logps, embs = [], [], []

    def prior(top: int) -> np.ndarray:
        p = np.full(4, 0.04)
        p[top] = 0.88
        return np.log(p / p.sum())

    for _ in range(m):
        anchor = unit(rng.normal(size=dim))
        sim = float(rng.uniform(0.85, 1.0))
        noise = rng.normal(size=dim)
        noise = unit(noise - (noise @ anchor) * anchor)
        follower = unit(sim * anchor + np.sqrt(1 - sim**2) * noise)
        for emb, top in ((anchor, 0), (follower, 0 if sim >= 0.95 else 1)):
            states.append(TextState(observation=f"s{len(states)}", candidates=tuple("abcd")))
            logps.append(prior(top))
            embs.append(emb)
    emb = np.stack(embs)
    low, high = simulate_tau(states, logps, emb, [0.7, 0.9999])
    assert low.lookups == 2 * m - 1 and low.served == m
    assert 0.55 < low.served_error_rate < 0.75  # the followers below 0.95: two thirds
    assert high.served == 0
    d = simulate_delta(states, logps, emb, CorrectnessConfig(delta=0.05))
    # of the m / 3 servable followers, the guard's first 116 go to the LM as its labels
    assert d.served > 0.03 * m and d.labels >= 50
    assert d.served_wrong == 0 and d.served_error_wilson_hi < 0.15
    bins = {r["sim_lo"]: r for r in reliability(states, logps, emb)}
    assert bins[0.9]["correct"] == 0.0 and bins[0.9]["correct_hi"] < 0.05
    assert bins[0.95]["correct"] == 1.0 and bins[0.98]["correct"] == 1.0
    assert sum(r["n"] for r in bins.values()) == 2 * m - 1


def test_the_oracle_counts_a_lookup_servable_when_some_earlier_prior_is_a_correct_reuse():
    """Four states: s1 has no correct earlier reuse (its top differs from s0's), s2 has one
    (s0) and s3 has one (s1) that is not among the nearest under the embeddings, so the
    all-states oracle serves 2 of 3 lookups and the top-1 retrieval oracle only 1."""
    from cachellm_rl.cache.client import TextState
    from cachellm_rl.cache.fidelity import oracle_reuse

    def prior(top: int) -> np.ndarray:
        p = np.full(3, 0.05)
        p[top] = 0.9
        return np.log(p / p.sum())

    states = [TextState(observation=f"s{i}", candidates=("a", "b", "c")) for i in range(4)]
    logps = [prior(0), prior(1), prior(0), prior(1)]
    # s2 is nearest to s0 (correct); s3 is nearest to s0 and s2, whose top action is not its own
    emb = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0.6, 0, 0.8]])
    everything = oracle_reuse(states, logps)
    assert (everything.lookups, everything.served, everything.served_wrong) == (3, 2, 0)
    assert everything.hit_rate == pytest.approx(2 / 3)
    top1 = oracle_reuse(states, logps, emb, scan=1)
    assert top1.served == 1 and top1.rule == "oracle_top1"
    # the 2 nearest, not the first 2 visited nor the farthest: s3's are s0 and s2 (both wrong)
    assert oracle_reuse(states, logps, emb, scan=2).served == 1
    # a state with other candidates has no servable neighbour
    other = TextState(observation="s4", candidates=("x", "y", "z"))
    assert oracle_reuse([*states, other], [*logps, prior(0)]).served == 2
    # a prior that is close but not within max_tv is not a correct reuse
    logps[2] = np.log(np.array([0.55, 0.44, 0.01]))
    assert oracle_reuse(states, logps).served == 1


def test_a_snapshot_keeps_owner_blobs(tmp_path):
    c = AdaptiveCache(small_config(), model_version="v1", encoder_tag="decision-32-abc")
    c.insert(query("s0", E[0]), resp([0.7, 0.2, 0.1]))
    c.save(tmp_path, blobs={"encoder.bin": b"\x00weights"})
    assert AdaptiveCache.read_blob(tmp_path, "encoder.bin") == b"\x00weights"
    assert AdaptiveCache.read_blob(tmp_path, "other.bin") is None
    assert AdaptiveCache.restore(tmp_path).encoder_tag == "decision-32-abc"
    with pytest.raises(ValueError, match="blob name"):
        c.save(tmp_path, blobs={"meta.json": b"{}"})


# -- the region bound ---------------------------------------------------------------------------
def test_the_region_bound_serves_where_the_labels_say_the_served_error_is_small():
    """Labels correct above 0.95 and wrong below: the region bound serves from just about 0.95
    up (not below, where the region's wrong share would pass delta), nothing before
    ``min_labels``, and each served similarity's region bound is <= delta."""
    from cachellm_rl.cache.correctness import region_threshold

    m = CorrectnessModel(CorrectnessConfig(bound="region", min_labels=50, refit_every=1))
    rng = np.random.default_rng(0)
    sims = rng.uniform(0.85, 1.0, 3000)
    for s in sims[:49]:
        m.record(float(s), bool(s >= 0.95))
    assert not m.allows(0.9999) and np.isnan(m.min_servable_similarity())
    for s in sims[49:]:
        m.record(float(s), bool(s >= 0.95))
    t = m.min_servable_similarity()
    assert 0.94 < t < 0.955
    assert m.allows(0.97) and not m.allows(0.9)
    assert m.p_wrong_ucb(t) <= 0.05 < m.p_wrong_ucb(0.9)
    assert region_threshold(sims, sims >= 2.0, delta=0.05) == np.inf  # all wrong: never


def test_the_region_bound_is_not_fooled_by_labels_at_one_similarity():
    """300 correct labels at one score: the delta method's curve cannot be told its slope and
    stays unsure (bound 0.13); the region's Wilson bound is 0.9% and serves. One wrong label
    in ten there and neither serves at delta = 0.05."""
    region = CorrectnessModel(CorrectnessConfig(bound="region", refit_every=1))
    curve = CorrectnessModel(CorrectnessConfig(refit_every=1))
    for _ in range(300):
        region.record(0.999, True)
        curve.record(0.999, True)
    assert region.allows(0.999) and not curve.allows(0.999)
    assert region.p_wrong_ucb(0.999) < 0.01 and curve.p_wrong_ucb(0.999) > 0.1
    noisy = CorrectnessModel(CorrectnessConfig(bound="region", refit_every=1))
    for i in range(300):
        noisy.record(0.999, i % 10 != 0)
    assert not noisy.allows(0.999)
    state = region.state_dict()
    again = CorrectnessModel.from_state(state)
    assert again.config.bound == "region" and again.allows(0.999)
    with pytest.raises(ValueError, match="bound must be one of"):
        CorrectnessConfig(bound="wilson")
