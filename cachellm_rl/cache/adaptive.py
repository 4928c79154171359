"""The adaptive semantic cache of priors (see docs/cache.md): plain Python, no Ray.

Lookup goes exact tier first (hash of canonical text, candidate set and versions), then the
semantic tier. A near cached state is usable when at least ``min_candidate_coverage`` of the
caller's candidates are in its entry (candidates missing from the entry get
``min(entry logp) - missing_action_margin`` before renormalising over the caller's candidates),
and when the *reuse rule* accepts its cosine similarity:

- ``reuse_rule="delta"`` (the adaptive cache): a correctness model fitted on measured reuse
  labels (:mod:`cachellm_rl.cache.correctness`) must bound ``P(wrong | similarity)`` by the
  user's ``delta``; before enough labels exist no semantic hit is served, and a servable hit
  calls the LM anyway with a small exploration probability so labels keep coming. The
  on-policy guard serves only while those exploration labels (what the rule would serve)
  bound the served error by ``delta`` too; until then every servable hit calls the LM.
- ``reuse_rule="tau"`` (the ``lru`` and ``static`` baselines): ``cos >= min_cosine_similarity``
  (higher is stricter), plus, with ``learn_entry_radius``, a per-entry similarity floor raised
  whenever a refresh finds that the entry served a prior whose choice the fresh prior rejects.

Labels come at no extra LM cost: whenever the LM answers a state that has a nearest usable
cached neighbour (a miss, an exploration call, a refresh), the cache records whether reusing that
neighbour would have been correct.

Capacity ``K`` is enforced by least-recently-used eviction weighted by visit count: the victim is
the entry with the smallest ``last_used_step + visit_bonus_steps * log2(1 + visits)``. Evicted
exact keys go to a bounded ghost list so that misses that would have hit are counted as capacity
misses.
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from cachellm_rl.cache.correctness import (
    CorrectnessConfig,
    CorrectnessModel,
    LabelStore,
    ReuseLabel,
    correctness_config_from_dict,
    make_label,
)
from cachellm_rl.cache.index import IndexConfig, PriorIndex, atomic_write_text
from cachellm_rl.cache.keys import exact_key
from cachellm_rl.contracts import (
    CacheQuery,
    HitTier,
    LatencyHistogram,
    LookupResult,
    PriorResponse,
)

TAU_RANGE = (-1.0, 1.0)
SNAPSHOT_POINTER = "LATEST"
SNAPSHOT_FORMAT = 2
REUSE_RULES = ("tau", "delta")


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Configuration of :class:`AdaptiveCache`.

    Attributes:
        dim: Embedding dimension of the state encoder (384 for all-MiniLM-L6-v2).
        capacity_entries: ``K``, most entries kept; >= 1.
        min_cosine_similarity: ``tau``, cosine similarity in [-1, 1] a semantic hit needs;
            higher is stricter; 1.0 hits only identical embeddings.
        refresh_probability: ``rho``, probability that a hit schedules a background re-query.
        min_candidate_coverage: ``c_min``, fraction in [0, 1] of the caller's candidates that a
            semantic hit's entry must hold.
        missing_action_margin: Log-prob margin below the entry's minimum given to candidates
            the entry does not hold.
        refresh_exact_hits: Whether exact hits may be drawn for a refresh. Off by default: an
            exact hit holds the current LM version's prior for the very same prompt, so a
            re-query could only return it again (deterministic scoring).
        error_regret_nats: A refreshed semantic hit is a cache *error* when the cached prior's
            top action is at least this many nats less likely than the fresh prior's top action
            under the fresh prior (``log p(a*) - log p(a_cached)``).
        learn_entry_radius: On an error, raise the serving entry's own similarity floor above
            the similarity it served at, so it no longer answers that neighbour (``tau``
            rule; under ``delta`` an on-policy label that finds a reuse wrong always does).
        entry_radius_margin: How far above the erring similarity the entry's floor is set.
        visit_bonus_steps: How many decisions of recency one doubling of visit count is worth
            in the eviction order (0 = plain LRU).
        ghost_entries: Size of the ghost list of evicted keys (capacity-miss accounting).
        neighbours: Nearest entries examined per semantic lookup.
        semantic_tier: Whether the semantic tier is used (False: exact-only cache).
        hit_rate_ema_decay: Weight of the newest decision in the hit-rate EMA.
        refresh_kl_ema_decay: Weight of the newest refresh in the refresh-KL and refresh-error
            EMAs.
        seed: Seed of the refresh draws.
        hnsw_threshold: Entries above which the index switches from exact to HNSW.
        hnsw_m: HNSW graph degree.
        hnsw_ef_search: HNSW search beam (recall vs latency).
        hnsw_ef_construction: HNSW build beam.
        use_gpu_index: Put the exact index on a GPU when faiss-gpu and a GPU are present.
        reuse_rule: ``"delta"`` (error-bounded reuse from the correctness model) or ``"tau"``
            (fixed cosine threshold, the baselines' rule).
        correctness: Correctness model and delta rule settings (labels are kept under both
            rules).
        label_store_size: Newest reuse labels kept (with their texts) for analysis.
        env: Name recorded with each label (the env whose states this cache serves).
    """

    dim: int = 384
    capacity_entries: int = 10_000
    min_cosine_similarity: float = 0.95
    refresh_probability: float = 0.05
    min_candidate_coverage: float = 0.75
    missing_action_margin: float = 2.0
    refresh_exact_hits: bool = False
    error_regret_nats: float = 1.0
    learn_entry_radius: bool = True
    entry_radius_margin: float = 0.002
    visit_bonus_steps: float = 100.0
    ghost_entries: int = 10_000
    neighbours: int = 4
    semantic_tier: bool = True
    hit_rate_ema_decay: float = 0.01
    refresh_kl_ema_decay: float = 0.1
    seed: int = 0
    hnsw_threshold: int = 20_000
    hnsw_m: int = 32
    hnsw_ef_search: int = 64
    hnsw_ef_construction: int = 80
    use_gpu_index: bool = False
    reuse_rule: str = "tau"
    correctness: CorrectnessConfig = field(default_factory=CorrectnessConfig)
    label_store_size: int = 20_000
    env: str = ""

    def __post_init__(self) -> None:
        validate_params(self.capacity_entries, self.min_cosine_similarity, self.refresh_probability)
        if self.reuse_rule not in REUSE_RULES:
            raise ValueError(
                f"CacheConfig.reuse_rule must be one of {REUSE_RULES}, got {self.reuse_rule!r}"
            )
        if isinstance(self.correctness, dict):  # from a snapshot's JSON
            object.__setattr__(self, "correctness", correctness_config_from_dict(self.correctness))
        if self.label_store_size < 1:
            raise ValueError("CacheConfig.label_store_size must be >= 1")
        if self.dim < 1:
            raise ValueError(f"CacheConfig.dim must be >= 1, got {self.dim}")
        if not 0.0 <= self.min_candidate_coverage <= 1.0:
            raise ValueError(
                f"CacheConfig.min_candidate_coverage must be in [0, 1], got "
                f"{self.min_candidate_coverage}"
            )
        if self.missing_action_margin < 0:
            raise ValueError("CacheConfig.missing_action_margin must be >= 0")
        if self.error_regret_nats < 0 or self.entry_radius_margin < 0:
            raise ValueError(
                "CacheConfig.error_regret_nats and entry_radius_margin must be >= 0, got "
                f"{self.error_regret_nats} and {self.entry_radius_margin}"
            )
        if self.neighbours < 1:
            raise ValueError("CacheConfig.neighbours must be >= 1")
        if self.ghost_entries < 0 or self.visit_bonus_steps < 0:
            raise ValueError("CacheConfig.ghost_entries and visit_bonus_steps must be >= 0")

    def index_config(self) -> IndexConfig:
        """Index settings derived from this config."""
        return IndexConfig(
            dim=self.dim,
            hnsw_threshold=self.hnsw_threshold,
            hnsw_m=self.hnsw_m,
            hnsw_ef_search=self.hnsw_ef_search,
            hnsw_ef_construction=self.hnsw_ef_construction,
            use_gpu=self.use_gpu_index,
        )


