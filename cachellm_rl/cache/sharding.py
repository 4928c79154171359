"""Pure parts of the sharded cache (see docs/cluster.md, "A sharded cache").

A sharded cache is ``N`` cache actors. Shard 0 (the *primary*, under the cache's own name) holds
what must be one: the meta-optimiser and the authoritative correctness model; the other shards
send it their decision windows and reuse labels and get back the parameters in force and the
model's state (:func:`merge_window`). A state's exact key decides the shard that owns it
(:func:`shard_of`): its entry, its LM call and the single flight on it live there. Semantic
search fans out: the owner asks its peers for their nearest entries and decides on the merged
list. Entry ids are unique across shards (shard ``i`` numbers its entries ``i, i + N, ...``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import fields

from cachellm_rl.cache.adaptive import CacheStats, WindowCounters

# CacheStats fields that are not counters: merged by other rules than a sum.
_GAUGE_FIRST = (
    "min_cosine_similarity",
    "refresh_probability",
    "explore_probability",
    "capacity_entries",  # per shard
)
_GAUGE_MAX = ("refresh_eps_max",)
_GAUGE_MEAN = ("refresh_kl_ema", "refresh_kl_last", "refresh_error_ema", "hit_rate_ema")


def shard_of(exact_key: bytes, num_shards: int) -> int:
    """The shard that owns a state's exact key (stable across processes and runs).

    Example:
        >>> shard_of(b"some key", 1)
        0
        >>> shard_of(b"some key", 4) == shard_of(b"some key", 4)
        True
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if num_shards == 1:
        return 0
    digest = hashlib.blake2b(exact_key, digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_shards


def shard_name(name: str, index: int) -> str:
    """Ray actor name of shard ``index`` of the cache called ``name`` (shard 0 keeps the name).

    Example:
        >>> shard_name("cache", 0), shard_name("cache", 2)
        ('cache', 'cache.shard2')
    """
    return name if index == 0 else f"{name}.shard{index}"


def split_by_shard(keys: Sequence[bytes], num_shards: int) -> list[list[int]]:
    """Positions of ``keys`` grouped by owning shard (one list per shard, order kept).

    Example:
        >>> split_by_shard([b"a", b"b"], 1)
        [[0, 1]]
    """
    groups: list[list[int]] = [[] for _ in range(num_shards)]
    for i, k in enumerate(keys):
        groups[shard_of(k, num_shards)].append(i)
    return groups


def merge_window(into: WindowCounters, other: WindowCounters) -> WindowCounters:
    """Add another shard's decision window to ``into`` (in place; returned).

    Example:
        >>> w = merge_window(WindowCounters(decisions=3, hits=1), WindowCounters(decisions=2))
        >>> (w.decisions, w.hits)
        (5, 1)
    """
    for f in fields(WindowCounters):
        a, b = getattr(into, f.name), getattr(other, f.name)
        setattr(into, f.name, a + b if not isinstance(a, list) else a + list(b))
    return into


def merge_stats(parts: Sequence[CacheStats]) -> CacheStats:
    """One :class:`CacheStats` for a sharded cache: counters and sizes summed, latency
    histograms merged, the parameters in force (K per shard, tau, rho, the exploration rate)
    taken from the primary (first part), EMAs
    averaged over the shards that have one, maxima kept. The hit rate follows from the sums.

    Example:
        >>> a, b = CacheStats(decisions=10, hits_exact=8), CacheStats(decisions=30, hits_exact=12)
        >>> merge_stats([a, b]).hit_rate
        0.5
    """
    if not parts:
        raise ValueError("merge_stats needs at least one CacheStats")
    out = dataclasses.replace(parts[0])
    for f in fields(CacheStats):
        vals = [getattr(p, f.name) for p in parts]
        if f.name in _GAUGE_FIRST:
            continue
        if f.name in _GAUGE_MAX:
            setattr(out, f.name, max(vals))
        elif f.name in _GAUGE_MEAN:
            finite = [float(v) for v in vals if v == v]
            setattr(out, f.name, sum(finite) / len(finite) if finite else float("nan"))
        elif f.name in ("latency_hit", "latency_miss"):
            h = vals[0]
            for v in vals[1:]:
                h = h.merged(v)
            setattr(out, f.name, h)
        elif isinstance(vals[0], int | float):
            setattr(out, f.name, type(vals[0])(sum(vals)))
    return out
