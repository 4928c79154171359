"""When is a cached prior safe to reuse? Labels and an error-bounded reuse rule (see
docs/cache.md, "Trusted reuse").

Every time the LM answers a state that has a nearest cached neighbour (a miss, an exploration
call or a background refresh), the cache learns, at no extra LM cost, whether serving that
neighbour's prior would have been *correct*: the same top action as the fresh prior and a
total-variation distance of at most ``max_tv`` between the two (the neighbour's prior aligned to
the state's candidates). Those labels fit a logistic curve ``P(correct | similarity)``, linear
in the log-distance ``-log(1 - cos)`` by default: it spreads out the cosines near 1, where reuse
decisions are made (0.9, 0.99 and 0.999 are 2.3, 4.6 and 6.9).

The reuse rule: a semantic hit at similarity ``s`` is served only when an upper confidence bound
of ``P(wrong | s)`` is at most ``delta``. The bound is the delta method on the fitted logit: with
``eta = theta . x(s)`` and ``se = sqrt(x(s)^T Sigma x(s))`` (``Sigma`` the inverse Hessian of the
negative log posterior at the fit), ``P(wrong)_ucb = sigmoid(-(eta - z * se))``. Before
``min_labels`` labels exist nothing is served. The curve is pooled over the cache (one env per
cache in the suites); an entry with ``entry_min_labels`` labels of its own gets its own curve,
fitted with the pooled curve as the prior mean (so a few labels move it a little, many a lot).

Pure numpy; no Ray.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from cachellm_rl.stats import wilson_upper


def tv_distance(p_logp: np.ndarray, q_logp: np.ndarray) -> float:
    """Total-variation distance ``0.5 * sum |p - q|`` of two log-prob vectors.

    Example:
        >>> round(tv_distance(np.log([0.5, 0.5]), np.log([0.75, 0.25])), 3)
        0.25
    """
    p = np.exp(np.asarray(p_logp, np.float64))
    q = np.exp(np.asarray(q_logp, np.float64))
    return float(0.5 * np.abs(p - q).sum())


def reuse_is_correct(fresh_logp: np.ndarray, reused_logp: np.ndarray, max_tv: float) -> bool:
    """Whether serving ``reused_logp`` in place of ``fresh_logp`` is a correct reuse.

    Correct means the same top action and a total-variation distance of at most ``max_tv``.

    Args:
        fresh_logp: The LM's prior for the state.
        reused_logp: The cached neighbour's prior aligned to the state's candidates.
        max_tv: Largest total-variation distance still counted as correct (``epsilon``).

    Example:
        >>> reuse_is_correct(np.log([0.6, 0.4]), np.log([0.7, 0.3]), 0.2)
        True
        >>> reuse_is_correct(np.log([0.6, 0.4]), np.log([0.4, 0.6]), 0.5)
        False
    """
    fresh = np.asarray(fresh_logp)
    reused = np.asarray(reused_logp)
    if fresh.shape != reused.shape or fresh.ndim != 1 or fresh.size == 0:
        raise ValueError(f"priors of shapes {fresh.shape} and {reused.shape} cannot be compared")
    same_top = int(np.argmax(fresh)) == int(np.argmax(reused))
    return same_top and tv_distance(fresh, reused) <= max_tv


@dataclass(frozen=True, kw_only=True)
class ReuseLabel:
    """One measured reuse label (see docs/cache.md).

    Attributes:
        similarity: Cosine similarity of the state to its nearest cached neighbour under the
            cache's encoder.
        correct: Whether reusing the neighbour's prior would have been correct.
        tv: Total-variation distance between the fresh and the reused prior.
        same_top: Whether both priors pick the same action.
        source: What called the LM: ``"miss"``, ``"explore"``, ``"refresh"`` or ``"audit"``.
        env: Env (or any grouping) the state comes from.
        encoder_tag: Encoder the similarity was measured with.
        query_text: Canonical text of the state ('' when the caller sent none).
        neighbour_text: Canonical text of the neighbour ('' when unknown).
        entry_id: The neighbour's entry id.
        step: Cache decision counter when the label was made.
        score: The reuse verifier's ``P(correct)`` for the pair, which the correctness model
            was fitted on instead of the similarity (None without a verifier).
    """

    similarity: float
    correct: bool
    tv: float
    same_top: bool
    source: str = "miss"
    env: str = ""
    encoder_tag: str = ""
    query_text: str = ""
    neighbour_text: str = ""
    entry_id: int = -1
    step: int = 0
    score: float | None = None


def make_label(
    fresh_logp: np.ndarray, reused_logp: np.ndarray, similarity: float, *, max_tv: float, **kw
) -> ReuseLabel:
    """Build a :class:`ReuseLabel` from a fresh prior and the neighbour's aligned prior."""
    fresh = np.asarray(fresh_logp, np.float64)
    reused = np.asarray(reused_logp, np.float64)
    tv = tv_distance(fresh, reused)
    same_top = int(np.argmax(fresh)) == int(np.argmax(reused))
    return ReuseLabel(
        similarity=float(similarity),
        correct=bool(same_top and tv <= max_tv),
        tv=tv,
        same_top=same_top,
        **kw,
    )


