"""``SharedPriorCache``: the adaptive cache as a named async Ray actor shared by all rollout
workers (see docs/architecture.md). A thin shell around :class:`AdaptiveCache` and
:class:`MetaOptimizer`; the LM is reached through the ``PriorServer`` Serve application.

Reliability: an LM call has a timeout; on failure or timeout the caller gets the nearest cached
prior (marked stale) or the uniform prior, counted, never an exception. Snapshots are written
atomically (no pickle) and a restarted actor restores the latest one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray

from cachellm_rl.cache.adaptive import (
    AdaptiveCache,
    CacheConfig,
    CacheStats,
    Neighbour,
    WindowCounters,
    align_prior,
)
from cachellm_rl.cache.correctness import CorrectnessModel
from cachellm_rl.cache.meta import CacheParams, MetaConfig, MetaOptimizer, WindowSignals
from cachellm_rl.cache.sharding import merge_stats, merge_window, shard_name
from cachellm_rl.contracts import (
    DEFAULT_PRIOR_APP,
    CacheQuery,
    HitTier,
    LookupResult,
    PriorRequest,
    PriorResponse,
    PriorResult,
    PriorSource,
)

logger = logging.getLogger(__name__)

DEFAULT_CACHE_NAME = "cachellm_prior_cache"
ENCODER_BLOB = "encoder.bin"
DEFAULT_NAMESPACE = "cachellm_rl"
MAX_UNACKED = 300  # exchanges a shard keeps for shard 0 while it does not answer
LAYOUT_RETRY_S = 5.0  # the least time between two asks of Serve for the prompt layout
# one exchange a shard sends shard 0: its number, decision window, labels
# ``(score, correct, entry id, on-policy)`` and evicted entry ids
Payload = tuple[int, WindowCounters, list[tuple[float, bool, int, bool]], list[int]]


@dataclass(frozen=True, kw_only=True)
class SharedCacheConfig:
    """Settings of the shared cache actor.

    Attributes:
        cache: Cache semantics (K, tau, rho, coverage, index).
        meta: Meta-optimisation of (K, tau, rho).
        prior_app: Name of the ``PriorServer`` Serve application; None means no LM (every miss
            falls back, useful only for exact-replay tools).
        encoder_tag: Tag of the state encoder the callers use.
        lm_timeout_s: Timeout of one LM call; then the fallback prior is used.
        snapshot_dir: Where snapshots go and are restored from (None: no persistence).
        snapshot_interval_s: Minimum seconds between automatic snapshots (0: only explicit).
        max_restarts: Ray restarts of the actor after a crash (-1: unlimited).
        num_cpus: CPUs reserved for the actor.
        bypass: Uncached baseline: every decision is a miss answered by its own LM call (no
            insert, no coalescing); the counters and latency histograms still fill.
        encoder_dir: A learned state encoder (``DecisionStateEncoder.save`` folder) the cache
            holds and hands to its callers (the version handshake); None: the callers' own
            encoder (MiniLM) and its tag. A snapshot's encoder takes precedence on restore.
        audit_probability: Chance that a served semantic reuse (a semantic hit or a near
            in-flight answer) is audited: a fresh LM call in the background, compared with
            what was served, that changes nothing the caller got. Counted apart
            (``audit_queries``), never in ``lm_queries``.
        resources: Custom Ray resources the actor reserves (e.g. ``{"prior": 0.001}`` puts it
            on the node that advertises ``prior``, beside the Serve replica); empty: the
            creator's node is preferred.
        num_shards: Cache actors sharing the load (see docs/cluster.md, "A sharded cache"):
            a state's exact key picks the shard that owns it, semantic search fans out to all
            shards, shard 0 keeps the meta-optimiser and the correctness model.
            ``capacity_entries`` is per shard. 1: one actor.
        shard_index: This actor's shard (set by :func:`get_or_create_cache`).
        shard_group: Name of shard 0 (the cache's name; set by :func:`get_or_create_cache`).
        shard_namespace: Ray namespace of the shards.
        shard_sync_interval_s: Seconds between a shard's exchanges with shard 0 (its decision
            window and labels go up; parameters and the correctness model come back).
        fanout_timeout_s: How long a shard waits for a peer's nearest entries (or shard 0's
            answer to an exchange); then it decides on its own entries (counted in
            ``shard_fanout_failures``).
        fanout_backoff_s: Seconds a peer that did not answer is skipped (a restarting shard
            would otherwise cost every call ``fanout_timeout_s``).
    """

    cache: CacheConfig = field(default_factory=CacheConfig)
    meta: MetaConfig = field(default_factory=lambda: MetaConfig(mode="static"))
    prior_app: str | None = DEFAULT_PRIOR_APP
    encoder_tag: str = ""
    lm_timeout_s: float = 30.0
    snapshot_dir: str | None = None
    snapshot_interval_s: float = 60.0
    max_restarts: int = 3
    num_cpus: float = 0.0
    bypass: bool = False
    encoder_dir: str | None = None
    audit_probability: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    num_shards: int = 1
    shard_index: int = 0
    shard_group: str = ""
    shard_namespace: str = "cachellm_rl"
    shard_sync_interval_s: float = 1.0
    fanout_timeout_s: float = 1.0
    fanout_backoff_s: float = 5.0

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ValueError(f"SharedCacheConfig.num_shards must be >= 1, got {self.num_shards}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(
                f"SharedCacheConfig.shard_index {self.shard_index} is not in [0, {self.num_shards})"
            )
        if self.num_shards > 1 and self.meta.mode == "spsa":
            raise ValueError(
                "the spsa meta mode runs on a single cache actor; use num_shards=1 or the "
                "heuristic/static meta mode"
            )
        if self.shard_sync_interval_s <= 0 or self.fanout_timeout_s <= 0:
            raise ValueError("shard_sync_interval_s and fanout_timeout_s must be > 0")
        if self.fanout_backoff_s < 0:
            raise ValueError("fanout_backoff_s must be >= 0")
        if not self.lm_timeout_s > 0:
            raise ValueError(f"SharedCacheConfig.lm_timeout_s must be > 0, got {self.lm_timeout_s}")
        if self.snapshot_interval_s < 0:
            raise ValueError("SharedCacheConfig.snapshot_interval_s must be >= 0")
        if not 0.0 <= self.audit_probability <= 1.0:
            raise ValueError(
                "SharedCacheConfig.audit_probability must be in [0, 1], got "
                f"{self.audit_probability}"
            )


def _retrieve_exception(fut: asyncio.Future) -> None:
    """Mark a future's exception as seen (its waiter may have timed out already)."""
    if not fut.cancelled():
        fut.exception()


