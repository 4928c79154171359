"""Wire contracts of the prior server, the cache actor and its callers (see docs/architecture.md).

Everything here is plain picklable data: numpy arrays, never torch tensors, cross process
boundaries.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

DEFAULT_PRIOR_APP = "cachellm_prior"
"""Name of the ``PriorServer`` Serve application the cache actor asks by default."""


def validate_candidates(candidates: list[str], *, where: str = "PriorRequest.candidates") -> None:
    """Raise a ``ValueError`` naming the field when a candidate list cannot be scored.

    Args:
        candidates: Candidate action texts of one state.
        where: Name of the field, used in the error message.

    Raises:
        ValueError: The list is empty, holds a non-string or empty string, or holds duplicates.
    """
    if len(candidates) == 0:
        raise ValueError(f"{where} is empty: a prior needs at least one candidate action")
    seen: set[str] = set()
    duplicates: list[str] = []
    for c in candidates:
        if not isinstance(c, str):
            raise ValueError(f"{where} must hold strings, got {type(c).__name__}: {c!r}")
        if not c.strip():
            raise ValueError(f"{where} holds an empty candidate string")
        if c in seen:
            duplicates.append(c)
        seen.add(c)
    if duplicates:
        raise ValueError(f"{where} holds duplicate candidates: {sorted(set(duplicates))!r}")


@dataclass(frozen=True)
class PriorRequest:
    """One state to score: a prompt and the candidate actions to score after it.

    Attributes:
        prompt: Full prompt text (objective, state, inventory, ...), see ``prior.prompts``.
        candidates: Candidate action texts; non-empty, unique.
    """

    prompt: str
    candidates: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise ValueError(f"PriorRequest.prompt must be a string, got {type(self.prompt)}")
        object.__setattr__(self, "candidates", tuple(self.candidates))
        validate_candidates(list(self.candidates))


@dataclass(frozen=True)
class PriorResponse:
    """The prior over a request's candidates.

    Attributes:
        logp: float32 log-probabilities aligned with the request's candidates, logsumexp = 0.
        model_version: Hash of the weights (and adapter) that produced it.
    """

    logp: np.ndarray
    model_version: str


@dataclass(frozen=True)
class CacheQuery:
    """A caller's question to the shared cache (see docs/architecture.md).

    The caller computes the exact key and the embedding, so encoding runs in the env runners in
    parallel and the cache actor never becomes the encoding bottleneck.

    Attributes:
        exact_key: Hash of (canonical text, candidate set, prior version, encoder tag).
        embedding: L2-normalised float32 state embedding, or None (exact tier only).
        request: What to send to the LM on a miss.
        text: Canonical state text the embedding was computed from ('' when not sent). The
            cache keeps it with the entry, so a new encoder version can re-embed the entries
            and reuse labels name the states they compare.
        encoder_tag: Tag of the encoder that computed ``embedding``; the cache ignores an
            embedding from another encoder than its own ('' skips the check).
    """

    exact_key: bytes
    embedding: np.ndarray | None
    request: PriorRequest
    text: str = ""
    encoder_tag: str = ""


class HitTier(str, enum.Enum):
    """Where a prior came from."""

    EXACT = "exact"
    SEMANTIC = "semantic"
    MISS = "miss"


class PriorSource(str, enum.Enum):
    """How a :class:`PriorResult` was obtained."""

    CACHE_EXACT = "cache_exact"
    CACHE_SEMANTIC = "cache_semantic"
    LM = "lm"
    COALESCED = "coalesced"
    FALLBACK_STALE = "fallback_stale"
    FALLBACK_UNIFORM = "fallback_uniform"


@dataclass(frozen=True)
class LookupResult:
    """Result of a cache lookup without any LM call.

    Attributes:
        tier: Exact hit, semantic hit or miss.
        logp: Prior aligned to the caller's candidates (None on a miss; on an exploration
            miss, the prior the hit would have served).
        similarity: Cosine similarity of the matched entry (1.0 for exact, None on a miss).
        coverage: Fraction of the caller's candidates present in the matched entry.
        entry_id: Id of the matched entry, or -1.
        refresh: True when this hit was drawn for a background refresh (see docs/cache.md).
        explore: True on a miss that the reuse rule would have served from ``entry_id``: the
            LM is called anyway (an exploration call) so that the correctness model gets a
            label at a similarity it serves at.
    """

    tier: HitTier
    logp: np.ndarray | None = None
    similarity: float | None = None
    coverage: float | None = None
    entry_id: int = -1
    refresh: bool = False
    explore: bool = False

    @property
    def hit(self) -> bool:
        """Whether the lookup found a usable prior."""
        return self.tier is not HitTier.MISS


@dataclass(frozen=True)
class PriorResult:
    """What ``get_priors`` returns for one query: always a usable prior.

    Attributes:
        logp: float32 log-probabilities over the query's candidates (logsumexp = 0).
        source: Where it came from; fallbacks are marked as such.
        latency_ms: Time spent inside the cache actor for this query.
        stale: True for a fallback prior (nearest cached or uniform) used after an LM failure.
        model_version: Version of the model that produced the prior ('' for uniform).
        encoder_tag: The cache's state-encoder tag when it answered: a caller whose encoder
            has another tag fetches the cache's encoder (the version handshake).
    """

    logp: np.ndarray
    source: PriorSource
    latency_ms: float
    stale: bool = False
    model_version: str = ""
    encoder_tag: str = ""

    @property
    def hit(self) -> bool:
        """Whether the prior was reused without an LM call of its own (a cache hit, or another
        decision's in-flight answer)."""
        return self.source in (
            PriorSource.CACHE_EXACT,
            PriorSource.CACHE_SEMANTIC,
            PriorSource.COALESCED,
        )


@dataclass
class LatencyHistogram:
    """Fixed log-spaced latency histogram in milliseconds (mergeable, picklable).

    Bucket ``i`` counts samples in ``[edges[i-1], edges[i])``; the last bucket is open-ended.
    """

    edges_ms: list[float] = field(
        default_factory=lambda: [float(x) for x in np.geomspace(0.01, 60_000.0, 121)]
    )
    counts: list[int] = field(default_factory=list)
    total: int = 0
    sum_ms: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.edges_ms) + 1)

    def record(self, ms: float) -> None:
        """Add one sample."""
        idx = int(np.searchsorted(self.edges_ms, ms, side="right"))
        self.counts[idx] += 1
        self.total += 1
        self.sum_ms += float(ms)

    def quantile(self, q: float) -> float:
        """Approximate quantile (upper bucket edge; about 7% resolution). NaN when empty."""
        if self.total == 0:
            return float("nan")
        target = q * self.total
        acc = 0
        for i, c in enumerate(self.counts):
            acc += c
            if acc >= target and c > 0:
                return self.edges_ms[min(i, len(self.edges_ms) - 1)]
        return self.edges_ms[-1]

    def merged(self, other: LatencyHistogram) -> LatencyHistogram:
        """A new histogram with the samples of both (same edges required)."""
        if list(self.edges_ms) != list(other.edges_ms):
            raise ValueError("LatencyHistogram.merged needs identical bucket edges")
        return LatencyHistogram(
            edges_ms=list(self.edges_ms),
            counts=[a + b for a, b in zip(self.counts, other.counts, strict=True)],
            total=self.total + other.total,
            sum_ms=self.sum_ms + other.sum_ms,
        )

    @property
    def mean_ms(self) -> float:
        """Mean of the recorded samples (NaN when empty)."""
        return self.sum_ms / self.total if self.total else float("nan")