class LabelStore:
    """Bounded store of the newest :class:`ReuseLabel` records (oldest dropped first).

    Args:
        max_labels: Most labels kept.
    """

    def __init__(self, max_labels: int = 20_000) -> None:
        if max_labels < 1:
            raise ValueError(f"LabelStore.max_labels must be >= 1, got {max_labels}")
        self._labels: deque[ReuseLabel] = deque(maxlen=max_labels)
        self.total = 0

    def add(self, label: ReuseLabel) -> None:
        """Keep a label."""
        self._labels.append(label)
        self.total += 1

    def __len__(self) -> int:
        return len(self._labels)

    def labels(self, env: str | None = None) -> list[ReuseLabel]:
        """The kept labels (of one env when ``env`` is given), oldest first."""
        return [lab for lab in self._labels if env is None or lab.env == env]

    def records(self) -> list[dict]:
        """JSON-ready dicts of the kept labels."""
        return [asdict(lab) for lab in self._labels]

    def extend_records(self, records: Iterable[dict]) -> None:
        """Add labels from :meth:`records` output (restores a snapshot)."""
        for r in records:
            self.add(ReuseLabel(**r))


@dataclass(frozen=True, kw_only=True)
class CorrectnessConfig:
    """Settings of the correctness model and the reuse rule.

    Attributes:
        max_tv: ``epsilon``: a reuse with a larger total-variation distance to the fresh prior
            is wrong even when the top action agrees.
        delta: The user's error budget: a semantic hit is served only when the upper confidence
            bound of ``P(wrong | similarity)`` is at most ``delta``.
        confidence_z: One-sided normal quantile of the bound (1.645: a 95% upper bound).
        min_labels: Labels the pooled curve needs before any semantic hit is served.
        entry_min_labels: Labels an entry needs of its own before it gets its own curve.
        entry_max_labels: Newest labels kept per entry.
        pooled_max_labels: Newest labels the pooled curve is fitted on (old ones age out, so
            the curve follows the cache as it fills).
        prior_precision: Gaussian prior precision of the pooled fit's (standardised)
            parameters around 0 (keeps the fit finite when all labels agree).
        entry_prior_precision: Prior precision of an entry's fit around the pooled fit.
        similarity_feature: What the curve is linear in: ``"log_distance"``
            (``-log(1 - cos)``, capped at ``-log(1e-4)``) or ``"cosine"``.
        similarity_center: Centre of the standardised feature ``(f(s) - center) / scale``
            (None: 3.0 for log-distance, i.e. cosine 0.95; 0.9 for cosine).
        similarity_scale: Its scale (None: 1.0 for log-distance, 0.05 for cosine).
        min_similarity: Floor of the rule: nothing below it is served, and labels below it
            do not enter the fits (far pairs often agree by coincidence, e.g. two states whose
            best move is "go north"; a monotone curve fitted through them would be bent by
            pairs the rule never serves).
        refit_every: New pooled labels between refits of the pooled curve.
        explore_probability: Chance that a servable semantic hit calls the LM anyway, so that
            labels keep coming at the similarities that are served (counted as LM queries).
        bound: Which upper bound of ``P(wrong)`` the rule holds to ``delta``:
            ``"delta_method"`` bounds ``P(wrong | s)`` at the lookup's own similarity, from the
            logistic fit (pooled, or the entry's own); ``"region"`` bounds the error rate of
            the region ``[s, 1]`` the rule serves, by the one-sided Wilson upper bound of the
            wrong share among the pooled labels at or above ``s`` (no curve, so no
            misspecification; it bounds what a served hit's error is on average, which is
            what the served error rate measures; no per-entry curves).
        served_guard: The on-policy guard. The curve (or region) is fitted on every label,
            most of them from states the LM had to answer, and the states the rule then
            serves may not behave like them. With the guard on, a lookup the rule would serve
            is served only while a sequential probability ratio test on the *on-policy*
            labels (exploration calls and refreshes of served hits: random draws of what the
            rule serves) has accepted that their wrong share is below ``delta``. The test
            weighs each label by the likelihood ratio of a wrong share of
            ``guard_alternative * delta`` against one of ``delta``, and opens when the
            log ratio reaches ``log(1 / guard_alpha)``. Under a wrong share of ``delta`` or
            more the unclamped ratio is a supermartingale, so by Ville's inequality it opens
            with probability at most ``guard_alpha`` however often it is read (the repeated
            looks that let a fixed-level interval open by chance on a long stream). The
            log ratio is kept within ``[-log(1 / guard_alpha), log(1 / guard_alpha) +
            (guard_close_after - 0.5) * log(1 / guard_alternative)]``: a bad past costs at
            most twice the opening evidence to overcome (the floor weakens the bound on
            long streams: simulated at a wrong share of exactly ``delta``, 1.8% of streams
            opened within 300 labels and 8.8% within 3000), and an open guard closes after
            ``guard_close_after`` more wrong labels than its evidence allows (a shift after
            it opened), its ratio then reset to at most 0, so reopening takes a full test's
            evidence. While the guard is closed, every lookup the rule would serve goes
            to the LM instead and gives an on-policy label (a miss the cache would have paid
            for without a semantic tier). ``guard_closures`` counts the labels at which an
            open guard closed.
        guard_alpha: The test's error: the chance of opening while served reuse is wrong at
            a rate of ``delta`` or more (of the unclamped test; see above).
        guard_alternative: The wrong share, as a fraction of ``delta``, that the test is
            built to accept (lower: more labels to open, a clearer margin under ``delta``).
        guard_close_after: Wrong on-policy labels that close a guard at its evidence cap.
        guard_explore_probability: With the guard on, the least chance that a servable
            lookup calls the LM anyway, so the guard keeps reading what is served after it
            opened (the meta-optimiser may lower ``explore_probability`` far below it).
    """

    max_tv: float = 0.2
    delta: float = 0.05
    confidence_z: float = 1.645
    min_labels: int = 50
    entry_min_labels: int = 20
    entry_max_labels: int = 64
    pooled_max_labels: int = 5000
    prior_precision: float = 0.1
    entry_prior_precision: float = 4.0
    similarity_feature: str = "log_distance"
    similarity_center: float | None = None
    similarity_scale: float | None = None
    min_similarity: float = 0.8
    refit_every: int = 10
    explore_probability: float = 0.05
    bound: str = "delta_method"
    served_guard: bool = True
    guard_alpha: float = 0.05
    guard_alternative: float = 0.5
    guard_close_after: int = 2
    guard_explore_probability: float = 0.1

    def __post_init__(self) -> None:
        if self.bound not in BOUNDS:
            raise ValueError(f"CorrectnessConfig.bound must be one of {BOUNDS}, got {self.bound!r}")
        if not 0.0 <= self.max_tv <= 1.0:
            raise ValueError(f"CorrectnessConfig.max_tv must be in [0, 1], got {self.max_tv}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"CorrectnessConfig.delta must be in (0, 1), got {self.delta}")
        if not 0.0 <= self.explore_probability <= 1.0:
            raise ValueError(
                "CorrectnessConfig.explore_probability must be in [0, 1], got "
                f"{self.explore_probability}"
            )
        if self.similarity_feature not in SIMILARITY_FEATURES:
            raise ValueError(
                f"CorrectnessConfig.similarity_feature must be one of {SIMILARITY_FEATURES}, got "
                f"{self.similarity_feature!r}"
            )
        center, scale = SIMILARITY_FEATURES[self.similarity_feature]
        if self.similarity_center is None:
            object.__setattr__(self, "similarity_center", center)
        if self.similarity_scale is None:
            object.__setattr__(self, "similarity_scale", scale)
        if self.confidence_z < 0 or not (self.similarity_scale or 0.0) > 0:
            raise ValueError("CorrectnessConfig.confidence_z must be >= 0 and similarity_scale > 0")
        if (
            min(
                self.min_labels,
                self.entry_min_labels,
                self.refit_every,
                self.guard_close_after,
            )
            < 1
        ):
            raise ValueError(
                "CorrectnessConfig label counts, refit_every and guard_close_after must be >= 1"
            )
        if not (0.0 < self.guard_alpha < 1.0 and 0.0 < self.guard_alternative < 1.0):
            raise ValueError(
                "CorrectnessConfig.guard_alpha and guard_alternative must be in (0, 1), got "
                f"{self.guard_alpha} and {self.guard_alternative}"
            )
        if not 0.0 <= self.guard_explore_probability <= 1.0:
            raise ValueError(
                "CorrectnessConfig.guard_explore_probability must be in [0, 1], got "
                f"{self.guard_explore_probability}"
            )
        if self.prior_precision <= 0 or self.entry_prior_precision <= 0:
            raise ValueError("CorrectnessConfig prior precisions must be > 0")


# CorrectnessConfig fields of earlier versions, dropped when a stored config is read
RETIRED_FIELDS = ("served_window", "served_recent")


def correctness_config_from_dict(stored: dict) -> CorrectnessConfig:
    """A :class:`CorrectnessConfig` from a stored dict (a snapshot's), ignoring the fields of
    the windowed on-policy guard that the sequential test replaced."""
    return CorrectnessConfig(**{k: v for k, v in stored.items() if k not in RETIRED_FIELDS})


# feature name -> default (center, scale) of its standardisation
SIMILARITY_FEATURES = {"log_distance": (3.0, 1.0), "cosine": (0.9, 0.05)}
BOUNDS = ("delta_method", "region")


def region_threshold(
    similarities: Sequence[float] | np.ndarray,
    correct: Sequence[bool] | np.ndarray,
    *,
    delta: float,
    z: float = 1.645,
    min_labels: int = 50,
) -> float:
    """Lowest similarity ``s`` whose region ``[s, 1]`` holds at least ``min_labels`` labels
    with a one-sided Wilson upper bound of their wrong share at most ``delta`` (inf: none).

    Example:
        >>> s = np.linspace(0.8, 1.0, 400)
        >>> round(region_threshold(s, s > 0.9, delta=0.05), 3)  # all wrong below 0.9
        0.898
    """
    sims = np.asarray(similarities, np.float64).reshape(-1)
    ok = np.asarray(correct, bool).reshape(-1)
    if sims.shape != ok.shape:
        raise ValueError(f"{sims.size} similarities but {ok.size} labels")
    order = np.argsort(-sims, kind="stable")
    sims, wrong = sims[order], (~ok[order]).astype(np.float64)
    n = np.arange(1, sims.size + 1, dtype=np.float64)
    # a region ends after the last label of a tied similarity
    last = np.r_[sims[1:] != sims[:-1], True] if sims.size else np.zeros(0, bool)
    hi = wilson_upper(np.cumsum(wrong), n, z=z)
    good = last & (n >= min_labels) & (hi <= delta)
    return float(sims[good].min()) if good.any() else math.inf


def region_wrong_ucb(
    similarities: Sequence[float] | np.ndarray,
    correct: Sequence[bool] | np.ndarray,
    at: float,
    *,
    z: float = 1.645,
) -> float:
    """One-sided Wilson upper bound of the wrong share among labels at or above ``at`` (1.0
    when there are none)."""
    sims = np.asarray(similarities, np.float64).reshape(-1)
    sel = sims >= at
    n = int(sel.sum())
    if n == 0:
        return 1.0
    k = int((~np.asarray(correct, bool).reshape(-1)[sel]).sum())
    return float(wilson_upper(k, n, z=z))


_MIN_DISTANCE = 1e-4


def similarity_feature(similarity: float | np.ndarray, kind: str) -> np.ndarray:
    """The feature the correctness curve is linear in.

    Example:
        >>> np.round(similarity_feature(np.array([0.9, 0.99, 1.0]), "log_distance"), 2)
        array([2.3 , 4.61, 9.21])
    """
    s = np.asarray(similarity, np.float64)
    if kind == "cosine":
        return s
    return -np.log(np.maximum(1.0 - s, _MIN_DISTANCE))


@dataclass(frozen=True)
class LogisticFit:
    """A fitted ``P(correct | s) = sigmoid(theta[0] + theta[1] * (f(s) - center) / scale)``.

    Attributes:
        theta: Intercept and slope on the standardised similarity.
        cov: Their 2x2 posterior covariance (inverse Hessian at the fit).
        n: Labels fitted.
        n_wrong: Of which wrong.
        center: Feature centre.
        scale: Feature scale.
        feature: The feature ``f`` (see :func:`similarity_feature`).
    """

    theta: np.ndarray
    cov: np.ndarray
    n: int
    n_wrong: int
    center: float
    scale: float
    feature: str = "cosine"

    def _x(self, similarity: float | np.ndarray) -> np.ndarray:
        s = (similarity_feature(similarity, self.feature) - self.center) / self.scale
        return np.stack([np.ones_like(s), s], axis=-1)

    def p_correct(self, similarity: float | np.ndarray) -> np.ndarray:
        """Point estimate of ``P(correct | s)``."""
        return _sigmoid(self._x(similarity) @ self.theta)

    def p_wrong_ucb(self, similarity: float | np.ndarray, z: float) -> np.ndarray:
        """Delta-method upper confidence bound of ``P(wrong | s)``."""
        x = self._x(similarity)
        eta = x @ self.theta
        se = np.sqrt(np.maximum(np.einsum("...i,ij,...j->...", x, self.cov, x), 0.0))
        return _sigmoid(-(eta - z * se))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


def fit_logistic(
    similarities: Sequence[float] | np.ndarray,
    correct: Sequence[bool] | np.ndarray,
    *,
    prior_mean: np.ndarray | None = None,
    prior_precision: float = 1.0,
    center: float = 0.9,
    scale: float = 0.05,
    feature: str = "cosine",
    iters: int = 50,
) -> LogisticFit:
    """MAP logistic regression of correctness on similarity (Newton's method).

    Args:
        similarities: Similarity of each label.
        correct: Its outcome.
        prior_mean: Mean of the Gaussian prior on ``theta`` (None: zeros).
        prior_precision: Its precision (the same on both parameters).
        center: Centre of the standardised feature.
        scale: Scale of the standardised feature.
        feature: The feature the curve is linear in (see :func:`similarity_feature`).
        iters: Most Newton steps.

    Returns:
        The fit with its Laplace covariance.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> s = rng.uniform(0.8, 1.0, 4000)
        >>> y = rng.random(4000) < 1 / (1 + np.exp(-(1.0 + 2.0 * (s - 0.9) / 0.05)))
        >>> bool(np.allclose(fit_logistic(s, y, prior_precision=1e-6).theta, [1.0, 2.0], atol=0.2))
        True
    """
    s = np.asarray(similarities, np.float64).reshape(-1)
    y = np.asarray(correct, np.float64).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} similarities but {y.size} labels")
    mu = np.zeros(2) if prior_mean is None else np.asarray(prior_mean, np.float64)
    x = np.stack([np.ones_like(s), (similarity_feature(s, feature) - center) / scale], axis=1)
    theta = mu.copy()
    reg = prior_precision * np.eye(2)

    def objective(t: np.ndarray) -> float:
        eta = x @ t
        # -log p(y | eta) = log(1 + e^eta) - y * eta, computed stably
        return float(np.sum(np.logaddexp(0.0, eta) - y * eta) + 0.5 * (t - mu) @ reg @ (t - mu))

    current = objective(theta)
    for _ in range(iters):
        p = _sigmoid(x @ theta)
        grad = x.T @ (p - y) + reg @ (theta - mu)
        hess = (x * (p * (1 - p))[:, None]).T @ x + reg
        step = np.linalg.solve(hess, grad)
        scale_ = 1.0  # damped Newton: halve the step until the objective falls
        while scale_ > 1e-6:
            candidate = theta - scale_ * step
            value = objective(candidate)
            if value <= current:
                break
            scale_ *= 0.5
        else:
            break
        theta, current = candidate, value
        if float(np.max(np.abs(scale_ * step))) < 1e-8:
            break
    p = _sigmoid(x @ theta)
    hess = (x * (p * (1 - p))[:, None]).T @ x + reg
    return LogisticFit(
        theta=theta,
        cov=np.linalg.inv(hess),
        n=int(s.size),
        n_wrong=int(s.size - y.sum()),
        center=center,
        scale=scale,
        feature=feature,
    )


