"""The sharded cache: routing, semantic fan-out, one meta-optimiser and correctness model,
per-shard snapshots. Shards are SharedPriorCache objects wired to each other in-process (the
Ray path is tested in tests/integration/test_shared_cache.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect

import numpy as np
import pytest

from cachellm_rl.cache.actor import SharedCacheConfig, SharedPriorCache
from cachellm_rl.cache.adaptive import CacheStats, WindowCounters
from cachellm_rl.cache.meta import MetaConfig
from cachellm_rl.cache.sharding import (
    merge_stats,
    merge_window,
    shard_name,
    shard_of,
    split_by_shard,
)
from cachellm_rl.contracts import LatencyHistogram, PriorResponse, PriorSource
from tests.helpers import query, small_config

LOGP = np.log([0.7, 0.2, 0.1]).astype(np.float32)


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        async def call():
            out = self.fn(*args)
            return await out if inspect.isawaitable(out) else out

        return asyncio.ensure_future(call())  # scheduled at once, as a Ray call is


class Handle:
    """What a Ray actor handle looks like to a shard: ``handle.method.remote(...)``."""

    def __init__(self, obj):
        self.obj = obj

    def __getattr__(self, name):
        return _Method(getattr(self.obj, name))


class FakeLM:
    """A Serve handle stand-in: every state gets ``LOGP``; counts the states scored."""

    def __init__(self):
        self.scored = 0
        self.score_many = _Method(self._score)
        self.model_version = _Method(lambda: "v1")

    def _score(self, requests):
        self.scored += len(requests)
        return [PriorResponse(LOGP, "v1") for _ in requests]


def shards(n=2, lm=None, **kw):
    cfg = SharedCacheConfig(
        cache=small_config(**kw.pop("cache", {})),
        prior_app="fake",
        num_shards=n,
        shard_group="c",
        **kw,
    )
    out = [SharedPriorCache(dataclasses.replace(cfg, shard_index=i)) for i in range(n)]
    for a in out:
        a._handle = lm or FakeLM()
        a._peer_handles = {j: Handle(b) for j, b in enumerate(out)}
    return out


def key_on(shard: int, n: int, prefix: str) -> str:
    """A state name whose exact key belongs to ``shard``."""
    i = 0
    while shard_of(f"{prefix}{i}".encode(), n) != shard:
        i += 1
    return f"{prefix}{i}"


def test_routing_is_stable_and_spreads_keys():
    keys = [f"state {i}".encode() for i in range(4000)]
    owners = [shard_of(k, 4) for k in keys]
    assert owners == [shard_of(k, 4) for k in keys]
    counts = np.bincount(owners, minlength=4)
    assert counts.min() > 850, counts  # about 1000 each
    groups = split_by_shard(keys[:10], 4)
    assert sorted(i for g in groups for i in g) == list(range(10))
    assert all(shard_of(keys[i], 4) == j for j, g in enumerate(groups) for i in g)
    assert shard_name("cache", 0) == "cache" and shard_name("cache", 3) == "cache.shard3"
    with pytest.raises(ValueError, match="num_shards"):
        shard_of(b"k", 0)


def test_merged_stats_sum_counters_and_keep_the_primarys_parameters():
    h = LatencyHistogram()
    h.record(2.0)
    a = CacheStats(decisions=10, hits_exact=8, lm_queries=2, min_cosine_similarity=0.9, size=5)
    b = CacheStats(decisions=30, hits_semantic=12, lm_queries=18, min_cosine_similarity=0.5)
    b.latency_hit = h
    m = merge_stats([a, b])
    assert (m.decisions, m.hits, m.lm_queries, m.size) == (40, 20, 20, 5)
    assert m.hit_rate == 0.5 and m.min_cosine_similarity == 0.9
    assert m.latency_hit.total == 1
    w = merge_window(WindowCounters(decisions=2, refresh_kls=[0.1]), WindowCounters(hits=1))
    assert (w.decisions, w.hits, w.refresh_kls) == (2, 1, [0.1])


def test_entry_ids_never_collide_across_shards():
    s0, s1 = shards()
    for i in range(5):
        s0._cache.insert(query(f"a{i}", None), PriorResponse(LOGP, "v1"))
        s1._cache.insert(query(f"b{i}", None), PriorResponse(LOGP, "v1"))
    ids0, ids1 = set(s0._cache._entries), set(s1._cache._entries)
    assert ids0 == {0, 2, 4, 6, 8} and ids1 == {1, 3, 5, 7, 9}
    assert s0._cache.is_local_id(4) and not s0._cache.is_local_id(5)


def test_a_query_is_served_from_the_nearest_entry_on_another_shard():
    lm = FakeLM()
    s0, s1 = shards(lm=lm, cache={"reuse_rule": "tau", "min_cosine_similarity": 0.9})
    far = key_on(1, 2, "kitchen")
    near = key_on(0, 2, "kitchen ")
    e = np.eye(8)[0]
    s1._cache.insert(query(far, e), PriorResponse(LOGP, "v1"))

    async def run():
        out = await s0.get_priors([query(near, e + 0.05 * np.eye(8)[1])])
        await asyncio.sleep(0.01)  # the touch reaches shard 1
        return out

    (res,) = asyncio.run(run())
    assert res.source is PriorSource.CACHE_SEMANTIC and lm.scored == 0
    np.testing.assert_allclose(res.logp, LOGP, atol=1e-6)
    st = s0.local_stats()
    assert st.hits_remote == 1 and st.hits_semantic == 1 and st.shard_fanouts == 1
    (entry,) = s1._cache._entries.values()
    assert entry.hits == 1  # shard 1 knows its entry served
    merged = asyncio.run(s0.stats())
    assert merged.shards_reporting == 2 and merged.size == 1 and merged.decisions == 1


def test_without_the_fan_out_the_same_query_is_a_miss():
    """The control: a shard that cannot reach its peer decides on its own entries."""
    lm = FakeLM()
    s0, s1 = shards(lm=lm, cache={"reuse_rule": "tau", "min_cosine_similarity": 0.9})
    s0._peer_handles = {}
    s0._peer = lambda i: (_ for _ in ()).throw(ValueError("gone"))  # type: ignore[method-assign]
    e = np.eye(8)[0]
    s1._cache.insert(query(key_on(1, 2, "kitchen"), e), PriorResponse(LOGP, "v1"))
    (res,) = asyncio.run(s0.get_priors([query(key_on(0, 2, "kitchen "), e + 0.05 * np.eye(8)[1])]))
    assert res.source is PriorSource.LM and lm.scored == 1
    assert s0.local_stats().shard_fanout_failures == 1


def test_labels_and_windows_go_to_shard_0_and_its_parameters_come_back():
    s0, s1 = shards(
        cache={"reuse_rule": "delta"},
        meta=MetaConfig(mode="heuristic", window_decisions=1000),
    )
    e = np.eye(8)[0]
    s1._cache.insert(query(key_on(1, 2, "hall"), e), PriorResponse(LOGP, "v1"))

    async def run():
        # a miss on shard 1 next to its own entry: a label, recorded there and forwarded
        await s1.get_priors([query(key_on(1, 2, "hall "), e + 0.1 * np.eye(8)[2])])
        await s0.set_params(min_cosine_similarity=0.42, explore_probability=0.2, _fan_out=False)
        return await s1.sync_now()

    assert asyncio.run(run())
    assert s1.local_stats().labels == 1
    assert s0._cache.correctness.labels_total == 1  # one correctness model, on shard 0
    assert s0._cache.window.decisions == 1  # shard 1's window feeds the meta-optimiser
    assert s1._cache.min_cosine_similarity == 0.42 and s1._cache.explore_probability == 0.2
    assert s1._cache.correctness.labels_total == 1 and s1._cache.forward == []


def test_each_shard_snapshots_and_restores_its_own_entries(tmp_path):
    s0, s1 = shards(snapshot_dir=str(tmp_path))
    s0._cache.insert(query("a", np.eye(8)[0]), PriorResponse(LOGP, "v1"))
    s1._cache.insert(query("b", np.eye(8)[1]), PriorResponse(LOGP, "v1"))
    s1._cache.insert(query("c", np.eye(8)[2]), PriorResponse(LOGP, "v1"))
    asyncio.run(s0.save())
    assert (tmp_path / "shard-0" / "LATEST").is_file() and (tmp_path / "shard-1").is_dir()
    r0, r1 = shards(snapshot_dir=str(tmp_path))  # restarted shards
    assert (len(r0._cache), len(r1._cache)) == (1, 2)
    assert asyncio.run(r0.size()) == 3
    r1._cache.insert(query("d", None), PriorResponse(LOGP, "v1"))
    assert max(r1._cache._entries) % 2 == 1  # still in shard 1's id space


def test_bad_shard_settings_are_refused():
    with pytest.raises(ValueError, match="num_shards"):
        SharedCacheConfig(num_shards=0)
    with pytest.raises(ValueError, match="shard_index"):
        SharedCacheConfig(num_shards=2, shard_index=2)
    with pytest.raises(ValueError, match="spsa"):
        SharedCacheConfig(num_shards=2, meta=MetaConfig(mode="spsa"))


def test_a_retried_exchange_is_applied_once():
    s0, _ = shards(cache={"reuse_rule": "delta"})
    labels = [(0.95, True, 3, False), (0.97, False, 3, False)]
    payload = (1, WindowCounters(decisions=4), labels, [])
    s0.shard_sync(1, "incarnation-a", [payload])
    again = s0.shard_sync(1, "incarnation-a", [payload])  # the answer was lost: sent again
    assert again["applied"] == 1
    assert s0._cache.correctness.labels_total == 2 and s0._cache.window.decisions == 4
    s0.shard_sync(1, "incarnation-b", [payload])  # a restarted shard numbers from 1 again
    assert s0._cache.correctness.labels_total == 4
    assert s0._cache.correctness.served_labels == 0
    on_policy = [(0.99, True, 3, True)]  # another shard's exploration call: the guard reads it
    s0.shard_sync(1, "incarnation-b", [(2, WindowCounters(), on_policy, [])])
    assert s0._cache.correctness.served_labels == 1


def test_a_restarted_shard_numbers_new_entries_above_those_shard_0_knows():
    s0, s1 = shards(cache={"reuse_rule": "delta"})
    # shard 0 holds labels of shard 1's entry 9 (made after shard 1's last snapshot, say)
    s0.shard_sync(1, "old", [(1, WindowCounters(), [(0.95, True, 9, False)], [])])
    assert asyncio.run(s1.sync_now())  # s1 is the restarted shard: it starts at id 1
    eid = s1._cache.insert(query("fresh", None), PriorResponse(LOGP, "v1"))
    assert eid == 11 and s1._cache.is_local_id(eid)


def test_a_snapshot_of_another_shard_count_is_refused(tmp_path):
    (one,) = shards(n=1, snapshot_dir=str(tmp_path))
    one._cache.insert(query("a", np.eye(8)[0]), PriorResponse(LOGP, "v1"))
    asyncio.run(one.save())
    with pytest.raises(ValueError, match="written by a cache of 1 shard"):
        asyncio.run(shards(n=2)[0].restore(str(tmp_path)))


def test_a_wrong_remote_entry_gets_its_floor_raised_on_its_own_shard():
    class WrongLM(FakeLM):
        def _score(self, requests):
            self.scored += len(requests)
            return [PriorResponse(LOGP[::-1].copy(), "v1") for _ in requests]

    lm = WrongLM()
    s0, s1 = shards(
        lm=lm, cache={"reuse_rule": "tau", "min_cosine_similarity": 0.9, "refresh_probability": 1.0}
    )
    e = np.eye(8)[0]
    s1._cache.insert(query(key_on(1, 2, "cellar"), e), PriorResponse(LOGP, "v1"))

    async def run():
        (res,) = await s0.get_priors([query(key_on(0, 2, "cellar "), e + 0.05 * np.eye(8)[1])])
        await s0.drain()  # the refresh: the fresh prior's top action differs
        await asyncio.sleep(0.01)
        return res

    assert asyncio.run(run()).source is PriorSource.CACHE_SEMANTIC
    (entry,) = s1._cache._entries.values()
    assert entry.min_similarity > 0.99 and s1.local_stats().radius_narrowed == 1