def validate_params(capacity_entries: int, min_cosine_similarity: float, rho: float) -> None:
    """Raise a ``ValueError`` naming the parameter when (K, tau, rho) is out of range."""
    if int(capacity_entries) < 1:
        raise ValueError(f"capacity_entries (K) must be >= 1, got {capacity_entries}")
    if not TAU_RANGE[0] <= min_cosine_similarity <= TAU_RANGE[1] or math.isnan(
        min_cosine_similarity
    ):
        raise ValueError(
            "min_cosine_similarity (tau) is a cosine similarity and must be in [-1, 1], got "
            f"{min_cosine_similarity}"
        )
    if not 0.0 <= rho <= 1.0 or math.isnan(rho):
        raise ValueError(f"refresh_probability (rho) must be in [0, 1], got {rho}")


def align_prior(
    entry_actions: tuple[str, ...] | list[str],
    entry_logp: np.ndarray,
    candidates: tuple[str, ...] | list[str],
    missing_action_margin: float,
) -> tuple[np.ndarray, float]:
    """Align a cached prior to the caller's candidates (see docs/cache.md).

    Args:
        entry_actions: Actions stored in the entry.
        entry_logp: Their log-probabilities.
        candidates: The caller's candidates, in the caller's order.
        missing_action_margin: Margin below ``min(entry_logp)`` for absent candidates.

    Returns:
        ``(logp, coverage)``: float32 log-probs over ``candidates`` (logsumexp 0) and the
        fraction of ``candidates`` present in the entry.

    Example:
        >>> lp, cov = align_prior(("a", "b"), np.log([0.75, 0.25]), ("b", "c"), 1.0)
        >>> round(cov, 2), bool(lp[0] > lp[1])
        (0.5, True)
    """
    table = dict(zip(entry_actions, np.asarray(entry_logp, np.float64).tolist(), strict=True))
    floor = float(np.min(entry_logp)) - missing_action_margin
    raw = np.array([table.get(c, floor) for c in candidates], dtype=np.float64)
    present = sum(1 for c in candidates if c in table)
    raw -= raw.max()
    logp = raw - np.log(np.exp(raw).sum())
    return logp.astype(np.float32), present / max(1, len(candidates))


def kl_divergence(p_logp: np.ndarray, q_logp: np.ndarray) -> float:
    """KL(p || q) of two log-prob vectors over the same support."""
    p = np.exp(np.asarray(p_logp, np.float64))
    return float(np.sum(p * (np.asarray(p_logp, np.float64) - np.asarray(q_logp, np.float64))))


def ema(old: float, new: float, weight: float) -> float:
    """Exponential moving average step; a NaN ``old`` (nothing yet) starts at ``new``."""
    return new if math.isnan(old) else (1 - weight) * old + weight * new


def top1_regret(fresh_logp: np.ndarray, cached_logp: np.ndarray) -> float:
    """``log p(a*) - log p(a_c)`` under the fresh prior, ``a_c`` the cached prior's top action.

    0 when both priors pick the same action; large when the cached choice is one the fresh
    prior all but rules out. Unlike the KL, it ignores disagreement about unlikely actions.

    Example:
        >>> top1_regret(np.log([0.7, 0.2, 0.1]), np.log([0.1, 0.8, 0.1]))  # doctest: +ELLIPSIS
        1.25...
    """
    f = np.asarray(fresh_logp, np.float64)
    return float(f.max() - f[int(np.argmax(cached_logp))])


@dataclass(frozen=True)
class RefreshMeasure:
    """What one refresh measured (see docs/cache.md).

    Attributes:
        kl: ``KL(fresh || cached)``.
        eps: ``max_a |log fresh(a) - log cached(a)|``.
        regret: :func:`top1_regret` of the cached prior under the fresh one.
        error: ``regret >= error_regret_nats``.
    """

    kl: float
    eps: float
    regret: float
    error: bool

    @classmethod
    def of(cls, fresh_logp: np.ndarray, cached_logp: np.ndarray, error_regret_nats: float):
        """Measure a cached prior against the fresh one."""
        regret = top1_regret(fresh_logp, cached_logp)
        return cls(
            kl=kl_divergence(fresh_logp, cached_logp),
            eps=float(np.max(np.abs(fresh_logp.astype(np.float64) - cached_logp))),
            regret=regret,
            error=regret >= error_regret_nats,
        )


@dataclass
class CacheStats:
    """Counters and gauges of a cache (picklable snapshot).

    Hits by tier, misses, LM queries, refreshes, refresh KL EMA, evictions, capacity misses,
    current K/tau/rho, latency histograms split hit/miss. A decision answered by another
    decision's in-flight LM call is reuse, not a miss: it counts in ``hits_exact`` (same key) or
    ``hits_semantic`` (a near state that the reuse rule accepts), and also in
    ``coalesced_exact`` / ``coalesced_semantic``; ``coalesced_misses`` counts both.
    ``semantic_refused`` counts lookups whose near, covering neighbour the reuse rule refused;
    ``explore_calls`` servable hits sent to the LM anyway, ``guard_held`` those of them the
    on-policy guard sent (its bound above ``delta``; see
    :class:`~cachellm_rl.cache.correctness.CorrectnessConfig`), ``on_policy_labels`` /
    ``on_policy_wrong`` the labels the guard reads (of exploration calls and refreshes of
    served hits); ``labels`` / ``labels_wrong`` the
    reuse labels measured. ``audits`` / ``audits_wrong`` count served semantic reuses checked
    against a fresh LM answer that changed nothing the caller got; their LM calls are
    ``audit_queries``, never part of ``lm_queries``. A sharded cache (its stats summed over
    ``shards_reporting`` shards) also counts ``hits_remote`` (semantic hits served from another
    shard's entry), ``shard_fanouts`` / ``shard_fanout_failures`` (semantic searches sent to
    the other shards, and peers that did not answer in time) and ``shard_syncs`` /
    ``shard_sync_failures`` (exchanges with shard 0). ``verifier_calls`` counts pairs the
    reuse verifier scored.
    """

    decisions: int = 0
    hits_exact: int = 0
    hits_semantic: int = 0
    misses: int = 0
    coalesced_misses: int = 0
    coalesced_exact: int = 0
    coalesced_semantic: int = 0
    semantic_refused: int = 0
    explore_calls: int = 0
    guard_held: int = 0
    on_policy_labels: int = 0
    on_policy_wrong: int = 0
    labels: int = 0
    labels_wrong: int = 0
    explore_probability: float = 0.0
    audits: int = 0
    audits_wrong: int = 0
    audit_queries: int = 0
    lm_queries: int = 0
    lm_failures: int = 0
    lm_timeouts: int = 0
    fallbacks_stale: int = 0
    fallbacks_uniform: int = 0
    refreshes_scheduled: int = 0
    refreshes_applied: int = 0
    refresh_kl_ema: float = float("nan")
    refresh_kl_last: float = float("nan")
    refresh_eps_max: float = 0.0
    refresh_errors: int = 0
    refresh_error_ema: float = float("nan")
    radius_narrowed: int = 0
    evictions: int = 0
    capacity_misses: int = 0
    version_misses: int = 0
    encoder_mismatches: int = 0
    verifier_calls: int = 0
    inserts: int = 0
    size: int = 0
    capacity_entries: int = 0
    min_cosine_similarity: float = 0.0
    refresh_probability: float = 0.0
    hit_rate_ema: float = 0.0
    meta_updates: int = 0
    snapshots_written: int = 0
    restored_entries: int = 0
    actor_restarts: int = 0
    hits_remote: int = 0
    shard_fanouts: int = 0
    shard_fanout_failures: int = 0
    shard_syncs: int = 0
    shard_sync_failures: int = 0
    shards_reporting: int = 0
    latency_hit: LatencyHistogram = field(default_factory=LatencyHistogram)
    latency_miss: LatencyHistogram = field(default_factory=LatencyHistogram)

    @property
    def hits(self) -> int:
        """Exact plus semantic hits."""
        return self.hits_exact + self.hits_semantic

    @property
    def hit_rate(self) -> float:
        """Lifetime hit rate over decisions (0 when none)."""
        return self.hits / self.decisions if self.decisions else 0.0

    def as_flat_dict(self) -> dict[str, float]:
        """Scalars only, for logging (TensorBoard, JSON)."""
        out: dict[str, float] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int | float):
                out[f.name] = v
        out["hit_rate"] = self.hit_rate
        out["latency_hit_p50_ms"] = self.latency_hit.quantile(0.5)
        out["latency_miss_p50_ms"] = self.latency_miss.quantile(0.5)
        out["latency_hit_p95_ms"] = self.latency_hit.quantile(0.95)
        out["latency_miss_p95_ms"] = self.latency_miss.quantile(0.95)
        return out