@dataclass
class _EntryLabels:
    sims: deque = field(default_factory=deque)
    correct: deque = field(default_factory=deque)
    fit: LogisticFit | None = None
    dirty: bool = True


class CorrectnessModel:
    """``P(correct | similarity)`` pooled over the cache and per entry, and the delta rule.

    Args:
        config: Model and rule settings.
    """

    def __init__(self, config: CorrectnessConfig | None = None) -> None:
        self.config = config or CorrectnessConfig()
        cap = self.config.pooled_max_labels
        self._sims: deque[float] = deque(maxlen=cap)
        self._correct: deque[bool] = deque(maxlen=cap)
        self._entries: dict[int, _EntryLabels] = {}
        self._pooled: LogisticFit | None = None
        self._since_fit = 0
        self._region: float | None = None  # the region bound's threshold (None: to compute)
        self._since_region = 0
        self.guard_llr = 0.0  # the guard's log likelihood ratio
        self._guard_steps = self._compute_guard_steps()  # read on every servable lookup
        self.served_labels = 0
        self.served_wrong = 0
        self.labels_total = 0
        self.labels_wrong = 0
        self.guard_closures = 0

    # -- labels -------------------------------------------------------------------------------
    def record(
        self,
        similarity: float,
        correct: bool,
        entry_id: int | None = None,
        *,
        on_policy: bool = False,
    ) -> None:
        """Add one label (pooled, and to ``entry_id``'s own labels when given); a label below
        ``min_similarity`` is counted but not fitted. ``on_policy`` marks a label of a lookup
        the rule would have served (an exploration call or a refresh of a served hit): it
        also goes to the guard's window."""
        if not math.isfinite(similarity):
            raise ValueError(f"label similarity must be finite, got {similarity}")
        self.labels_total += 1
        self.labels_wrong += 0 if correct else 1
        if on_policy:
            was_open = self.guard_open()
            self._guard_step(bool(correct))
            if was_open and not self.guard_open():
                # a closed guard starts its evidence afresh: reopening takes a full test
                self.guard_closures += 1
                self.guard_llr = min(self.guard_llr, 0.0)
        if similarity < self.config.min_similarity:
            return
        self._sims.append(float(similarity))
        self._correct.append(bool(correct))
        self._since_fit += 1
        self._since_region += 1
        if entry_id is not None and entry_id >= 0:
            el = self._entries.setdefault(entry_id, _EntryLabels())
            el.sims.append(float(similarity))
            el.correct.append(bool(correct))
            while len(el.sims) > self.config.entry_max_labels:
                el.sims.popleft()
                el.correct.popleft()
            el.dirty = True

    def forget_entry(self, entry_id: int) -> None:
        """Drop an evicted entry's own labels (its pooled labels stay)."""
        self._entries.pop(entry_id, None)

    def reset(self) -> None:
        """Forget everything (a new prior or encoder version makes old labels meaningless)."""
        self.__init__(self.config)  # type: ignore[misc]

    @property
    def num_labels(self) -> int:
        """Labels the pooled curve is fitted on."""
        return len(self._sims)

    def entry_ids(self) -> list[int]:
        """Entries that have labels of their own."""
        return list(self._entries)

    def entry_label_count(self, entry_id: int) -> int:
        """Labels an entry has of its own."""
        el = self._entries.get(entry_id)
        return 0 if el is None else len(el.sims)

    # -- fits ---------------------------------------------------------------------------------
    def pooled_fit(self) -> LogisticFit | None:
        """The pooled curve (refitted every ``refit_every`` labels); None below ``min_labels``."""
        cfg = self.config
        if len(self._sims) < cfg.min_labels:
            return None
        if self._pooled is None or self._since_fit >= cfg.refit_every:
            self._pooled = fit_logistic(
                np.fromiter(self._sims, np.float64),
                np.fromiter(self._correct, np.float64),
                prior_precision=cfg.prior_precision,
                center=float(cfg.similarity_center),  # type: ignore[arg-type]
                scale=float(cfg.similarity_scale),  # type: ignore[arg-type]
                feature=cfg.similarity_feature,
            )
            self._since_fit = 0
            for el in self._entries.values():
                el.dirty = True
        return self._pooled

    def fit_for(self, entry_id: int | None) -> LogisticFit | None:
        """The curve that decides for ``entry_id``: its own once it has enough labels, else the
        pooled one (None while the pooled curve has too few labels)."""
        pooled = self.pooled_fit()
        if pooled is None:
            return None
        el = self._entries.get(entry_id) if entry_id is not None else None
        if el is None or len(el.sims) < self.config.entry_min_labels:
            return pooled
        if el.dirty or el.fit is None:
            el.fit = fit_logistic(
                np.fromiter(el.sims, np.float64),
                np.fromiter(el.correct, np.float64),
                prior_mean=pooled.theta,
                prior_precision=self.config.entry_prior_precision,
                center=float(self.config.similarity_center),  # type: ignore[arg-type]
                scale=float(self.config.similarity_scale),  # type: ignore[arg-type]
                feature=self.config.similarity_feature,
            )
            el.dirty = False
        return el.fit

    def region_threshold(self) -> float:
        """The ``region`` bound's lowest servable similarity (inf: none), recomputed every
        ``refit_every`` labels."""
        cfg = self.config
        if len(self._sims) < cfg.min_labels:
            return math.inf
        if self._region is None or self._since_region >= cfg.refit_every:
            self._region = region_threshold(
                np.fromiter(self._sims, np.float64),
                np.fromiter(self._correct, bool),
                delta=cfg.delta,
                z=cfg.confidence_z,
                min_labels=cfg.min_labels,
            )
            self._since_region = 0
        return self._region

    def p_wrong_ucb(self, similarity: float, entry_id: int | None = None) -> float:
        """Upper confidence bound of ``P(wrong | similarity)`` (``delta_method``) or of the
        wrong share of the region ``[similarity, 1]`` (``region``); 1.0 before enough labels."""
        if self.config.bound == "region":
            if len(self._sims) < self.config.min_labels:
                return 1.0
            return region_wrong_ucb(
                np.fromiter(self._sims, np.float64),
                np.fromiter(self._correct, bool),
                similarity,
                z=self.config.confidence_z,
            )
        fit = self.fit_for(entry_id)
        if fit is None:
            return 1.0
        return float(fit.p_wrong_ucb(similarity, self.config.confidence_z))

    def guard_steps(self) -> tuple[float, float, float, float]:
        """The guard's test: ``(log ratio added by a right label, by a wrong one, the
        opening threshold, the cap)``."""
        return self._guard_steps

    def _compute_guard_steps(self) -> tuple[float, float, float, float]:
        c = self.config
        p0, p1 = c.delta, c.guard_alternative * c.delta
        right, wrong = math.log((1.0 - p1) / (1.0 - p0)), math.log(p1 / p0)
        opening = math.log(1.0 / c.guard_alpha)
        return right, wrong, opening, opening - (c.guard_close_after - 0.5) * wrong

    def _guard_step(self, correct: bool) -> None:
        right, wrong, opening, cap = self.guard_steps()
        self.served_labels += 1
        self.served_wrong += 0 if correct else 1
        llr = self.guard_llr + (right if correct else wrong)
        self.guard_llr = min(cap, max(-opening, llr))

    def guard_open(self) -> bool:
        """Whether the on-policy guard lets the rule serve (always, with the guard off)."""
        return not self.config.served_guard or self.guard_llr >= self.guard_steps()[2]

    def can_serve(self) -> bool:
        """Whether the rule could serve any similarity now: False before ``min_labels`` labels
        (and, for ``region``, while no region meets the bound). When False, :meth:`allows`
        refuses everything, so callers may skip computing similarities."""
        if len(self._sims) < self.config.min_labels:
            return False
        return self.config.bound != "region" or math.isfinite(self.region_threshold())

    def allows(self, similarity: float, entry_id: int | None = None) -> bool:
        """The delta rule: serve a semantic hit only when ``similarity >= min_similarity`` and
        the bound holds (``P(wrong)_ucb <= delta``, or for ``region`` the similarity is at or
        above :meth:`region_threshold`)."""
        if similarity < self.config.min_similarity:
            return False
        if self.config.bound == "region":
            return similarity >= self.region_threshold()
        return self.p_wrong_ucb(similarity, entry_id) <= self.config.delta

    def min_servable_similarity(self, entry_id: int | None = None) -> float:
        """Smallest similarity (0.001 grid) the rule serves at; nan when none."""
        if self.config.bound == "region":
            t = self.region_threshold()
            return float(max(t, self.config.min_similarity)) if math.isfinite(t) else math.nan
        grid = np.linspace(0.0, 1.0, 1001)
        grid = grid[grid >= self.config.min_similarity]
        fit = self.fit_for(entry_id)
        if fit is None:
            return float("nan")
        ok = fit.p_wrong_ucb(grid, self.config.confidence_z) <= self.config.delta
        return float(grid[np.argmax(ok)]) if ok.any() else float("nan")

    # -- persistence --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-ready state (labels and counters; fits are recomputed on load)."""
        return {
            "config": asdict(self.config),
            "sims": list(self._sims),
            "correct": [bool(c) for c in self._correct],
            "entries": {
                str(k): [list(v.sims), [bool(c) for c in v.correct]]
                for k, v in self._entries.items()
            },
            "guard_llr": self.guard_llr,
            "served_labels": self.served_labels,
            "served_wrong": self.served_wrong,
            "guard_closures": self.guard_closures,
            "labels_total": self.labels_total,
            "labels_wrong": self.labels_wrong,
        }

    @classmethod
    def from_state(cls, state: dict, config: CorrectnessConfig | None = None) -> CorrectnessModel:
        """Rebuild a model from :meth:`state_dict` (``config`` overrides the stored one)."""
        model = cls(config or correctness_config_from_dict(state["config"]))
        for s, c in zip(state["sims"], state["correct"], strict=True):
            model._sims.append(float(s))
            model._correct.append(bool(c))
        for k, (sims, correct) in state["entries"].items():
            el = _EntryLabels()
            el.sims.extend(float(s) for s in sims)
            el.correct.extend(bool(c) for c in correct)
            model._entries[int(k)] = el
        if "guard_llr" in state:  # within this config's bounds (delta or alpha may differ)
            _, _, opening, cap = model.guard_steps()
            model.guard_llr = min(cap, max(-opening, float(state["guard_llr"])))
            model.served_labels = int(state["served_labels"])
            model.served_wrong = int(state["served_wrong"])
        else:  # a snapshot of the windowed guard: its on-policy labels replayed
            for c in state.get("served", ()):
                model._guard_step(bool(c))
        model.guard_closures = int(state.get("guard_closures", 0))
        model.labels_total = int(state["labels_total"])
        model.labels_wrong = int(state["labels_wrong"])
        model._since_fit = model.config.refit_every  # fit on first use
        model._region = None
        return model