async def _failed(exc: BaseException):
    """An awaitable that raises ``exc`` (a peer call that could not even be sent)."""
    raise exc


def _reconstructed() -> bool:
    """Whether this process is a Ray actor restarted after its first instance died."""
    try:
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # not inside an actor (unit tests of the class itself)
        return False


def uniform_logp(n: int) -> np.ndarray:
    """Uniform log-prior over ``n`` candidates."""
    return np.full(n, -math.log(n), dtype=np.float32)


class SharedPriorCache:
    """Async actor class; create it with :func:`get_or_create_cache`.

    Args:
        config: Actor settings.
    """

    def __init__(self, config: SharedCacheConfig) -> None:
        self.config = config
        self._meta = MetaOptimizer(config.meta)
        self._encoder: Any = None  # a learned DecisionStateEncoder, when the cache holds one
        self._encoder_blob: bytes | None = None
        self._audit_rng = np.random.default_rng(config.cache.seed + 1)
        self._snapshot_dir = (
            None if config.snapshot_dir is None else self._shard_dir(config.snapshot_dir)
        )
        self._cache = self._restore_or_new()
        self._cache.set_id_space(config.shard_index, config.num_shards)
        if config.shard_index > 0:
            self._cache.forward = []  # labels and evictions go to shard 0
        if _reconstructed():  # Ray restarted this actor after a crash or a kill
            self._cache.stats.actor_restarts += 1
        self._peer_handles: dict[int, Any] = {}
        self._peer_down_until: dict[int, float] = {}
        self._last_sync = -math.inf
        self._syncing = False
        # Exchanges with shard 0 not yet acknowledged, numbered per incarnation of this shard,
        # so a retried exchange is applied once (shard 0 keeps the last number it applied).
        self._incarnation = uuid.uuid4().hex
        self._sync_seq = 0
        self._unacked: list[tuple[int, WindowCounters, list, list]] = []
        self._applied_seq: dict[tuple[int, str], int] = {}
        self._handle = None
        self._inflight: dict[bytes, asyncio.Future] = {}
        self._inflight_near: dict[bytes, tuple[np.ndarray, frozenset[str]]] = {}
        self._background: set[asyncio.Task] = set()
        # LM requests made in the same event-loop turn, sent to Serve as one call.
        self._lm_pending: list[tuple[PriorRequest, asyncio.Future]] = []
        self._last_snapshot = time.monotonic()
        self._version_checked = False
        self._prompt_layout: dict | None = None
        self._prompt_layout_version: str | None = None
        self._layout_task: asyncio.Future | None = None
        self._layout_retry_at = 0.0
        self.refresh_failures = 0
        self._calls: dict[str, list[int]] = {}

    # -- setup --------------------------------------------------------------------------------
    def _restore_or_new(self) -> AdaptiveCache:
        cfg = self.config
        tag = cfg.encoder_tag
        if cfg.encoder_dir:
            from cachellm_rl.cache.learned_encoder import DecisionStateEncoder

            self._install_encoder(DecisionStateEncoder.load(cfg.encoder_dir).to_bytes())
            tag = self._encoder.tag
        snap = self._snapshot_dir
        if snap and AdaptiveCache.latest_snapshot(snap) is not None:
            self._check_layout(snap)
            cache = AdaptiveCache.restore(snap, cfg.cache)
            self._meta.load_state(AdaptiveCache.read_extra(snap).get("meta", {}))
            blob = AdaptiveCache.read_blob(snap, ENCODER_BLOB)
            if blob is not None:
                self._install_encoder(blob)
                tag = self._encoder.tag
            logger.info("restored %d cache entries from %s", len(cache), snap)
            if cache.encoder_tag != tag:
                cache.encoder_tag = tag  # entries of the old encoder become misses
        else:
            cache = AdaptiveCache(cfg.cache, encoder_tag=tag)
        cache.verifier = None if self._encoder is None else self._encoder.verifier
        return cache

    def _check_layout(self, snapshot: str | Path) -> None:
        """Refuse a snapshot written by a cache with another shard count (its keys belong to
        other shards, its entry ids to another id space)."""
        stored = int(AdaptiveCache.read_extra(snapshot).get("num_shards", 1))
        if stored != self.config.num_shards:
            raise ValueError(
                f"the snapshot in {str(snapshot)!r} was written by a cache of {stored} shard(s); "
                f"this cache has {self.config.num_shards} (restore it with num_shards={stored})"
            )

    def _shard_dir(self, root: str | Path) -> str:
        """This shard's snapshot folder under ``root`` (``root`` itself for one actor)."""
        if self.config.num_shards == 1:
            return str(root)
        return str(Path(root) / f"shard-{self.config.shard_index}")

    def _peer(self, index: int):
        """Handle of shard ``index`` of this cache (looked up by name, kept)."""
        if index not in self._peer_handles:
            self._peer_handles[index] = ray.get_actor(
                shard_name(self.config.shard_group, index), namespace=self.config.shard_namespace
            )
        return self._peer_handles[index]

    def _others(self) -> list[int]:
        return [i for i in range(self.config.num_shards) if i != self.config.shard_index]

    def _peer_failed(self, index: int) -> None:
        self._peer_handles.pop(index, None)  # looked up by name again next time
        self._peer_down_until[index] = time.monotonic() + self.config.fanout_backoff_s

    def _tell(self, shard: int, method: str, *args) -> None:
        """Call ``method`` on another shard without waiting for it (a gone shard loses only
        what it was told)."""
        try:
            getattr(self._peer(shard), method).remote(*args)
        except Exception:
            self._peer_failed(shard)

    def _send_floors(self) -> None:
        """Ask other shards to raise the floors of their entries that served wrong priors."""
        pending, self._cache.remote_narrow = self._cache.remote_narrow, []
        for eid, floor in pending:
            self._tell(eid % self.config.num_shards, "raise_floor", eid, floor)

    def raise_floor(self, entry_id: int, floor: float) -> None:
        """Another shard's refresh (``tau`` rule) or on-policy label (``delta``) found this
        shard's entry served a wrong prior: raise the entry's similarity floor."""
        self._cache.raise_floor(entry_id, floor)

    async def _on_peers(
        self, method: str, *args, peers: list[int] | None = None, timeout: float | None = None
    ) -> list[Any]:
        """Call ``method`` on ``peers`` (every other shard by default) and wait, at most
        ``timeout`` seconds each; results or exceptions, in the order of ``peers``."""
        refs = []
        for i in self._others() if peers is None else peers:
            try:
                ref = getattr(self._peer(i), method).remote(*args)
                refs.append(ref if timeout is None else asyncio.wait_for(ref, timeout))
            except Exception as exc:  # the peer is gone (being restarted)
                refs.append(_failed(exc))
        return list(await asyncio.gather(*refs, return_exceptions=True))

    def topology(self) -> tuple[int, str, str]:
        """``(num_shards, name of shard 0, namespace)``: what a caller needs to route."""
        return self.config.num_shards, self.config.shard_group, self.config.shard_namespace

    def _install_encoder(self, blob: bytes):
        import torch

        from cachellm_rl.cache.learned_encoder import DecisionStateEncoder

        # The verifier's forward passes are tiny (a few pairs per lookup): one thread. Two
        # threads on a loaded machine wait on each other and doubled a lookup's time.
        torch.set_num_threads(1)
        self._encoder = DecisionStateEncoder.from_bytes(blob, memo_entries=0)
        self._encoder_blob = blob
        return self._encoder

    def encoder_blob(self) -> bytes | None:
        """The learned encoder the cache holds (config and weights), None when the callers'
        own encoder is used: what a caller fetches when its tag differs from the cache's."""
        return self._encoder_blob

    async def set_encoder(self, blob: bytes, _fan_out: bool = True) -> dict[str, object]:
        """Switch the cache to a new learned encoder version: the stored entry texts are
        re-embedded with it (in the actor: the learned encoder is cheap), the exact tier is
        re-keyed and the correctness model restarts. Callers see the new tag in their next
        results and fetch the encoder; until then their embeddings are ignored. A sharded
        cache switches every shard (one encoder version across shards).

        Returns:
            ``{"tag": new tag, "entries": entries kept}`` (over all shards).
        """
        enc = self._install_encoder(blob)
        kept = self._cache.reembed(enc.tag, enc.encode)
        self._cache.verifier = enc.verifier
        if _fan_out and self.config.num_shards > 1:
            for out in await self._on_peers("set_encoder", blob, False):
                if isinstance(out, BaseException):
                    raise RuntimeError(f"a shard could not switch encoders: {out!r}")
                kept += int(out["entries"])
        return {"tag": enc.tag, "entries": kept}

    def _lm(self):
        if self._handle is None:
            if self.config.prior_app is None:
                raise RuntimeError("no prior_app configured")
            from ray import serve

            self._handle = serve.get_app_handle(self.config.prior_app)
        return self._handle

    async def versions(self) -> tuple[str, str]:
        """``(prior model version, encoder tag)``: what callers hash into exact keys."""
        if not self._version_checked and self.config.prior_app is not None:
            try:
                version = await asyncio.wait_for(
                    self._lm().model_version.remote(), self.config.lm_timeout_s
                )
                self._cache.model_version = version
                self._version_checked = True
            except Exception as exc:
                logger.warning("could not read the prior's model version: %r", exc)
        return self._cache.model_version, self._cache.encoder_tag

    async def prompt_layout(self) -> dict | None:
        """The served prior's prompt layout (``PromptConfig`` fields; ``{}`` without a prior
        app), asked of Serve once per prior version and kept. Callers arriving while it is
        being asked wait for the same answer. None when Serve could not say: callers then send
        no request (a prompt in a guessed layout would give a wrong prior under the right
        version); Serve is asked again at most once per ``LAYOUT_RETRY_S``."""
        if self.config.prior_app is None:
            return {}
        version = self._cache.model_version
        if self._prompt_layout is not None and self._prompt_layout_version == version:
            return self._prompt_layout
        if self._layout_task is None or self._layout_task.done():
            if time.monotonic() < self._layout_retry_at:
                return None
            self._layout_task = asyncio.ensure_future(self._fetch_layout(version))
        return await asyncio.shield(self._layout_task)

    async def _fetch_layout(self, version: str | None) -> dict | None:
        try:
            layout = dict(
                await asyncio.wait_for(self._lm().prompt_layout.remote(), self.config.lm_timeout_s)
            )
        except Exception as exc:
            logger.warning("could not read the prior's prompt layout: %r", exc)
            self._layout_retry_at = time.monotonic() + LAYOUT_RETRY_S
            return None
        self._prompt_layout, self._prompt_layout_version = layout, version
        return layout

    def ping(self) -> bool:
        """Liveness check."""
        return True

    def check_queries(self, queries: list[CacheQuery]) -> int:
        """Validate ``queries`` as :meth:`get_priors` would (shape and dimension of the
        embeddings, keys) without looking anything up or calling the LM: a caller's
        configuration check before it starts sending real queries. Raises ValueError; returns
        how many queries were checked."""
        self._validate(queries)
        return len(queries)

    # -- main path ----------------------------------------------------------------------------
    def _validate(self, queries: list[CacheQuery]) -> None:
        if not isinstance(queries, list | tuple):
            raise ValueError(f"queries must be a list of CacheQuery, got {type(queries).__name__}")
        for q in queries:
            self._cache._check_query(q)

    def _spsa_perturbation(self, caller_id: int | None) -> tuple[int, float | None, float | None]:
        """SPSA sign of a caller and the lookup overrides it implies: ``(sign, tau, explore)``,
        one of the two perturbed, the other None."""
        spsa = self._meta.spsa
        if spsa is None:
            return 0, None, None
        sign = spsa.sign_for(caller_id)
        step = sign * self.config.meta.spsa_delta
        if self._cache.config.reuse_rule == "delta":
            return sign, None, self._cache.explore_probability + step
        return sign, self._cache.min_cosine_similarity + step, None

    async def lookup_batch(self, queries: list[CacheQuery]) -> list[LookupResult]:
        """Look states up without any LM call (records decisions; schedules no refresh)."""
        self._validate(queries)
        return [self._cache.lookup(q) for q in queries]

    async def get_priors(
        self, queries: list[CacheQuery], caller_id: int | None = None
    ) -> list[PriorResult]:
        """Lookup, coalesced miss resolution through the LM, insert; one call per vector step.

        Args:
            queries: One query per sub-env.
            caller_id: Stable id of the calling env runner (SPSA sign assignment).

        Returns:
            One usable prior per query, aligned to its candidates.
        """
        t0 = time.perf_counter()
        self._validate(queries)
        if self.config.num_shards > 1 and not self._version_checked:
            await self.versions()  # callers ask shard 0 only; peers' entries must match ours
        if self.config.shard_index > 0 and self._sync_seq == 0:
            await self.sync_now()  # shard 0's model and parameters (and id floor) first
        queries = [self._same_encoder(q) for q in queries]
        calls = self._calls.setdefault(str(caller_id), [0, 0])
        calls[0] += 1
        calls[1] += len(queries)
        sign, tau, explore = self._spsa_perturbation(caller_id)
        results: list[PriorResult | None] = [None] * len(queries)
        misses: list[tuple[int, LookupResult]] = []
        lm_before = self._cache.stats.lm_queries
        remote = await self._fan_out(queries)
        touched: dict[int, list[int]] = {}
        for i, q in enumerate(queries):
            r = self._cache.lookup(
                q, min_cosine_similarity=tau, explore_probability=explore, remote=remote[i]
            )
            if r.hit and not self._cache.is_local_id(r.entry_id):
                self._cache.stats.hits_remote += 1
                touched.setdefault(r.entry_id % self.config.num_shards, []).append(r.entry_id)
            if r.hit:
                assert r.logp is not None, "a cache hit always carries its prior"
                ms = (time.perf_counter() - t0) * 1e3
                src = (
                    PriorSource.CACHE_EXACT
                    if r.tier is HitTier.EXACT
                    else PriorSource.CACHE_SEMANTIC
                )
                results[i] = PriorResult(
                    logp=r.logp,
                    source=src,
                    latency_ms=ms,
                    model_version=self._cache.model_version,
                    encoder_tag=self._cache.encoder_tag,
                )
                self._cache.stats.latency_hit.record(ms)
                if r.refresh:
                    self._spawn(self._refresh(q, r))
                elif r.tier is HitTier.SEMANTIC and r.similarity is not None:
                    self._maybe_audit(q, r.logp, r.similarity, r.entry_id)
            else:
                misses.append((i, r))
        for shard, ids in touched.items():  # the serving shards keep their recency right
            self._tell(shard, "touch", ids)
        if misses:
            resolved = await asyncio.gather(
                *[self._resolve_miss(queries[i], t0, r, remote[i]) for i, r in misses]
            )
            for (i, _), res in zip(misses, resolved, strict=True):
                results[i] = res
        self._after_decisions(len(queries), sign, self._cache.stats.lm_queries - lm_before)
        return results  # type: ignore[return-value]

    async def _fan_out(self, queries: list[CacheQuery]) -> list[list[Neighbour]]:
        """The other shards' nearest entries for each query this shard does not hold exactly
        (one call per peer, in parallel); empty lists for one actor."""
        out: list[list[Neighbour]] = [[] for _ in queries]
        cfg = self.config
        if cfg.num_shards == 1 or cfg.bypass or not self._cache.config.semantic_tier:
            return out
        need = [
            i
            for i, q in enumerate(queries)
            if q.embedding is not None and not self._cache.holds(q.exact_key)
        ]
        if not need:
            return out
        self._cache.stats.shard_fanouts += 1
        sub = [queries[i] for i in need]
        now = time.monotonic()
        peers = [j for j in self._others() if self._peer_down_until.get(j, 0.0) <= now]
        self._cache.stats.shard_fanout_failures += cfg.num_shards - 1 - len(peers)
        answers = await self._on_peers("neighbours", sub, peers=peers, timeout=cfg.fanout_timeout_s)
        for j, answer in zip(peers, answers, strict=True):
            if isinstance(answer, BaseException):
                self._cache.stats.shard_fanout_failures += 1
                self._peer_failed(j)
                continue
            for i, found in zip(need, answer, strict=True):
                out[i].extend(found)
        return out

    def neighbours(self, queries: list[CacheQuery]) -> list[list[Neighbour]]:
        """This shard's nearest current entries for another shard's queries (nothing
        recorded: the asking shard decides and tells the serving shard with :meth:`touch`)."""
        return [self._cache.neighbours(q) for q in queries]

    def touch(self, entry_ids: list[int]) -> None:
        """Another shard served these entries of this shard."""
        self._cache.touch(entry_ids)

    def _same_encoder(self, q: CacheQuery) -> CacheQuery:
        """``q`` without its embedding when another encoder computed it: versions never mix.
        A cache without a tag of its own ('': the callers' encoder) takes every embedding."""
        own = self._cache.encoder_tag
        if q.embedding is None or not q.encoder_tag or not own or q.encoder_tag == own:
            return q
        self._cache.stats.encoder_mismatches += 1
        return dataclasses.replace(q, embedding=None)

    def _maybe_audit(
        self, q: CacheQuery, served: np.ndarray, similarity: float, entry_id: int = -1
    ) -> None:
        if self.config.audit_probability > 0 and self._audit_rng.random() < (
            self.config.audit_probability
        ):
            self._spawn(self._audit(q, np.asarray(served), similarity, entry_id))

    async def _audit(
        self, q: CacheQuery, served: np.ndarray, similarity: float, entry_id: int
    ) -> None:
        try:
            fresh = await self._call_lm(q.request, audit=True)
            self._cache.record_audit(
                q, served, fresh.logp, similarity=similarity, entry_id=entry_id
            )
        except Exception as exc:
            logger.debug("audit failed: %r", exc)

    async def _call_lm(self, request: PriorRequest, *, audit: bool = False) -> PriorResponse:
        """One LM answer, with the timeout. Requests made in the same event-loop turn (the
        misses and refreshes of one ``get_priors`` call) travel to Serve in one call. An audit
        call is counted apart (``audit_queries``), never as one of the method's LM queries."""
        if audit:
            self._cache.stats.audit_queries += 1
        else:
            self._cache.stats.lm_queries += 1
            self._cache.window.lm_queries += 1
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        fut.add_done_callback(_retrieve_exception)
        self._lm_pending.append((request, fut))
        if len(self._lm_pending) == 1:
            loop.call_soon(self._flush_lm)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.config.lm_timeout_s)
        except asyncio.TimeoutError:
            self._cache.stats.lm_timeouts += 1
            raise

    def _flush_lm(self) -> None:
        pending, self._lm_pending = self._lm_pending, []
        if pending:
            self._spawn(self._send_lm(pending))

    async def _send_lm(self, pending: list[tuple[PriorRequest, asyncio.Future]]) -> None:
        try:
            answers = await self._lm().score_many.remote([r for r, _ in pending])
        except Exception as exc:
            answers = [exc] * len(pending)
        for (_, fut), answer in zip(pending, answers, strict=True):
            if fut.done():
                continue
            if isinstance(answer, BaseException):
                fut.set_exception(answer)
            else:
                fut.set_result(answer)

    def _near_inflight(self, q: CacheQuery) -> tuple[bytes, float] | None:
        """An in-flight LM request for a near state whose answer this query may reuse, under the
        same reuse rule as a semantic hit (the pooled correctness curve under ``delta``, since
        the leader has no entry yet; ``cos >= tau`` under ``tau``). None in a cache without a
        semantic tier (``exact_only``): it reuses nothing but exact keys. None under ``delta``
        with the on-policy guard (the default): such a reuse is never explored or refreshed,
        so the guard could not check it; and None with a reuse verifier, whose curve reads
        the verifier's score of a cached prior, which an answer still in flight does not
        have."""
        if q.embedding is None or not self._inflight_near or not self._cache.config.semantic_tier:
            return None
        cache = self._cache
        if cache.config.reuse_rule == "delta" and (
            cache.verifier is not None or cache.config.correctness.served_guard
        ):
            return None
        cands = q.request.candidates
        for key, (emb, leader_cands) in self._inflight_near.items():
            sim = float(np.dot(emb, q.embedding))
            cov = sum(1 for c in cands if c in leader_cands) / len(cands)
            if cov < cache.config.min_candidate_coverage:
                continue
            if cache.config.reuse_rule == "delta":
                if cache.correctness.allows(sim):
                    return key, sim
            elif sim >= cache.min_cosine_similarity:
                return key, sim
        return None

    async def _resolve_miss(
        self,
        q: CacheQuery,
        t0: float,
        lookup: LookupResult | None = None,
        remote: list[Neighbour] | None = None,
    ) -> PriorResult:
        if self.config.bypass:
            try:
                resp = await self._call_lm(q.request)
                return self._miss_result(resp.logp, PriorSource.LM, t0, resp.model_version)
            except Exception as exc:
                if not isinstance(exc, asyncio.TimeoutError):
                    self._cache.stats.lm_failures += 1
                return self._fallback(q, t0)
        key = q.exact_key
        explore = lookup is not None and lookup.explore
        near = None if key in self._inflight or explore else self._near_inflight(q)
        leader = key if key in self._inflight else (near[0] if near is not None else None)
        if leader is not None:
            outcome = await asyncio.shield(self._inflight[leader])
            if outcome is not None:
                self._cache.record_coalesced(semantic=leader != key)
                leader_req, resp = outcome
                logp, _ = align_prior(
                    leader_req.candidates,
                    resp.logp,
                    q.request.candidates,
                    self._cache.config.missing_action_margin,
                )
                if near is not None:
                    self._maybe_audit(q, logp, near[1])
                return self._miss_result(logp, PriorSource.COALESCED, t0, resp.model_version)
            return self._fallback(q, t0)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        if q.embedding is not None:
            self._inflight_near[key] = (q.embedding, frozenset(q.request.candidates))
        try:
            resp = await self._call_lm(q.request)
            if explore:
                assert lookup is not None
                self._cache.record_label(
                    q,
                    resp.logp,
                    source="explore",
                    entry_id=lookup.entry_id,
                    similarity=lookup.similarity,
                    reused_logp=lookup.logp,
                    remote=remote or (),
                )
                if self._cache.remote_narrow:
                    self._send_floors()
            else:
                self._cache.record_label(q, resp.logp, source="miss", remote=remote or ())
            self._cache.insert(q, resp)
            fut.set_result((q.request, resp))
            return self._miss_result(resp.logp, PriorSource.LM, t0, resp.model_version)
        except Exception as exc:
            if not isinstance(exc, asyncio.TimeoutError):
                self._cache.stats.lm_failures += 1
                logger.warning("LM call failed, using the fallback prior: %r", exc)
            fut.set_result(None)
            return self._fallback(q, t0)
        finally:
            self._inflight.pop(key, None)
            self._inflight_near.pop(key, None)

    def _miss_result(
        self, logp: np.ndarray, source: PriorSource, t0: float, version: str, stale: bool = False
    ) -> PriorResult:
        ms = (time.perf_counter() - t0) * 1e3
        self._cache.stats.latency_miss.record(ms)
        return PriorResult(
            logp=np.asarray(logp, np.float32),
            source=source,
            latency_ms=ms,
            stale=stale,
            model_version=version,
            encoder_tag=self._cache.encoder_tag,
        )

    def _fallback(self, q: CacheQuery, t0: float) -> PriorResult:
        near = self._cache.nearest(q)
        if near is not None:
            self._cache.stats.fallbacks_stale += 1
            return self._miss_result(
                near[0], PriorSource.FALLBACK_STALE, t0, self._cache.model_version, stale=True
            )
        self._cache.stats.fallbacks_uniform += 1
        return self._miss_result(
            uniform_logp(len(q.request.candidates)), PriorSource.FALLBACK_UNIFORM, t0, "", True
        )

    # -- background work ----------------------------------------------------------------------
    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refresh(self, q: CacheQuery, hit: LookupResult) -> None:
        assert hit.logp is not None, "only hits are refreshed and a hit carries its prior"
        try:
            fresh = await self._call_lm(q.request)
            m = self._cache.apply_refresh(
                q, hit.logp, fresh, hit.entry_id, similarity=hit.similarity
            )
            if self._cache.remote_narrow:
                self._send_floors()
            if self._meta.spsa is not None:
                self._meta.spsa.record(self._meta.spsa.sign_for(None), kl=m.kl)
        except Exception as exc:
            self.refresh_failures += 1
            logger.debug("refresh failed: %r", exc)

    async def drain(self) -> int:
        """Wait for background refreshes to finish; returns how many were pending."""
        pending = list(self._background)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)

    # -- meta-optimisation and snapshots ------------------------------------------------------
    def _params(self) -> CacheParams:
        c = self._cache
        return CacheParams(
            c.capacity_entries,
            c.min_cosine_similarity,
            c.refresh_probability,
            c.explore_probability,
        )

    def _after_decisions(self, n: int, sign: int, lm_queries: int) -> None:
        cache, meta = self._cache, self._meta
        if self.config.shard_index > 0:  # shard 0 runs the meta-optimiser for all shards
            self._maybe_sync()
        elif meta.spsa is not None:
            meta.spsa.record(sign, decisions=n, lm_queries=lm_queries)
            delta_rule = cache.config.reuse_rule == "delta"
            old = cache.explore_probability if delta_rule else cache.min_cosine_similarity
            value = meta.spsa.maybe_step(old)
            if value != old:
                if delta_rule:
                    cache.set_params(explore_probability=value)
                else:
                    cache.set_params(min_cosine_similarity=value)
                cache.stats.meta_updates += 1
        elif meta.due(cache.window.decisions):
            signals = WindowSignals.from_window(
                cache.take_window(),
                unused_fraction=cache.unused_fraction(),
                return_trend=meta.return_trend(),
                refresh_error_rate=cache.stats.refresh_error_ema,
                fill_fraction=len(cache) / max(1, cache.capacity_entries),
            )
            new = meta.step(self._params(), signals)
            cache.set_params(
                new.capacity_entries,
                new.min_cosine_similarity,
                new.refresh_probability,
                new.explore_probability if cache.config.reuse_rule == "delta" else None,
            )
            cache.stats.meta_updates += 1
        elif meta.cfg.mode == "static" and cache.window.decisions >= meta.cfg.window_decisions:
            cache.take_window()
        if (
            self._snapshot_dir
            and self.config.snapshot_interval_s > 0
            and time.monotonic() - self._last_snapshot >= self.config.snapshot_interval_s
        ):
            self._save_local(self._snapshot_dir)

    # -- shards -------------------------------------------------------------------------------
    def _maybe_sync(self) -> None:
        if (
            not self._syncing
            and time.monotonic() - self._last_sync >= self.config.shard_sync_interval_s
        ):
            self._syncing = True
            self._spawn(self.sync_now())

    async def sync_now(self) -> bool:
        """Exchange with shard 0 now: send this shard's decision window, labels and evicted
        entry ids; adopt the parameters in force, the correctness model and the id floor.
        Returns whether shard 0 answered. What shard 0 has not acknowledged is sent again
        with its number next time, and shard 0 applies each number once."""
        cache = self._cache
        self._sync_seq += 1
        self._unacked.append(
            (self._sync_seq, cache.take_window(), cache.forward or [], cache.forward_forgets)
        )
        cache.forward, cache.forward_forgets = [], []
        del self._unacked[:-MAX_UNACKED]  # shard 0 gone for minutes: the oldest are dropped
        try:
            state = await asyncio.wait_for(
                self._peer(0).shard_sync.remote(
                    self.config.shard_index, self._incarnation, list(self._unacked)
                ),
                self.config.fanout_timeout_s,
            )
        except Exception as exc:
            logger.debug("shard sync failed: %r", exc)
            self._peer_handles.pop(0, None)
            cache.stats.shard_sync_failures += 1
            return False
        finally:
            self._syncing = False
            self._last_sync = time.monotonic()
        self._unacked = [u for u in self._unacked if u[0] > state["applied"]]
        p: CacheParams = state["params"]
        cache.set_params(
            p.capacity_entries,
            p.min_cosine_similarity,
            p.refresh_probability,
            p.explore_probability if cache.config.reuse_rule == "delta" else None,
        )
        cache.correctness = CorrectnessModel.from_state(
            state["correctness"], cache.config.correctness
        )
        cache.skip_ids_through(state["id_floor"])
        cache.stats.shard_syncs += 1
        return True

    def shard_sync(
        self,
        shard_index: int,
        incarnation: str,
        payloads: list[Payload],
    ) -> dict[str, Any]:
        """Shard 0's side of :meth:`sync_now`: fold another shard's windows into the
        meta-optimiser's and its labels into the correctness model (each numbered payload
        once); return the parameters, the model and the highest entry id of that shard the
        model knows (a restarted shard numbers its new entries above it)."""
        if self.config.shard_index != 0:
            raise RuntimeError("shard_sync goes to shard 0")
        cache = self._cache
        done = self._applied_seq.get((shard_index, incarnation), 0)
        for seq, window, labels, forgets in payloads:
            if seq <= done:
                continue
            merge_window(cache.window, window)
            for sim, correct, eid, on_policy in labels:
                cache.correctness.record(sim, correct, eid, on_policy=on_policy)
            for eid in forgets:
                cache.correctness.forget_entry(eid)
            done = seq
        self._applied_seq[(shard_index, incarnation)] = done
        self._after_decisions(0, 0, 0)
        n = self.config.num_shards
        return {
            "applied": done,
            "params": self._params(),
            "correctness": cache.correctness.state_dict(),
            "id_floor": max(
                (e for e in cache.correctness.entry_ids() if e % n == shard_index), default=-1
            ),
        }

    def report_episode_returns(self, returns: list[float], caller_id: int | None = None) -> None:
        """Episode returns for the meta-reward (return trend; SPSA groups)."""
        returns = [float(r) for r in returns]
        self._meta.record_returns(returns)
        if self._meta.spsa is not None:
            self._meta.spsa.record_returns(self._meta.spsa.sign_for(caller_id), returns)

    async def set_params(
        self,
        capacity_entries: int | None = None,
        min_cosine_similarity: float | None = None,
        refresh_probability: float | None = None,
        explore_probability: float | None = None,
        _fan_out: bool = True,
    ) -> CacheParams:
        """Set (K per shard, tau, rho, exploration rate) on every shard; None keeps a value.
        Returns the parameters in force."""
        args = (capacity_entries, min_cosine_similarity, refresh_probability, explore_probability)
        self._cache.set_params(*args)
        if _fan_out and self.config.num_shards > 1:
            await self._on_peers("set_params", *args, False)
        return self._params()

    def local_stats(self) -> CacheStats:
        """This actor's counters, gauges and latency histograms (one shard's)."""
        return self._cache.snapshot_stats()

    async def stats(self) -> CacheStats:
        """Counters, gauges and latency histograms; a sharded cache's summed over the shards
        that answer (``shards_reporting`` says how many)."""
        own = self._cache.snapshot_stats()
        own.shards_reporting = 1
        if self.config.num_shards == 1:
            return own
        parts = [own]
        for out in await self._on_peers("local_stats"):
            if not isinstance(out, BaseException):
                out.shards_reporting = 1
                parts.append(out)
        return merge_stats(parts)

    def local_label_records(self) -> list[dict]:
        """This shard's kept reuse labels (audits included), oldest first, as JSON-ready
        dicts."""
        return self._cache.labels.records()

    async def label_records(self) -> list[dict]:
        """The kept reuse labels of every shard that answers (audits included), each with its
        ``shard``: what a run's ``labels/`` file holds for analysis (see docs/cache.md)."""
        out = [{**r, "shard": self.config.shard_index} for r in self.local_label_records()]
        if self.config.num_shards > 1:
            peers = await self._on_peers("local_label_records", timeout=60.0)
            for k, part in zip(self._others(), peers, strict=True):
                if not isinstance(part, BaseException):
                    out += [{**r, "shard": k} for r in part]
        return out

    def call_counts(self) -> dict[str, tuple[int, int]]:
        """``caller_id -> (get_priors calls, queries)`` since the actor started."""
        return {k: (v[0], v[1]) for k, v in self._calls.items()}

    def meta_history(self) -> list[dict[str, float]]:
        """Every heuristic meta-update so far."""
        return list(self._meta.history)

    def _save_local(self, target: str) -> str:
        blobs = {ENCODER_BLOB: self._encoder_blob} if self._encoder_blob is not None else {}
        extra = {"meta": self._meta.state_dict(), "num_shards": self.config.num_shards}
        out = self._cache.save(target, extra=extra, blobs=blobs)
        self._last_snapshot = time.monotonic()
        return str(out)

    async def save(self, path: str | None = None, _fan_out: bool = True) -> str:
        """Write a snapshot (atomically) to ``path`` or the configured ``snapshot_dir``; a
        sharded cache writes one per shard (``<path>/shard-<i>``). Returns this shard's."""
        root = path or self.config.snapshot_dir
        if root is None:
            raise ValueError("save() needs a path: no snapshot_dir is configured")
        out = self._save_local(self._shard_dir(root))
        if _fan_out and self.config.num_shards > 1:
            for res in await self._on_peers("save", path, False):
                if isinstance(res, BaseException):
                    raise RuntimeError(f"a shard could not save its snapshot: {res!r}")
        return out

    async def restore(self, path: str, _fan_out: bool = True) -> int:
        """Replace the cache with the latest snapshot under ``path`` (each shard its own);
        returns the entry count (over all shards)."""
        own = self._shard_dir(path)
        self._check_layout(own)
        self._cache = AdaptiveCache.restore(Path(own), self.config.cache)
        self._cache.set_id_space(self.config.shard_index, self.config.num_shards)
        if self.config.shard_index > 0:
            self._cache.forward = []
        self._meta.load_state(AdaptiveCache.read_extra(own).get("meta", {}))
        blob = AdaptiveCache.read_blob(own, ENCODER_BLOB)
        if blob is not None:
            self._install_encoder(blob)
        tag = self._encoder.tag if self._encoder is not None else self.config.encoder_tag
        self._cache.encoder_tag = tag
        self._cache.verifier = None if self._encoder is None else self._encoder.verifier
        n = len(self._cache)
        if _fan_out and self.config.num_shards > 1:
            for res in await self._on_peers("restore", path, False):
                if isinstance(res, BaseException):
                    raise RuntimeError(f"a shard could not restore its snapshot: {res!r}")
                n += int(res)
        return n

    async def size(self) -> int:
        """Number of entries (over all shards)."""
        n = len(self._cache)
        if self.config.num_shards > 1:
            sizes = await self._on_peers("local_size")
            n += sum(int(r) for r in sizes if not isinstance(r, BaseException))
        return n

    def local_size(self) -> int:
        """Entries of this shard."""
        return len(self._cache)