@dataclass
class WindowCounters:
    """Signals accumulated since the last meta-update (see docs/cache.md)."""

    decisions: int = 0
    hits: int = 0
    misses: int = 0
    capacity_misses: int = 0
    lm_queries: int = 0
    refresh_kls: list[float] = field(default_factory=list)
    refresh_errors: int = 0
    semantic_refused: int = 0
    served_labels: int = 0
    served_wrong: int = 0


@dataclass(frozen=True)
class Neighbour:
    """A cached entry offered to another shard's lookup: its prior aligned to the query's
    candidates, with what the owner's reuse rule needs (see :mod:`cachellm_rl.cache.sharding`).

    Attributes:
        entry_id: The entry's id (unique across shards).
        similarity: Cosine similarity to the query.
        logp: The entry's prior aligned to the query's candidates.
        coverage: Fraction of the query's candidates the entry has.
        min_similarity: The entry's own similarity floor.
        model_version: Prior version of the entry.
        encoder_tag: Encoder of the entry's embedding.
        text: The entry's state text (for labels and the reuse verifier).
        actions: The entry's own candidate actions (for the reuse verifier).
    """

    entry_id: int
    similarity: float
    logp: np.ndarray
    coverage: float
    min_similarity: float
    model_version: str
    encoder_tag: str
    text: str = ""
    actions: tuple[str, ...] = ()


@dataclass
class _Entry:
    entry_id: int
    exact_key: bytes
    actions: tuple[str, ...]
    logp: np.ndarray
    model_version: str
    encoder_tag: str
    created_step: int
    last_used_step: int
    hits: int = 0
    visits: int = 1
    slot: int = -1
    min_similarity: float = -1.0
    text: str = ""


