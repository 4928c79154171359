"""AdaptiveCache semantics (see docs/cache.md) without Ray."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachellm_rl.cache.adaptive import AdaptiveCache, align_prior, kl_divergence
from cachellm_rl.cache.index import IndexConfig, PriorIndex
from cachellm_rl.contracts import CacheQuery, HitTier, PriorRequest, PriorResponse
from tests.helpers import query, small_config, unit

E = np.eye(8, dtype=np.float32)


def resp(logp, version="v1"):
    lp = np.asarray(logp, np.float64)
    lp = lp - np.log(np.exp(lp).sum())
    return PriorResponse(logp=lp.astype(np.float32), model_version=version)


def filled(cfg=None, n=5):
    c = AdaptiveCache(cfg or small_config(), model_version="v1")
    for i in range(n):
        c.insert(query(f"s{i}", E[i]), resp([0.0, -1.0, -2.0]))
    return c


def test_align_prior_fills_missing_and_renormalises():
    lp, cov = align_prior(("a", "b"), np.log([0.75, 0.25]), ("c", "b", "a"), 1.0)
    assert cov == pytest.approx(2 / 3)
    assert np.exp(lp.astype(np.float64)).sum() == pytest.approx(1.0, abs=1e-6)
    # absent 'c' gets min(entry) - margin, so it sits exactly `margin` below 'b'
    assert lp[1] - lp[0] == pytest.approx(1.0, abs=1e-6)
    assert lp[2] > lp[1]


def test_exact_hit_is_aligned_to_caller_order():
    c = filled()
    q = query("s1", E[1], candidates=("c", "a", "b"))  # same key, candidates reordered
    r = c.lookup(q)
    assert r.tier is HitTier.EXACT
    np.testing.assert_allclose(r.logp, resp([-2.0, 0.0, -1.0]).logp, atol=1e-6)


def test_semantic_hit_needs_similarity_and_coverage():
    c = filled(small_config(min_cosine_similarity=0.9, min_candidate_coverage=0.6))
    near = unit(E[2] + 0.2 * E[7])  # cos ~ 0.98 to s2
    far = unit(E[2] + 1.0 * E[7])  # cos ~ 0.71
    assert c.lookup(query("n1", near)).tier is HitTier.SEMANTIC
    assert c.lookup(query("n2", far)).tier is HitTier.MISS
    low_cov = query("n3", near, candidates=("a", "x", "y"))  # coverage 1/3 < 0.6
    assert c.lookup(low_cov).tier is HitTier.MISS
    ok_cov = query("n4", near, candidates=("a", "b", "y"))  # coverage 2/3
    r = c.lookup(ok_cov)
    assert r.tier is HitTier.SEMANTIC and r.coverage == pytest.approx(2 / 3)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    tau_low=st.floats(-0.5, 0.99),
    delta=st.floats(0.0, 0.5),
)
def test_raising_the_threshold_never_adds_hits(seed, tau_low, delta):
    rng = np.random.default_rng(seed)
    c = AdaptiveCache(small_config(min_candidate_coverage=0.0), model_version="v1")
    for i in range(30):
        c.insert(query(f"s{i}", rng.normal(size=8)), resp([0.0, -1.0, -2.0]))
    queries = [query(f"q{j}", rng.normal(size=8)) for j in range(30)]
    tau_high = min(1.0, tau_low + delta)
    low = [c.lookup(q, min_cosine_similarity=tau_low, update=False).hit for q in queries]
    high = [c.lookup(q, min_cosine_similarity=tau_high, update=False).hit for q in queries]
    assert all(lo or not hi for lo, hi in zip(low, high, strict=True))


def test_threshold_one_hits_only_exact_repeats():
    rng = np.random.default_rng(0)
    c = AdaptiveCache(
        small_config(min_cosine_similarity=1.0, min_candidate_coverage=0.0), model_version="v1"
    )
    states = [query(f"s{i}", rng.normal(size=8)) for i in range(20)]
    for q in states:
        assert not c.lookup(q).hit
        c.insert(q, resp([0.0, -1.0, -2.0]))
    others = [query(f"o{i}", rng.normal(size=8) + 1e-3) for i in range(50)]
    assert not any(c.lookup(q).hit for q in others)
    assert all(c.lookup(q).tier is HitTier.EXACT for q in states)


def test_eviction_is_lru_weighted_by_visits():
    cfg = small_config(capacity_entries=3, visit_bonus_steps=0.0)
    c = AdaptiveCache(cfg, model_version="v1")
    for k in ("a", "b", "c"):
        c.insert(query(k, None), resp([0, 0, 0]))
        c.lookup(query(k, None))
    c.lookup(query("a", None))  # a is now most recent; b is least recent
    c.insert(query("d", None), resp([0, 0, 0]))
    assert not c.lookup(query("b", None), update=False).hit
    assert all(c.lookup(query(k, None), update=False).hit for k in ("a", "c", "d"))
    assert c.stats.evictions == 1

    # with a visit bonus, an often-visited old entry outlives a recent one-visit entry
    c2 = AdaptiveCache(small_config(capacity_entries=2, visit_bonus_steps=10.0), model_version="v1")
    c2.insert(query("hot", None), resp([0, 0, 0]))
    for _ in range(15):
        c2.lookup(query("hot", None))
    c2.insert(query("cold", None), resp([0, 0, 0]))
    c2.lookup(query("cold", None))
    c2.insert(query("new", None), resp([0, 0, 0]))
    assert c2.lookup(query("hot", None), update=False).hit
    assert not c2.lookup(query("cold", None), update=False).hit


def test_ghost_list_counts_capacity_misses():
    c = AdaptiveCache(small_config(capacity_entries=2), model_version="v1")
    for k in ("a", "b", "c"):  # 'a' is evicted
        c.insert(query(k, None), resp([0, 0, 0]))
    assert not c.lookup(query("a", None)).hit
    assert not c.lookup(query("zz", None)).hit
    assert c.stats.capacity_misses == 1 and c.stats.misses == 2


def test_exact_hits_are_not_refreshed_unless_asked():
    c = filled(small_config(refresh_probability=1.0))
    assert not c.lookup(query("s0", E[0])).refresh
    c2 = filled(small_config(refresh_probability=1.0, refresh_exact_hits=True))
    r = c2.lookup(query("s0", E[0]))
    assert r.tier is HitTier.EXACT and r.refresh and c2.stats.refreshes_scheduled == 1


def test_refresh_measures_kl_eps_and_regret_and_stores_the_fresh_prior():
    c = filled(small_config(refresh_probability=1.0, min_cosine_similarity=0.9))
    near = query("near1", unit(E[1] + 0.1 * E[7]))
    r = c.lookup(near)
    assert r.tier is HitTier.SEMANTIC and r.refresh and c.stats.refreshes_scheduled == 1
    fresh = resp([-2.0, -1.0, 0.0])
    m = c.apply_refresh(near, r.logp, fresh, r.entry_id, similarity=r.similarity)
    assert m.kl == pytest.approx(kl_divergence(fresh.logp, r.logp))
    assert m.eps == pytest.approx(float(np.max(np.abs(fresh.logp - r.logp))), abs=1e-6)
    assert m.regret == pytest.approx(2.0, abs=1e-5) and m.error  # cached picks 'a', 2 nats down
    assert m.kl > 0 and c.stats.refresh_kl_ema == pytest.approx(m.kl)
    assert c.stats.refresh_errors == 1 and c.stats.refresh_error_ema == 1.0
    # the queried state now has its own exact entry with the fresh prior ...
    got = c.lookup(near, update=False)
    assert got.tier is HitTier.EXACT
    np.testing.assert_allclose(got.logp, fresh.logp, atol=1e-6)
    # ... and the neighbour that served it is kept for its own state
    assert c.lookup(query("s1", E[1]), update=False).tier is HitTier.EXACT


def test_an_erring_entry_narrows_its_own_radius():
    c = filled(small_config(refresh_probability=1.0, min_cosine_similarity=0.93))
    first = query("n-a", unit(E[1] + 0.3 * E[7]))  # cos ~ 0.958 to s1
    r = c.lookup(first)
    assert r.tier is HitTier.SEMANTIC
    c.apply_refresh(first, r.logp, resp([-2.0, -1.0, 0.0]), r.entry_id, similarity=r.similarity)
    assert c.stats.radius_narrowed == 1
    # s1 no longer answers a state as far as the one it erred on (n-a is at cos 0.92 < tau)
    as_far = query("n-b", unit(E[1] + 0.3 * E[6]))
    assert c.lookup(as_far, update=False).tier is HitTier.MISS
    # but still answers closer ones
    closer = query("n-c", unit(E[1] + 0.1 * E[6]))
    assert c.lookup(closer, update=False).tier is HitTier.SEMANTIC
    # the floor survives a snapshot round trip
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        c.save(d)
        back = AdaptiveCache.restore(d)
        assert back.lookup(as_far, update=False).tier is HitTier.MISS
        assert back.lookup(closer, update=False).tier is HitTier.SEMANTIC


def test_agreeing_refresh_is_not_an_error_and_keeps_the_radius():
    c = filled(small_config(refresh_probability=1.0, min_cosine_similarity=0.9))
    q = query("n-a", unit(E[1] + 0.3 * E[7]))
    r = c.lookup(q)
    m = c.apply_refresh(q, r.logp, resp([0.0, -0.5, -3.0]), r.entry_id, similarity=r.similarity)
    assert m.regret == 0.0 and not m.error and c.stats.radius_narrowed == 0
    assert c.lookup(query("n-b", unit(E[1] + 0.3 * E[6])), update=False).tier is HitTier.SEMANTIC


def test_version_mismatch_is_a_miss():
    c = filled()
    c.insert(query("new", E[6]), resp([0, 0, 0], version="v2"))  # the model changed
    assert c.model_version == "v2"
    assert c.lookup(query("s0", E[0])).tier is HitTier.MISS
    assert c.stats.version_misses == 1
    c2 = AdaptiveCache(small_config(), model_version="v1", encoder_tag="enc-a")
    c2.insert(query("s", E[0]), resp([0, 0, 0]))
    c2.encoder_tag = "enc-b"
    assert not c2.lookup(query("s", E[0])).hit


@pytest.mark.parametrize("hnsw_threshold", [10_000, 10])
def test_save_restore_gives_identical_lookups(tmp_path, hnsw_threshold):
    rng = np.random.default_rng(1)
    cfg = small_config(
        capacity_entries=200, hnsw_threshold=hnsw_threshold, min_cosine_similarity=0.7
    )
    c = AdaptiveCache(cfg, model_version="v1", encoder_tag="t")
    for i in range(60):
        c.insert(query(f"s{i}", rng.normal(size=8)), resp(rng.normal(size=3)))
    for i in range(5):  # some evictions/removals leave tombstones in HNSW mode
        c._remove(i)
    c.save(tmp_path / "snap")
    c.save(tmp_path / "snap")  # a second snapshot; LATEST points to it
    r = AdaptiveCache.restore(tmp_path / "snap")
    assert len(r) == len(c) == 55
    probes = [query(f"s{i}", rng.normal(size=8)) for i in range(60)]
    probes += [query(f"p{i}", rng.normal(size=8)) for i in range(60)]
    for q in probes:
        a, b = c.lookup(q, update=False), r.lookup(q, update=False)
        assert a.tier == b.tier and a.entry_id == b.entry_id
        if a.hit:
            np.testing.assert_array_equal(a.logp, b.logp)
    assert r.stats.inserts == c.stats.inserts and r.step == c.step
    assert len(list((tmp_path / "snap").glob("snap-*"))) <= 2


def test_snapshot_survives_partial_write(tmp_path):
    c = filled()
    c.save(tmp_path)
    (tmp_path / "snap-999999999999-dead.partial").mkdir()  # a crash mid-write
    assert len(AdaptiveCache.restore(tmp_path)) == len(c)


def test_restore_rejects_dimension_mismatch(tmp_path):
    filled().save(tmp_path)
    with pytest.raises(ValueError, match="dimension mismatch"):
        AdaptiveCache.restore(tmp_path, small_config(dim=16))
    with pytest.raises(FileNotFoundError, match="no cache snapshot"):
        AdaptiveCache.restore(tmp_path / "empty")


def test_bad_inputs_name_the_problem():
    c = filled()
    with pytest.raises(ValueError, match="shape"):
        c.lookup(query("x", np.ones(4)))
    bad = CacheQuery(
        exact_key=b"k",
        embedding=np.full(8, np.nan, np.float32),
        request=PriorRequest(prompt="p", candidates=("a",)),
    )
    with pytest.raises(ValueError, match="NaN"):
        c.lookup(bad)
    with pytest.raises(ValueError, match=r"tau.*\[-1, 1\]"):
        c.set_params(min_cosine_similarity=1.5)
    with pytest.raises(ValueError, match="capacity_entries"):
        small_config(capacity_entries=0)
    with pytest.raises(ValueError, match="logp has shape"):
        c.insert(query("y", E[0]), resp([0.0, 0.0]))
    with pytest.raises(ValueError, match="NaN"):
        c.insert(
            query("y", E[0]),
            PriorResponse(logp=np.array([np.nan] * 3, np.float32), model_version="v1"),
        )


def test_shrinking_capacity_evicts_now():
    c = filled(n=6)
    c.set_params(capacity_entries=2)
    assert len(c) == 2 and c.stats.evictions == 4


def test_index_flat_to_hnsw_and_removal():
    rng = np.random.default_rng(0)
    idx = PriorIndex(IndexConfig(dim=16, hnsw_threshold=50))
    vecs = np.stack([unit(v) for v in rng.normal(size=(200, 16))])
    idx.add(np.arange(40), vecs[:40])
    assert idx.kind == "flat"
    idx.add(np.arange(40, 200), vecs[40:])
    assert idx.kind == "hnsw"
    _sims, ids = idx.search(vecs[:20], k=1)
    assert (ids[:, 0] == np.arange(20)).mean() >= 0.95
    idx.remove(np.arange(10))
    _, ids = idx.search(vecs[:10], k=3)
    assert not np.isin(ids, np.arange(10)).any()
    with pytest.raises(ValueError, match="already"):
        idx.add(np.array([50]), vecs[:1])
    with pytest.raises(ValueError, match="dimension mismatch"):
        idx.search(np.ones((1, 8), np.float32))