# Handles of the shards 1..N-1 a process created: a named actor dies with its creator's last
# handle, and callers keep only shard 0's (see get_or_create_cache).
_SHARD_HANDLES: dict[tuple[str, str], list[Any]] = {}


def get_or_create_cache(
    config: SharedCacheConfig | None = None,
    *,
    name: str = DEFAULT_CACHE_NAME,
    namespace: str = DEFAULT_NAMESPACE,
    detached: bool = False,
):
    """The one way to reach the shared cache: get the named actor, creating it if needed.

    A non-detached named actor dies when its creator's handle is garbage-collected, so the
    creator (the driver) keeps the returned handle; env runners call this with the same name and
    namespace and get the same actor. With ``config.num_shards > 1`` the other shards are created
    beside it (named ``<name>.shard<i>``, kept alive by this process) and the returned handle is
    shard 0's; :class:`~cachellm_rl.cache.client.PriorCacheClient` routes to all of them.

    Args:
        config: Settings used only when the actor is created.
        name: Actor name.
        namespace: Ray namespace.
        detached: Survive the creating driver (remove it with :func:`kill_cache`).

    Returns:
        The actor handle (shard 0's).
    """
    cfg = config or SharedCacheConfig()
    cls = ray.remote(SharedPriorCache)
    # The actor reserves no CPU, and Ray places such an actor on any node. Prefer the
    # creator's node (the driver's: the head, beside Serve, on a cluster; a runner's own node
    # for a runner-owned cache); soft, so a restart may go elsewhere if that node is gone.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    handles = []
    for i in range(cfg.num_shards):
        shard_cfg = dataclasses.replace(
            cfg, shard_index=i, shard_group=name, shard_namespace=namespace
        )
        handles.append(
            cls.options(
                scheduling_strategy=here,
                name=shard_name(name, i),
                namespace=namespace,
                get_if_exists=True,
                lifetime="detached" if detached else None,
                max_restarts=cfg.max_restarts,
                max_task_retries=0,
                num_cpus=cfg.num_cpus,
                resources=dict(cfg.resources),
                max_concurrency=1000,
            ).remote(shard_cfg)
        )
    if cfg.num_shards > 1:
        _SHARD_HANDLES[(name, namespace)] = handles[1:]
    return handles[0]