class AdaptiveCache:
    """Semantic cache of LM priors with exact and semantic tiers (see docs/cache.md).

    Not thread-safe: the shared actor serialises calls.

    Args:
        config: Cache configuration.
        model_version: Current prior version; entries of another version are misses.
        encoder_tag: Current state-encoder tag; entries of another tag are misses.
    """

    def __init__(
        self, config: CacheConfig, *, model_version: str = "", encoder_tag: str = ""
    ) -> None:
        self.config = config
        self.model_version = model_version
        self.encoder_tag = encoder_tag
        self.capacity_entries = int(config.capacity_entries)
        self.min_cosine_similarity = float(config.min_cosine_similarity)
        self.refresh_probability = float(config.refresh_probability)
        self.explore_probability = self.explore_floor(config.correctness.explore_probability)
        self.correctness = CorrectnessModel(config.correctness)
        # A ReuseVerifier (with p_correct(pairs)) whose score replaces the similarity in the
        # delta rule; set by the owner with the learned encoder it travels with. None: cosine.
        self.verifier: Any = None
        self.labels = LabelStore(config.label_store_size)
        self.index = PriorIndex(config.index_config())
        self.step = 0
        self.stats = CacheStats()
        self.window = WindowCounters()
        self._entries: dict[int, _Entry] = {}
        self._by_key: dict[bytes, int] = {}
        self._ghost: OrderedDict[bytes, None] = OrderedDict()
        self._next_id = 0
        self._id_offset, self._id_stride = 0, 1
        # Labels and evictions another process must hear about (a shard's primary); None: none.
        self.forward: list[tuple[float, bool, int, bool]] | None = None
        self.forward_forgets: list[int] = []
        # Similarity floors to raise on other shards' entries (tau rule), for the owner to send.
        self.remote_narrow: list[tuple[int, float]] = []
        self._rng = np.random.default_rng(config.seed)
        # Eviction priority inputs kept in slot arrays so that a victim is one numpy argmin.
        self._slot_ids = np.full(16, -1, dtype=np.int64)
        self._slot_last = np.zeros(16, dtype=np.float64)
        self._slot_visits = np.zeros(16, dtype=np.float64)
        self._free_slots: list[int] = list(range(15, -1, -1))

    # -- parameters ---------------------------------------------------------------------------
    def set_params(
        self,
        capacity_entries: int | None = None,
        min_cosine_similarity: float | None = None,
        refresh_probability: float | None = None,
        explore_probability: float | None = None,
    ) -> None:
        """Set (K, tau, rho, exploration rate); None keeps a value. Shrinking K evicts at once."""
        k = self.capacity_entries if capacity_entries is None else int(capacity_entries)
        tau = self.min_cosine_similarity if min_cosine_similarity is None else min_cosine_similarity
        rho = self.refresh_probability if refresh_probability is None else refresh_probability
        validate_params(k, tau, rho)
        if explore_probability is not None:
            if not 0.0 <= explore_probability <= 1.0:
                raise ValueError(
                    f"explore_probability must be in [0, 1], got {explore_probability}"
                )
            self.explore_probability = self.explore_floor(explore_probability)
        self.capacity_entries, self.min_cosine_similarity, self.refresh_probability = k, tau, rho
        while len(self._entries) > self.capacity_entries:
            self._evict_one()

    def explore_floor(self, explore_probability: float) -> float:
        """The exploration rate the cache applies: under the delta rule with the on-policy
        guard, at least ``CorrectnessConfig.guard_explore_probability`` (so the guard keeps
        reading what is served, and what the meta-optimiser tunes is the rate applied)."""
        corr = self.config.correctness
        if self.config.reuse_rule == "delta" and corr.served_guard:
            return max(float(explore_probability), corr.guard_explore_probability)
        return float(explore_probability)

    def __len__(self) -> int:
        return len(self._entries)

    def set_id_space(self, offset: int, stride: int) -> None:
        """Number new entries ``offset, offset + stride, ...`` (shard ``offset`` of ``stride``),
        so entry ids are unique across the shards of one cache."""
        if stride < 1 or not 0 <= offset < stride:
            raise ValueError(f"bad id space: offset {offset}, stride {stride}")
        self._id_offset, self._id_stride = offset, stride
        self._next_id += (offset - self._next_id) % stride

    def _reset_correctness(self) -> None:
        """Forget every label, including those not yet sent to a shard's primary."""
        self.correctness.reset()
        if self.forward is not None:
            self.forward.clear()
            self.forward_forgets.clear()

    def raise_floor(self, entry_id: int, floor: float) -> None:
        """Raise an entry's similarity floor, as another shard's wrong label asks."""
        e = self._entries.get(entry_id)
        if e is not None:
            e.min_similarity = max(e.min_similarity, min(1.0, floor))
            self.stats.radius_narrowed += 1

    def holds(self, key: bytes) -> bool:
        """Whether a current entry has this exact key (an exact hit, without recording it)."""
        eid = self._by_key.get(key)
        return eid is not None and self._current(self._entries[eid])

    def skip_ids_through(self, entry_id: int) -> None:
        """Number new entries above ``entry_id`` (in this cache's id space): ids a restarted
        shard issued after its last snapshot may still have labels on shard 0."""
        if entry_id >= self._next_id:
            self._next_id = entry_id + 1
            self._next_id += (self._id_offset - self._next_id) % self._id_stride

    def is_local_id(self, entry_id: int) -> bool:
        """Whether an entry id belongs to this cache's id space (not another shard's)."""
        return entry_id >= 0 and entry_id % self._id_stride == self._id_offset

    # -- validation ---------------------------------------------------------------------------
    def _check_query(self, query: CacheQuery) -> None:
        if not isinstance(query, CacheQuery):
            raise ValueError(f"expected a CacheQuery, got {type(query).__name__}")
        if not isinstance(query.exact_key, bytes) or not query.exact_key:
            raise ValueError("CacheQuery.exact_key must be non-empty bytes")
        emb = query.embedding
        if emb is not None:
            if np.shape(emb) != (self.config.dim,):
                raise ValueError(
                    f"CacheQuery.embedding has shape {np.shape(emb)}, the cache expects "
                    f"({self.config.dim},)"
                )
            if not np.isfinite(emb).all():
                raise ValueError("CacheQuery.embedding holds NaN or inf values")

    def _current(self, e: _Entry) -> bool:
        return e.model_version == self.model_version and e.encoder_tag == self.encoder_tag

    # -- lookup -------------------------------------------------------------------------------
    def lookup(
        self,
        query: CacheQuery,
        *,
        min_cosine_similarity: float | None = None,
        explore_probability: float | None = None,
        update: bool = True,
        remote: tuple[Neighbour, ...] | list[Neighbour] = (),
    ) -> LookupResult:
        """Look a state up without any LM call.

        Args:
            query: The caller's query.
            min_cosine_similarity: Overrides ``tau`` for this lookup (SPSA perturbations of the
                ``tau`` rule).
            explore_probability: Overrides the exploration probability for this lookup (SPSA
                perturbations of the ``delta`` rule).
            update: Record the decision (stats, recency, refresh and exploration draws). False
                is a pure peek.
            remote: Other shards' nearest entries for this query (:meth:`neighbours`), merged
                with this cache's own by similarity.

        Returns:
            A hit with its prior aligned to ``query.request.candidates``, or a miss (flagged
            ``explore`` when the reuse rule would have served it).
        """
        self._check_query(query)
        tau = self.min_cosine_similarity if min_cosine_similarity is None else min_cosine_similarity
        explore = self.explore_probability
        if explore_probability is not None:  # an SPSA perturbation, within the same floor
            explore = self.explore_floor(explore_probability)
        delta_rule = self.config.reuse_rule == "delta"
        cands = query.request.candidates
        result = LookupResult(tier=HitTier.MISS)
        eid = self._by_key.get(query.exact_key)
        if eid is not None:
            e = self._entries[eid]
            if self._current(e):
                logp, cov = align_prior(e.actions, e.logp, cands, self.config.missing_action_margin)
                result = LookupResult(
                    tier=HitTier.EXACT, logp=logp, similarity=1.0, coverage=cov, entry_id=eid
                )
            elif update:
                self.stats.version_misses += 1
                self._remove(eid)
        if (
            not result.hit
            and self.config.semantic_tier
            and query.embedding is not None
            and (len(self.index) or remote)
        ):
            refused = False
            found = self._semantic_candidates(query, remote)
            if delta_rule and self.verifier is not None:  # the verifier's score
                found = self._verified_candidates(query, found)
            else:  # the cosine is the score
                found = ((*c, c[0]) for c in found)
            for sim, i, logp, cov, floor, _text, _actions, score in found:
                if sim < floor or (not delta_rule and sim < tau):
                    continue
                if cov < self.config.min_candidate_coverage:
                    continue
                if delta_rule and not self.correctness.allows(score, i):
                    refused = True
                    continue
                guarded = delta_rule and not self.correctness.guard_open()
                if guarded and not update:  # a peek: the guard would not serve it
                    break
                if delta_rule and update and (guarded or self._rng.random() < explore):
                    result = LookupResult(
                        tier=HitTier.MISS,
                        logp=logp,
                        similarity=sim,
                        coverage=cov,
                        entry_id=i,
                        explore=True,
                    )
                    self.stats.explore_calls += 1
                    self.stats.guard_held += 1 if guarded else 0
                else:
                    result = LookupResult(
                        tier=HitTier.SEMANTIC, logp=logp, similarity=sim, coverage=cov, entry_id=i
                    )
                refused = False
                break
            if refused and update:
                self.stats.semantic_refused += 1
                self.window.semantic_refused += 1
        if update:
            self._record_decision(query, result)
            refreshable = result.tier is HitTier.SEMANTIC or (
                result.tier is HitTier.EXACT and self.config.refresh_exact_hits
            )
            if refreshable and self._rng.random() < self.refresh_probability:
                self.stats.refreshes_scheduled += 1
                result = LookupResult(
                    tier=result.tier,
                    logp=result.logp,
                    similarity=result.similarity,
                    coverage=result.coverage,
                    entry_id=result.entry_id,
                    refresh=True,
                )
        return result

    def reuse_score(
        self,
        query: CacheQuery,
        similarity: float,
        text: str,
        actions: tuple[str, ...],
        aligned_logp: np.ndarray,
    ) -> float:
        """What the correctness model reads for serving a neighbour to ``query``: the cosine
        ``similarity``, or with a reuse verifier (:mod:`cachellm_rl.cache.verifier`) its
        ``P(reuse correct)`` for the pair (0 when either text is unknown: such a pair is never
        served and its label is not fitted)."""
        return self.reuse_scores(query, [(similarity, text, actions, aligned_logp)])[0]

    def reuse_scores(
        self,
        query: CacheQuery,
        neighbours: list[tuple[float, str, tuple[str, ...], np.ndarray]],
    ) -> list[float]:
        """:meth:`reuse_score` of several ``(similarity, text, actions, aligned logp)``
        neighbours of one query, the verifier's in one batch (one forward pass)."""
        if self.verifier is None:
            return [float(sim) for sim, *_ in neighbours]
        from cachellm_rl.cache.verifier import VerifierPair

        scores = [0.0] * len(neighbours)
        pairs, where = [], []
        for k, (sim, text, actions, logp) in enumerate(neighbours):
            if query.text and text:
                where.append(k)
                pairs.append(
                    VerifierPair(
                        text_a=query.text,
                        text_b=text,
                        cos=float(sim),
                        candidates_a=tuple(query.request.candidates),
                        candidates_b=tuple(actions),
                        logp_b=tuple(float(v) for v in logp),
                    )
                )
        if pairs:
            self.stats.verifier_calls += len(pairs)
            for k, p in zip(where, self.verifier.p_correct(pairs), strict=True):
                scores[k] = float(p)
        return scores

    def _verified_candidates(self, query: CacheQuery, found):
        """The delta rule's semantic candidates (``_semantic_candidates``' tuples plus the
        verifier's score): those with enough candidate coverage, scored in one batch, and not
        at all while the correctness model can serve nothing (before its labels). The decisions
        are those of scoring them one at a time, at the cost of one forward pass."""
        cover = self.config.min_candidate_coverage
        items = [c for c in found if c[3] >= cover]
        if not self.correctness.can_serve():  # every candidate is refused: none is scored
            for c in items:
                yield (*c, 0.0)
            return
        scores = self.reuse_scores(query, [(c[0], c[5], c[6], c[2]) for c in items])
        for c, score in zip(items, scores, strict=True):
            yield (*c, score)

    def _semantic_candidates(self, query: CacheQuery, remote):
        """``(similarity, entry id, aligned logp, coverage, entry floor, text, actions)`` of the
        current entries near ``query``, this cache's and ``remote``'s, most similar first
        (aligned lazily: the first acceptable candidate ends the scan)."""
        cands = query.request.candidates
        found: list[tuple[float, int, Neighbour | None]] = []
        if len(self.index) and query.embedding is not None:
            sims, ids = self.index.search(query.embedding, self.config.neighbours)
            for sim, i in zip(sims[0].tolist(), ids[0].tolist(), strict=True):
                if i >= 0 and self._current(self._entries[i]):
                    found.append((float(sim), int(i), None))
        for n in remote:
            if n.model_version == self.model_version and n.encoder_tag == self.encoder_tag:
                found.append((float(n.similarity), n.entry_id, n))
        found.sort(key=lambda t: -t[0])
        for sim, i, n in found:
            if n is not None:
                yield sim, i, n.logp, n.coverage, n.min_similarity, n.text, n.actions
            else:
                e = self._entries[i]
                logp, cov = align_prior(e.actions, e.logp, cands, self.config.missing_action_margin)
                yield sim, i, logp, cov, e.min_similarity, e.text, e.actions

    def neighbours(self, query: CacheQuery) -> list[Neighbour]:
        """This cache's nearest current entries for another shard's query, aligned to its
        candidates (no reuse rule applied, nothing recorded)."""
        self._check_query(query)
        if not self.config.semantic_tier:
            return []
        return list(self._near_entries(query, same_key=True))

    def _near_entries(self, query: CacheQuery, *, same_key: bool = False):
        """The current entries nearest ``query``, most similar first, as :class:`Neighbour`
        records aligned to its candidates; its own state's entry only with ``same_key`` (a
        peer shard may hold it after an encoder switch re-keyed entries in place)."""
        if query.embedding is None or not len(self.index):
            return
        sims, ids = self.index.search(query.embedding, self.config.neighbours)
        for sim, i in zip(sims[0].tolist(), ids[0].tolist(), strict=True):
            if i < 0:
                break
            e = self._entries[i]
            if not self._current(e) or (e.exact_key == query.exact_key and not same_key):
                continue
            logp, cov = align_prior(
                e.actions, e.logp, query.request.candidates, self.config.missing_action_margin
            )
            yield Neighbour(
                entry_id=e.entry_id,
                similarity=float(sim),
                logp=logp,
                coverage=float(cov),
                min_similarity=e.min_similarity,
                model_version=e.model_version,
                encoder_tag=e.encoder_tag,
                text=e.text,
                actions=e.actions,
            )

    def touch(self, entry_ids: list[int]) -> None:
        """Record that another shard served these entries (recency and visits for eviction)."""
        self.step += 1
        for eid in entry_ids:
            e = self._entries.get(eid)
            if e is not None:
                self._mark_used(e)

    def _mark_used(self, e: _Entry) -> None:
        """An entry served a decision now (its hit count and eviction priority)."""
        e.hits += 1
        e.visits += 1
        e.last_used_step = self.step
        self._slot_last[e.slot] = self.step
        self._slot_visits[e.slot] = e.visits

    def _record_decision(self, query: CacheQuery, result: LookupResult) -> None:
        self.step += 1
        s, w = self.stats, self.window
        s.decisions += 1
        w.decisions += 1
        hit = 1.0 if result.hit else 0.0
        d = self.config.hit_rate_ema_decay
        s.hit_rate_ema = hit if s.decisions == 1 else (1 - d) * s.hit_rate_ema + d * hit
        if result.hit:
            w.hits += 1
            if result.tier is HitTier.EXACT:
                s.hits_exact += 1
            else:
                s.hits_semantic += 1
            local = self._entries.get(result.entry_id)
            if local is not None:  # else another shard's entry (it is told apart)
                self._mark_used(local)
        else:
            s.misses += 1
            w.misses += 1
            if query.exact_key in self._ghost:
                del self._ghost[query.exact_key]
                s.capacity_misses += 1
                w.capacity_misses += 1

    def nearest(self, query: CacheQuery) -> tuple[np.ndarray, float] | None:
        """Nearest current-version entry's prior aligned to the query, ignoring tau and coverage.

        Used for the stale fallback when the LM fails. Returns ``(logp, similarity)`` or None.
        """
        self._check_query(query)
        cands = query.request.candidates
        eid = self._by_key.get(query.exact_key)
        if eid is not None:
            e = self._entries[eid]
            return align_prior(e.actions, e.logp, cands, self.config.missing_action_margin)[0], 1.0
        if query.embedding is None or not len(self.index):
            return None
        sims, ids = self.index.search(query.embedding, self.config.neighbours)
        for sim, i in zip(sims[0].tolist(), ids[0].tolist(), strict=True):
            if i >= 0 and self._current(self._entries[i]):
                e = self._entries[i]
                logp, _ = align_prior(e.actions, e.logp, cands, self.config.missing_action_margin)
                return logp, float(sim)
        return None

    def _usable_neighbour(self, query: CacheQuery) -> Neighbour | None:
        """Nearest current entry other than the query's own state whose candidates cover the
        query's (the neighbour a semantic hit could serve)."""
        cover = self.config.min_candidate_coverage
        return next((n for n in self._near_entries(query) if n.coverage >= cover), None)

    def record_label(
        self,
        query: CacheQuery,
        fresh_logp: np.ndarray,
        *,
        source: str,
        entry_id: int | None = None,
        similarity: float | None = None,
        reused_logp: np.ndarray | None = None,
        remote: tuple[Neighbour, ...] | list[Neighbour] = (),
    ) -> ReuseLabel | None:
        """Label the reuse of a cached neighbour for a state the LM has just answered.

        Call it before inserting the fresh prior. The neighbour is ``entry_id`` at
        ``similarity`` when given (the entry an exploration call or a refresh stood in for),
        else the nearest usable neighbour, this cache's or ``remote``'s (none: no label).

        Args:
            query: The state the LM answered.
            fresh_logp: The LM's prior for it.
            source: ``"miss"``, ``"explore"``, ``"refresh"`` or ``"audit"``.
            entry_id: The neighbour, when known.
            similarity: Its similarity, when known.
            reused_logp: The prior reusing ``entry_id`` gives (needed when the entry is
                another shard's).
            remote: Other shards' nearest entries for this query.

        Returns:
            The label, or None when the state had no usable neighbour.
        """
        found: tuple[int, float, np.ndarray, str, tuple[str, ...]] | None = None
        e = self._entries.get(entry_id) if entry_id is not None else None
        if e is not None and similarity is not None and self._current(e):
            logp, _ = align_prior(
                e.actions, e.logp, query.request.candidates, self.config.missing_action_margin
            )
            found = (e.entry_id, float(similarity), logp, e.text, e.actions)
        elif (
            entry_id is not None
            and not self.is_local_id(entry_id)
            and similarity is not None
            and reused_logp is not None
        ):
            n = next((n for n in remote if n.entry_id == entry_id), None)
            text, actions = ("", ()) if n is None else (n.text, n.actions)
            found = (entry_id, float(similarity), np.asarray(reused_logp), text, actions)
        elif entry_id is None:
            own = self._usable_neighbour(query)
            if own is not None:
                found = (own.entry_id, own.similarity, own.logp, own.text, own.actions)
            cover = self.config.min_candidate_coverage
            for n in remote:
                current = n.model_version == self.model_version and (
                    n.encoder_tag == self.encoder_tag
                )
                if current and n.coverage >= cover and (found is None or n.similarity > found[1]):
                    found = (n.entry_id, n.similarity, n.logp, n.text, n.actions)
        if found is None:
            return None
        neighbour_id, sim, reused, neighbour_text, neighbour_actions = found
        score = self.reuse_score(query, sim, neighbour_text, neighbour_actions, reused)
        label = make_label(
            np.asarray(fresh_logp, np.float64),
            reused,
            sim,
            max_tv=self.config.correctness.max_tv,
            source=source,
            env=self.config.env,
            encoder_tag=self.encoder_tag,
            query_text=query.text,
            neighbour_text=neighbour_text,
            entry_id=neighbour_id,
            step=self.step,
            score=None if self.verifier is None else score,
        )
        if source != "audit":  # audits measure the cache; they never change what it does
            # exploration calls and refreshes of served hits are random draws of what the
            # rule serves: the on-policy guard reads them
            on_policy = source in ("explore", "refresh")
            self.correctness.record(score, label.correct, neighbour_id, on_policy=on_policy)
            self.stats.on_policy_labels += int(on_policy)
            self.stats.on_policy_wrong += int(on_policy and not label.correct)
            if on_policy and not label.correct and self.config.reuse_rule == "delta":
                # what was wrong where it would have been served is not served there again
                self._narrow(neighbour_id, sim)
            if self.forward is not None:
                self.forward.append(
                    (float(score), bool(label.correct), int(neighbour_id), on_policy)
                )
        if source in ("explore", "refresh"):
            self.window.served_labels += 1
            self.window.served_wrong += 0 if label.correct else 1
        self.labels.add(label)
        self.stats.labels += 1
        self.stats.labels_wrong += 0 if label.correct else 1
        return label

    def reembed(self, encoder_tag: str, encode) -> int:
        """Switch to another state encoder: re-embed every entry's stored text with ``encode``
        (``texts -> (n, dim)`` unit vectors), rebuild the index, re-key the exact tier under the
        new tag, and reset the correctness model (similarities mean something else now).
        Entries without a text cannot be re-embedded and are dropped, so vectors of two
        encoders never share the index.

        Returns:
            Entries kept.
        """
        keep = [e for e in self._entries.values() if e.text]
        for e in list(self._entries.values()):
            self._remove(e.entry_id)
        self.index = PriorIndex(self.config.index_config())
        self.encoder_tag = encoder_tag
        self._reset_correctness()
        vectors = np.asarray(encode([e.text for e in keep]), np.float32) if keep else None
        for k, e in enumerate(keep):
            e.encoder_tag = encoder_tag
            e.exact_key = exact_key(
                e.text, e.actions, prior_version=e.model_version, encoder_tag=encoder_tag
            )
            self._add_entry(e, None if vectors is None else vectors[k])
        return len(keep)

    def record_audit(
        self,
        query: CacheQuery,
        served_logp: np.ndarray,
        fresh_logp: np.ndarray,
        *,
        similarity: float,
        entry_id: int = -1,
    ) -> ReuseLabel:
        """Record whether a served semantic reuse was correct, measured by a fresh LM answer
        that the caller never saw (an audit). Audits are stored with the labels but never train
        the correctness model."""
        label = make_label(
            np.asarray(fresh_logp, np.float64),
            np.asarray(served_logp, np.float64),
            similarity,
            max_tv=self.config.correctness.max_tv,
            source="audit",
            env=self.config.env,
            encoder_tag=self.encoder_tag,
            query_text=query.text,
            neighbour_text=self._entries[entry_id].text if entry_id in self._entries else "",
            entry_id=entry_id,
            step=self.step,
        )
        self.labels.add(label)
        self.stats.audits += 1
        self.stats.audits_wrong += 0 if label.correct else 1
        return label

    def record_coalesced(self, semantic: bool) -> None:
        """A decision recorded as a miss was answered by another decision's in-flight LM call:
        count it as reuse (exact tier for the same key, semantic for a near state)."""
        s, w = self.stats, self.window
        s.misses -= 1
        w.misses -= 1
        w.hits += 1
        s.coalesced_misses += 1
        if semantic:
            s.hits_semantic += 1
            s.coalesced_semantic += 1
        else:
            s.hits_exact += 1
            s.coalesced_exact += 1

    # -- insertion / eviction -----------------------------------------------------------------
    def _check_response(self, query: CacheQuery, response: PriorResponse) -> np.ndarray:
        logp = np.asarray(response.logp, dtype=np.float32)
        n = len(query.request.candidates)
        if logp.shape != (n,):
            raise ValueError(f"PriorResponse.logp has shape {logp.shape}, expected ({n},)")
        if not np.isfinite(logp).all():
            raise ValueError("PriorResponse.logp holds NaN or inf values")
        return logp

    def insert(self, query: CacheQuery, response: PriorResponse) -> int:
        """Insert (or replace) the prior of a state; returns the entry id.

        A response from a new model version makes it the current version, so older entries
        become misses.
        """
        self._check_query(query)
        logp = self._check_response(query, response)
        if response.model_version and response.model_version != self.model_version:
            if self.model_version:
                self._reset_correctness()  # labels of another prior say nothing about this one
            self.model_version = response.model_version
        self.stats.inserts += 1
        eid = self._by_key.get(query.exact_key)
        if eid is not None:
            e = self._entries[eid]
            e.actions, e.logp = tuple(query.request.candidates), logp
            e.text = query.text or e.text
            e.model_version, e.encoder_tag = self.model_version, self.encoder_tag
            e.last_used_step = self.step
            self._slot_last[e.slot] = self.step
            return eid
        while len(self._entries) >= self.capacity_entries:
            self._evict_one()
        eid = self._next_id
        self._next_id += self._id_stride
        e = _Entry(
            entry_id=eid,
            exact_key=query.exact_key,
            actions=tuple(query.request.candidates),
            logp=logp,
            model_version=self.model_version,
            encoder_tag=self.encoder_tag,
            created_step=self.step,
            last_used_step=self.step,
            text=query.text,
        )
        self._add_entry(e, query.embedding)
        return eid

    def _add_entry(self, e: _Entry, embedding: np.ndarray | None) -> None:
        if not self._free_slots:
            n = len(self._slot_ids)
            self._slot_ids = np.concatenate([self._slot_ids, np.full(n, -1, np.int64)])
            self._slot_last = np.concatenate([self._slot_last, np.zeros(n)])
            self._slot_visits = np.concatenate([self._slot_visits, np.zeros(n)])
            self._free_slots = list(range(2 * n - 1, n - 1, -1))
        e.slot = self._free_slots.pop()
        self._slot_ids[e.slot] = e.entry_id
        self._slot_last[e.slot] = e.last_used_step
        self._slot_visits[e.slot] = e.visits
        self._entries[e.entry_id] = e
        self._by_key[e.exact_key] = e.entry_id
        if embedding is not None:
            self.index.add(np.array([e.entry_id]), np.asarray(embedding, np.float32)[None, :])
        self.stats.size = len(self._entries)

    def _remove(self, eid: int) -> None:
        e = self._entries.pop(eid)
        if self._by_key.get(e.exact_key) == eid:
            del self._by_key[e.exact_key]
        self.index.remove(np.array([eid]))
        self.correctness.forget_entry(eid)
        if self.forward is not None:
            self.forward_forgets.append(eid)
        self._slot_ids[e.slot] = -1
        self._free_slots.append(e.slot)
        self.stats.size = len(self._entries)

    def eviction_priority(self) -> tuple[np.ndarray, np.ndarray]:
        """``(entry ids, priority)`` of live entries; the smallest priority is evicted first."""
        live = self._slot_ids >= 0
        prio = self._slot_last[live] + self.config.visit_bonus_steps * np.log2(
            1.0 + self._slot_visits[live]
        )
        return self._slot_ids[live], prio

    def _evict_one(self) -> None:
        ids, prio = self.eviction_priority()
        victim = int(ids[int(np.argmin(prio))])
        key = self._entries[victim].exact_key
        self._remove(victim)
        self.stats.evictions += 1
        if self.config.ghost_entries:
            self._ghost[key] = None
            self._ghost.move_to_end(key)
            while len(self._ghost) > self.config.ghost_entries:
                self._ghost.popitem(last=False)

    # -- refresh (see docs/cache.md) ----------------------------------------------------------
    def apply_refresh(
        self,
        query: CacheQuery,
        cached_logp: np.ndarray,
        fresh: PriorResponse,
        entry_id: int,
        *,
        similarity: float | None = None,
    ) -> RefreshMeasure:
        """Record the measured cache error of a refreshed hit and store the fresh prior.

        The fresh prior becomes the queried state's own entry. When the hit was semantic, the
        serving entry is kept (it is still exact for its own state) and the refresh is a reuse
        label for it; under the ``tau`` rule, if the refresh found an error
        (:func:`top1_regret` at least ``error_regret_nats``) and ``learn_entry_radius`` is on,
        the serving entry's similarity floor is raised above ``similarity``.

        Args:
            query: The state that was re-queried.
            cached_logp: The prior the cache had served for it (aligned to its candidates).
            fresh: The LM's fresh prior for it.
            entry_id: The entry that served the hit.
            similarity: Cosine similarity the hit was served at (None: unknown).

        Returns:
            The measured KL(fresh || cached), max log-prob gap, top-1 regret and error flag.
        """
        fresh_logp = self._check_response(query, fresh)
        m = RefreshMeasure.of(fresh_logp, cached_logp, self.config.error_regret_nats)
        s = self.stats
        s.refreshes_applied += 1
        s.refresh_kl_last = m.kl
        d = self.config.refresh_kl_ema_decay
        s.refresh_kl_ema = ema(s.refresh_kl_ema, m.kl, d)
        s.refresh_eps_max = max(s.refresh_eps_max, m.eps)
        self.window.refresh_kls.append(m.kl)
        s.refresh_error_ema = ema(s.refresh_error_ema, 1.0 if m.error else 0.0, d)
        if m.error:
            s.refresh_errors += 1
            self.window.refresh_errors += 1
        old = self._entries.get(entry_id)
        if similarity is not None and (
            (old is not None and old.exact_key != query.exact_key)
            or (old is None and not self.is_local_id(entry_id))  # another shard's entry
        ):
            self.record_label(
                query,
                fresh_logp,
                source="refresh",
                entry_id=entry_id,
                similarity=similarity,
                reused_logp=cached_logp,
            )
        if (
            m.error
            and self.config.reuse_rule == "tau"
            and self.config.learn_entry_radius
            and similarity is not None
            and (old is None or old.exact_key != query.exact_key)
        ):
            self._narrow(entry_id, similarity)
        self.insert(query, fresh)
        return m

    def _narrow(self, entry_id: int, similarity: float) -> None:
        """Raise an entry's similarity floor above ``similarity`` (this cache's entry, or
        queued for its shard in ``remote_narrow``)."""
        floor = similarity + self.config.entry_radius_margin
        e = self._entries.get(entry_id)
        if e is not None:
            e.min_similarity = max(e.min_similarity, min(1.0, floor))
            self.stats.radius_narrowed += 1
        elif not self.is_local_id(entry_id):
            self.remote_narrow.append((entry_id, floor))  # its shard narrows it

    # -- persistence --------------------------------------------------------------------------
    def save(
        self,
        directory: str | Path,
        *,
        keep: int = 2,
        extra: dict | None = None,
        blobs: dict[str, bytes] | None = None,
    ) -> Path:
        """Write a snapshot atomically (no pickle) and return its folder.

        Layout: ``directory/snap-<uuid>/`` holds ``index/``, ``entries.json`` (with each entry's
        text), ``logp.npy``, ``offsets.npy``, ``labels.jsonl`` (the reuse labels) and
        ``meta.json`` (config, adapted K/tau/rho and exploration rate, the correctness model's
        labels, encoder and prior versions, ``extra``); ``directory/LATEST`` names the newest
        complete snapshot and is replaced atomically after the snapshot is fully written, so a
        crash mid-write leaves the previous snapshot in force.

        Args:
            directory: Snapshot root.
            keep: Newest snapshots kept.
            extra: JSON-ready state of the owner (e.g. the meta-optimiser's), returned by
                :meth:`read_extra`.
            blobs: Extra files of the owner (e.g. the learned encoder's weights), by file name,
                returned by :meth:`read_blob`.
        """
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        name = f"snap-{self.step:012d}-{uuid.uuid4().hex[:8]}"
        tmp = root / (name + ".partial")
        tmp.mkdir()
        entries = list(self._entries.values())
        self.index.save(tmp / "index")
        offsets = np.cumsum([0] + [len(e.logp) for e in entries]).astype(np.int64)
        logp = (
            np.concatenate([e.logp for e in entries]).astype(np.float32)
            if entries
            else np.zeros(0, np.float32)
        )
        np.save(tmp / "logp.npy", logp, allow_pickle=False)
        np.save(tmp / "offsets.npy", offsets, allow_pickle=False)
        records = [
            {
                "id": e.entry_id,
                "key": e.exact_key.hex(),
                "actions": list(e.actions),
                "model_version": e.model_version,
                "encoder_tag": e.encoder_tag,
                "created": e.created_step,
                "last_used": e.last_used_step,
                "hits": e.hits,
                "visits": e.visits,
                "min_similarity": e.min_similarity,
                "text": e.text,
            }
            for e in entries
        ]
        (tmp / "entries.json").write_text(json.dumps(records))
        with (tmp / "labels.jsonl").open("w") as fh:
            for r in self.labels.records():
                fh.write(json.dumps(r) + "\n")
        stats = {k: v for k, v in self.stats.as_flat_dict().items() if not k.startswith("latency_")}
        meta = {
            "format": SNAPSHOT_FORMAT,
            "config": asdict(self.config),
            "model_version": self.model_version,
            "encoder_tag": self.encoder_tag,
            "params": [self.capacity_entries, self.min_cosine_similarity, self.refresh_probability],
            "explore_probability": self.explore_probability,
            "correctness": self.correctness.state_dict(),
            "labels_total": self.labels.total,
            "extra": extra or {},
            "step": self.step,
            "next_id": self._next_id,
            "ghost": [k.hex() for k in self._ghost],
            "stats": stats,
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        for fname, data in (blobs or {}).items():
            if "/" in fname or fname in ("meta.json", "entries.json", "labels.jsonl"):
                raise ValueError(f"bad snapshot blob name {fname!r}")
            (tmp / fname).write_bytes(data)
        final = root / name
        tmp.rename(final)
        atomic_write_text(root / SNAPSHOT_POINTER, name)
        self.stats.snapshots_written += 1
        snaps = sorted(p for p in root.glob("snap-*") if not p.name.endswith(".partial"))
        for old in snaps:
            if old.name != name and old not in snaps[-keep:]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def latest_snapshot(directory: str | Path) -> Path | None:
        """The snapshot folder ``LATEST`` points to, or None."""
        root = Path(directory)
        pointer = root / SNAPSHOT_POINTER
        if not pointer.is_file():
            return None
        snap = root / pointer.read_text().strip()
        return snap if snap.is_dir() else None

    @staticmethod
    def read_extra(directory: str | Path) -> dict:
        """The ``extra`` state saved with the latest snapshot under ``directory`` ({} if none)."""
        path = Path(directory)
        snap = path if (path / "meta.json").is_file() else AdaptiveCache.latest_snapshot(path)
        if snap is None:
            return {}
        return dict(json.loads((snap / "meta.json").read_text()).get("extra") or {})

    @staticmethod
    def read_blob(directory: str | Path, name: str) -> bytes | None:
        """A file saved through ``save(blobs=...)`` with the latest snapshot (None if absent)."""
        path = Path(directory)
        snap = path if (path / "meta.json").is_file() else AdaptiveCache.latest_snapshot(path)
        if snap is None or not (snap / name).is_file():
            return None
        return (snap / name).read_bytes()

    @classmethod
    def restore(cls, directory: str | Path, config: CacheConfig | None = None) -> AdaptiveCache:
        """Load the latest snapshot under ``directory`` (or a snapshot folder itself).

        Entries, the adapted K/tau/rho and exploration rate, the correctness model's labels,
        the label store, stats and versions all come back; ``config`` decides only the
        semantics (rule, bounds, index).

        Args:
            directory: Snapshot root (with ``LATEST``) or one ``snap-*`` folder.
            config: Config to restore into; None uses the stored one. Its ``dim`` must match.

        Raises:
            FileNotFoundError: No snapshot there.
            ValueError: The stored embedding dimension differs from ``config.dim``.
        """
        path = Path(directory)
        snap = path if (path / "meta.json").is_file() else cls.latest_snapshot(path)
        if snap is None:
            raise FileNotFoundError(f"no cache snapshot under {str(path)!r}")
        meta = json.loads((snap / "meta.json").read_text())
        if meta.get("format") not in (1, SNAPSHOT_FORMAT):  # 1: before reuse labels
            raise ValueError(f"unsupported snapshot format {meta.get('format')!r} in {snap}")
        stored = CacheConfig(**meta["config"])
        cfg = config or stored
        if stored.dim != cfg.dim:
            raise ValueError(
                f"embedding dimension mismatch on restore: snapshot {str(snap)!r} has dim "
                f"{stored.dim}, the cache expects dim {cfg.dim}"
            )
        cache = cls(cfg, model_version=meta["model_version"], encoder_tag=meta["encoder_tag"])
        k, tau, rho = meta["params"]
        cache.set_params(k, tau, rho)
        cache.explore_probability = cache.explore_floor(
            meta.get("explore_probability", cfg.correctness.explore_probability)
        )
        if "correctness" in meta:
            cache.correctness = CorrectnessModel.from_state(meta["correctness"], cfg.correctness)
        labels_file = snap / "labels.jsonl"
        if labels_file.is_file():
            with labels_file.open() as fh:
                cache.labels.extend_records(json.loads(line) for line in fh if line.strip())
            cache.labels.total = int(meta.get("labels_total", cache.labels.total))
        cache.index = PriorIndex.load(snap / "index", cfg.index_config())
        logp = np.load(snap / "logp.npy", allow_pickle=False)
        offsets = np.load(snap / "offsets.npy", allow_pickle=False)
        records = json.loads((snap / "entries.json").read_text())
        for j, r in enumerate(records):
            e = _Entry(
                entry_id=int(r["id"]),
                exact_key=bytes.fromhex(r["key"]),
                actions=tuple(r["actions"]),
                logp=logp[offsets[j] : offsets[j + 1]].copy(),
                model_version=r["model_version"],
                encoder_tag=r["encoder_tag"],
                created_step=int(r["created"]),
                last_used_step=int(r["last_used"]),
                hits=int(r["hits"]),
                visits=int(r["visits"]),
                min_similarity=float(r.get("min_similarity", -1.0)),
                text=str(r.get("text", "")),
            )
            cache._add_entry(e, None)  # vectors come from the saved index
        cache.step = int(meta["step"])
        cache._next_id = int(meta["next_id"])
        cache._ghost = OrderedDict((bytes.fromhex(k), None) for k in meta["ghost"])
        for k, v in meta["stats"].items():
            if (
                hasattr(cache.stats, k)
                and k not in ("hits", "hit_rate")
                and not isinstance(getattr(type(cache.stats), k, None), property)
            ):
                setattr(cache.stats, k, type(getattr(cache.stats, k))(v))
        cache.stats.size = len(cache._entries)
        cache.stats.restored_entries = len(records)
        while len(cache._entries) > cache.capacity_entries:
            cache._evict_one()
        return cache

    # -- stats --------------------------------------------------------------------------------
    def snapshot_stats(self) -> CacheStats:
        """A copy of the stats with the current parameters filled in."""
        import copy

        s = copy.deepcopy(self.stats)
        s.size = len(self._entries)
        s.capacity_entries = self.capacity_entries
        s.min_cosine_similarity = self.min_cosine_similarity
        s.refresh_probability = self.refresh_probability
        s.explore_probability = self.explore_probability
        return s

    def unused_fraction(self) -> float:
        """Fraction of live entries never hit since insertion."""
        if not self._entries:
            return 0.0
        return sum(1 for e in self._entries.values() if e.hits == 0) / len(self._entries)

    def take_window(self) -> WindowCounters:
        """Return and reset the signals accumulated since the last call."""
        w, self.window = self.window, WindowCounters()
        return w

    def entry_prior(self, entry_id: int) -> dict[str, float]:
        """``{action: logp}`` of an entry (for inspection and tests)."""
        e = self._entries[entry_id]
        return dict(zip(e.actions, e.logp.tolist(), strict=True))