def kill_cache(
    name: str = DEFAULT_CACHE_NAME,
    namespace: str = DEFAULT_NAMESPACE,
    *,
    no_restart: bool = True,
    wait_s: float = 30.0,
) -> bool:
    """Kill the named cache actor (every shard of a sharded one).

    ``ray.kill`` only asks for the kill: an actor call sent right after it may still be served
    by the dying actor, and ``get_or_create_cache`` with the same name may still find it. With
    ``no_restart`` this therefore waits until Ray has released the name (at most ``wait_s``
    seconds; a warning is logged if it has not), so that callers see the actor gone.

    Args:
        name: Actor name (shard 0's).
        namespace: Ray namespace.
        no_restart: Kill for good; ``False`` lets Ray restart it (``max_restarts``).
        wait_s: How long to wait for the name to be released after a kill for good.

    Returns:
        False when there was no such actor, else True.
    """
    try:
        handle = ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    try:
        num_shards = int(ray.get(handle.topology.remote(), timeout=10)[0])
    except Exception:  # dead or not answering: kill what the names say
        num_shards = 1 + len(_SHARD_HANDLES.get((name, namespace), []))
    for i in range(1, num_shards):
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(shard_name(name, i), namespace=namespace), no_restart=no_restart)
    ray.kill(handle, no_restart=no_restart)
    if no_restart:
        _SHARD_HANDLES.pop((name, namespace), None)
        _wait_until_released(name, namespace, wait_s)
    return True


def _wait_until_released(name: str, namespace: str, wait_s: float) -> None:
    """Poll until no actor is registered as ``name``, or ``wait_s`` has passed."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            return
        if time.monotonic() >= deadline:
            logger.warning("cache actor %r still registered %.0f s after its kill", name, wait_s)
            return
        time.sleep(0.05)
