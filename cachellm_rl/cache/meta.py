"""Online meta-optimisation of the cache parameters (K, tau, rho and, under the delta reuse rule,
the exploration rate) (see docs/cache.md) and the
posterior temperature schedule (see docs/algorithms.md). Pure functions and small state machines,
no Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from cachellm_rl.cache.adaptive import WindowCounters

META_MODES = ("heuristic", "spsa", "static")
STALE_SIGNALS = ("error_rate", "kl")


@dataclass(frozen=True)
class CacheParams:
    """The meta-parameters.

    Attributes:
        capacity_entries: ``K``.
        min_cosine_similarity: ``tau`` (cosine, higher = stricter; the ``tau`` rule only).
        refresh_probability: ``rho``.
        explore_probability: Chance that a servable semantic hit calls the LM anyway (the
            ``delta`` rule only).
    """

    capacity_entries: int
    min_cosine_similarity: float
    refresh_probability: float
    explore_probability: float = 0.0


@dataclass(frozen=True, kw_only=True)
class MetaConfig:
    """Configuration of :class:`MetaOptimizer`; the step sizes and targets are what
    ``tune_spaces/`` sweeps.

    Attributes:
        mode: ``"heuristic"`` (projected rule steps), ``"spsa"`` (gradient estimate of the
            meta-reward from ``tau +/- delta`` lookups) or ``"static"`` (no updates).
        window_decisions: ``M``, decisions per meta-update.
        stale_signal: What says the cache serves stale priors: ``"error_rate"`` (EMA of the
            fraction of refreshes that found a cache error, see
            :class:`~cachellm_rl.cache.adaptive.RefreshMeasure`) or ``"kl"`` (mean refresh KL
            of the window). The KL is dominated by disagreement about actions neither prior
            would pick when priors are peaked; the error rate counts only changed choices.
        target_refresh_error_rate: Error rate above which tau and rho rise.
        target_refresh_kl: Refresh KL above which tau and rho rise (``stale_signal="kl"``).
        target_hit_rate: Hit rate under which tau falls (when the cache is not stale).
        tau_step: Additive tau step.
        capacity_gain: ``K *= 1 + capacity_gain * capacity_miss_rate``.
        capacity_shrink: ``K *= 1 - capacity_shrink`` when the cache is full and unused
            entries exceed the threshold.
        unused_fraction_threshold: Fraction of never-hit entries above which K shrinks.
        full_fraction: Live entries / K at or above which the cache counts as full. K shrinks
            only then: shrinking is there to release memory, and a cache below K holds none
            to release (in RL a state met once is often met again much later, so shrinking a
            cache that is not full only evicts it sooner).
        rho_step: Additive rho step.
        tau_min / tau_max / capacity_min / capacity_max / rho_min / rho_max: Projection box.
        lambda_queries: Meta-reward cost per LM query (per decision).
        lambda_kl: Meta-reward cost per unit of refresh KL.
        spsa_delta: Perturbation of the SPSA parameter (tau under the ``tau`` rule, the
            exploration rate under the ``delta`` rule).
        spsa_learning_rate: SPSA step size.
        reuse_rule: The cache's reuse rule (``"tau"`` or ``"delta"``): under ``delta`` the
            threshold is not tuned (the correctness model decides each hit) and the exploration
            rate is.
        explore_step: Additive step of the exploration rate.
        explore_min / explore_max: Its projection box.
    """

    mode: str = "heuristic"
    window_decisions: int = 500
    stale_signal: str = "error_rate"
    target_refresh_error_rate: float = 0.5
    target_refresh_kl: float = 0.05
    target_hit_rate: float = 0.8
    tau_step: float = 0.005
    capacity_gain: float = 2.0
    capacity_shrink: float = 0.05
    unused_fraction_threshold: float = 0.6
    full_fraction: float = 0.95
    rho_step: float = 0.01
    tau_min: float = 0.80
    tau_max: float = 0.995
    capacity_min: int = 64
    capacity_max: int = 1_000_000
    rho_min: float = 0.0
    rho_max: float = 0.5
    lambda_queries: float = 0.1
    lambda_kl: float = 1.0
    spsa_delta: float = 0.01
    spsa_learning_rate: float = 0.05
    reuse_rule: str = "tau"
    explore_step: float = 0.01
    explore_min: float = 0.01
    explore_max: float = 0.2

    def __post_init__(self) -> None:
        if self.mode not in META_MODES:
            raise ValueError(f"MetaConfig.mode must be one of {META_MODES}, got {self.mode!r}")
        if self.stale_signal not in STALE_SIGNALS:
            raise ValueError(
                f"MetaConfig.stale_signal must be one of {STALE_SIGNALS}, got {self.stale_signal!r}"
            )
        if not 0.0 <= self.target_refresh_error_rate <= 1.0:
            raise ValueError(
                "MetaConfig.target_refresh_error_rate must be in [0, 1], got "
                f"{self.target_refresh_error_rate}"
            )
        if not 0 < self.full_fraction <= 1:
            raise ValueError(
                f"MetaConfig.full_fraction must be in (0, 1], got {self.full_fraction}"
            )
        if self.window_decisions < 1:
            raise ValueError("MetaConfig.window_decisions must be >= 1")
        if not (-1 <= self.tau_min <= self.tau_max <= 1):
            raise ValueError("MetaConfig tau range must satisfy -1 <= tau_min <= tau_max <= 1")
        if not (1 <= self.capacity_min <= self.capacity_max):
            raise ValueError("MetaConfig capacity range must satisfy 1 <= min <= max")
        if not (0 <= self.rho_min <= self.rho_max <= 1):
            raise ValueError("MetaConfig rho range must satisfy 0 <= min <= max <= 1")
        if self.spsa_delta <= 0:
            raise ValueError("MetaConfig.spsa_delta must be > 0")
        if self.reuse_rule not in ("tau", "delta"):
            raise ValueError(
                f"MetaConfig.reuse_rule must be 'tau' or 'delta', got {self.reuse_rule!r}"
            )
        if not (0 <= self.explore_min <= self.explore_max <= 1):
            raise ValueError("MetaConfig explore range must satisfy 0 <= min <= max <= 1")


@dataclass(frozen=True)
class WindowSignals:
    """Measured signals of one window (see docs/cache.md).

    Attributes:
        decisions: Decisions in the window.
        hit_rate: Hits / decisions.
        refresh_kl: Mean refresh KL in the window, NaN when no refresh returned.
        capacity_miss_rate: Capacity misses / decisions.
        unused_fraction: Fraction of live entries never hit.
        lm_queries: LM queries in the window.
        return_trend: Change of the mean episode return vs the previous window (None: unknown).
        refresh_error_rate: EMA of the refresh error flag, NaN before the first refresh.
        served_label_error_rate: Wrong fraction of the window's reuse labels measured at
            similarities the cache serves (exploration calls and refreshes), NaN when none.
        fill_fraction: Live entries / K at the end of the window (1.0 when not measured).
    """

    decisions: int
    hit_rate: float
    refresh_kl: float
    capacity_miss_rate: float
    unused_fraction: float
    lm_queries: int
    return_trend: float | None = None
    refresh_error_rate: float = float("nan")
    served_label_error_rate: float = float("nan")
    fill_fraction: float = 1.0

    @classmethod
    def from_window(
        cls,
        w: WindowCounters,
        *,
        unused_fraction: float,
        return_trend: float | None = None,
        refresh_error_rate: float = float("nan"),
        fill_fraction: float = 1.0,
    ) -> WindowSignals:
        """Build signals from a cache's window counters (and its refresh-error EMA)."""
        n = max(1, w.decisions)
        return cls(
            decisions=w.decisions,
            hit_rate=w.hits / n,
            refresh_kl=float(np.mean(w.refresh_kls)) if w.refresh_kls else float("nan"),
            capacity_miss_rate=w.capacity_misses / n,
            unused_fraction=unused_fraction,
            lm_queries=w.lm_queries,
            return_trend=return_trend,
            refresh_error_rate=refresh_error_rate,
            served_label_error_rate=(
                w.served_wrong / w.served_labels if w.served_labels else float("nan")
            ),
            fill_fraction=fill_fraction,
        )


def project(params: CacheParams, cfg: MetaConfig) -> CacheParams:
    """Clip (K, tau, rho) into the configured box."""
    return CacheParams(
        capacity_entries=int(min(max(params.capacity_entries, cfg.capacity_min), cfg.capacity_max)),
        min_cosine_similarity=float(
            min(max(params.min_cosine_similarity, cfg.tau_min), cfg.tau_max)
        ),
        refresh_probability=float(min(max(params.refresh_probability, cfg.rho_min), cfg.rho_max)),
        explore_probability=float(
            min(max(params.explore_probability, cfg.explore_min), cfg.explore_max)
        ),
    )


def is_stale(s: WindowSignals, cfg: MetaConfig) -> bool | None:
    """Whether the window's stale signal is above its target (None: nothing measured yet)."""
    if cfg.stale_signal == "error_rate":
        value, target = s.refresh_error_rate, cfg.target_refresh_error_rate
    else:
        value, target = s.refresh_kl, cfg.target_refresh_kl
    return None if math.isnan(value) else value > target


def heuristic_update(params: CacheParams, s: WindowSignals, cfg: MetaConfig) -> CacheParams:
    """One projected heuristic step (see docs/cache.md).

    - ``tau`` rule: tau up when the cache is stale (:func:`is_stale`); down when it is not and
      the hit rate is under target (nothing measured yet: only the hit-rate rule applies);
    - ``delta`` rule: tau is left alone; the exploration rate rises when the labels measured at
      served similarities are wrong more often than the target error rate (the fitted curve
      may be optimistic there: more labels), and decays otherwise;
    - K up in proportion to the capacity-miss rate; down when the cache is full and its
      entries go unused;
    - rho up when the cache is stale or the return falls; down otherwise.

    Example:
        >>> cfg = MetaConfig(stale_signal="kl")
        >>> p = CacheParams(1000, 0.9, 0.1)
        >>> s = WindowSignals(500, 0.5, 0.5, 0.0, 0.0, 250)
        >>> q = heuristic_update(p, s, cfg)
        >>> q.min_cosine_similarity > 0.9 and q.refresh_probability > 0.1
        True
    """
    kl_high = bool(is_stale(s, cfg))
    tau = params.min_cosine_similarity
    explore = params.explore_probability
    if cfg.reuse_rule == "delta":
        served_bad = not math.isnan(s.served_label_error_rate) and (
            s.served_label_error_rate > cfg.target_refresh_error_rate
        )
        explore += cfg.explore_step if served_bad else -cfg.explore_step
    elif kl_high:
        tau += cfg.tau_step
    elif s.hit_rate < cfg.target_hit_rate:
        tau -= cfg.tau_step
    k = float(params.capacity_entries)
    if s.capacity_miss_rate > 0:
        k *= 1.0 + cfg.capacity_gain * s.capacity_miss_rate
    elif s.unused_fraction > cfg.unused_fraction_threshold and s.fill_fraction >= cfg.full_fraction:
        k *= 1.0 - cfg.capacity_shrink
    rho = params.refresh_probability
    falling = s.return_trend is not None and s.return_trend < 0
    rho = rho + cfg.rho_step if (kl_high or falling) else rho - cfg.rho_step
    return project(CacheParams(round(k), tau, rho, explore), cfg)


def meta_reward(
    mean_return: float, queries_per_decision: float, refresh_kl: float, cfg: MetaConfig
) -> float:
    """``return - lambda_q * queries - lambda_kl * refresh KL`` (NaN KL counts as 0)."""
    kl = 0.0 if math.isnan(refresh_kl) else refresh_kl
    return mean_return - cfg.lambda_queries * queries_per_decision - cfg.lambda_kl * kl


@dataclass
class _SignWindow:
    decisions: int = 0
    lm_queries: int = 0
    returns: list[float] = field(default_factory=list)
    kls: list[float] = field(default_factory=list)


class SPSATau:
    """Simultaneous-perturbation estimate of d(meta-reward)/d(tau).

    The perturbed parameter is ``tau`` under the ``tau`` rule and the exploration rate under the
    ``delta`` rule. Callers are split into a ``+`` and a ``-`` group by the order in which they
    first call (the 1st, 3rd, ... caller is ``+``); while only one caller has been seen, that
    caller alternates between the signs one half window at a time. Each group looks up with the
    parameter ``+/- delta``; when both groups have a half window, ``g = (R+ - R-) / (2 delta)``
    and the parameter moves by ``lr * clip(g, -1, 1)``.
    """

    def __init__(self, cfg: MetaConfig) -> None:
        self.cfg = cfg
        self._win = {+1: _SignWindow(), -1: _SignWindow()}
        self._single_caller_sign = +1
        self._callers: dict[int, int] = {}
        self.last_gradient = float("nan")
        self.steps = 0

    def sign_for(self, caller_id: int | None) -> int:
        """Perturbation sign of a caller (None: the current single-caller sign)."""
        if caller_id is not None and int(caller_id) not in self._callers:
            self._callers[int(caller_id)] = len(self._callers)
        if caller_id is None or len(self._callers) < 2:
            return self._single_caller_sign
        return +1 if self._callers[int(caller_id)] % 2 == 0 else -1

    def record(
        self, sign: int, *, decisions: int = 0, lm_queries: int = 0, kl: float | None = None
    ) -> None:
        """Accumulate decisions, LM queries and refresh KLs for one sign."""
        w = self._win[sign]
        w.decisions += decisions
        w.lm_queries += lm_queries
        if kl is not None and not math.isnan(kl):
            w.kls.append(kl)

    def record_returns(self, sign: int, returns: list[float]) -> None:
        """Episode returns of callers of one sign."""
        self._win[sign].returns.extend(float(r) for r in returns)

    def _reward(self, w: _SignWindow) -> float:
        mean_ret = float(np.mean(w.returns)) if w.returns else 0.0
        kl = float(np.mean(w.kls)) if w.kls else float("nan")
        return meta_reward(mean_ret, w.lm_queries / max(1, w.decisions), kl, self.cfg)

    def bounds(self) -> tuple[float, float]:
        """Box of the perturbed parameter (tau's or the exploration rate's)."""
        if self.cfg.reuse_rule == "delta":
            return self.cfg.explore_min, self.cfg.explore_max
        return self.cfg.tau_min, self.cfg.tau_max

    def maybe_step(self, value: float) -> float:
        """Return the updated parameter when both signs have a half window, else ``value``."""
        half = max(1, self.cfg.window_decisions // 2)
        plus, minus = self._win[+1], self._win[-1]
        if plus.decisions < half and minus.decisions < half:
            return value
        if plus.decisions < half or minus.decisions < half:
            # Single caller: switch the sign it looks up with once its half window is full.
            self._single_caller_sign = -1 if plus.decisions >= half else +1
            return value
        g = (self._reward(plus) - self._reward(minus)) / (2 * self.cfg.spsa_delta)
        self.last_gradient = g
        self.steps += 1
        self._win = {+1: _SignWindow(), -1: _SignWindow()}
        self._single_caller_sign = +1
        new = value + self.cfg.spsa_learning_rate * float(np.clip(g, -1.0, 1.0))
        lo, hi = self.bounds()
        return float(min(max(new, lo + self.cfg.spsa_delta), hi - self.cfg.spsa_delta))


class MetaOptimizer:
    """Drives (K, tau, rho) of a cache every ``M`` decisions.

    Args:
        cfg: Meta configuration.
    """

    def __init__(self, cfg: MetaConfig) -> None:
        self.cfg = cfg
        self.spsa = SPSATau(cfg) if cfg.mode == "spsa" else None
        self._returns: list[float] = []
        self._prev_mean_return: float | None = None
        self.history: list[dict[str, float]] = []

    def record_returns(self, returns: list[float]) -> None:
        """Episode returns finished since the last window (for the return trend)."""
        self._returns.extend(float(r) for r in returns)

    def due(self, window_decisions: int) -> bool:
        """Whether a heuristic update is due."""
        return self.cfg.mode == "heuristic" and window_decisions >= self.cfg.window_decisions

    def return_trend(self) -> float | None:
        """Mean return of this window minus that of the previous one (None when unknown)."""
        if not self._returns:
            return None
        mean = float(np.mean(self._returns))
        trend = None if self._prev_mean_return is None else mean - self._prev_mean_return
        self._prev_mean_return = mean
        self._returns = []
        return trend

    def step(self, params: CacheParams, signals: WindowSignals) -> CacheParams:
        """One heuristic update, logged in ``history``."""
        new = heuristic_update(params, signals, self.cfg)
        self.history.append(
            {
                "hit_rate": signals.hit_rate,
                "refresh_kl": signals.refresh_kl,
                "refresh_error_rate": signals.refresh_error_rate,
                "served_label_error_rate": signals.served_label_error_rate,
                "capacity_miss_rate": signals.capacity_miss_rate,
                "K": new.capacity_entries,
                "tau": new.min_cosine_similarity,
                "rho": new.refresh_probability,
                "explore": new.explore_probability,
            }
        )
        return new

    def state_dict(self) -> dict:
        """JSON-ready state, kept in cache snapshots so a restarted actor resumes it."""
        spsa = self.spsa
        return {
            "returns": list(self._returns),
            "prev_mean_return": self._prev_mean_return,
            "history": self.history[-1000:],
            "spsa": None
            if spsa is None
            else {
                "steps": spsa.steps,
                "last_gradient": spsa.last_gradient,
                "single_caller_sign": spsa._single_caller_sign,
                "callers": {str(k): v for k, v in spsa._callers.items()},
            },
        }

    def load_state(self, state: dict) -> None:
        """Resume from :meth:`state_dict` output (the open SPSA windows start afresh)."""
        self._returns = [float(r) for r in state.get("returns", [])]
        prev = state.get("prev_mean_return")
        self._prev_mean_return = None if prev is None else float(prev)
        self.history = list(state.get("history", []))
        sp = state.get("spsa")
        if self.spsa is not None and sp:
            self.spsa.steps = int(sp["steps"])
            self.spsa.last_gradient = float(sp["last_gradient"])
            self.spsa._single_caller_sign = int(sp["single_caller_sign"])
            self.spsa._callers = {int(k): int(v) for k, v in sp["callers"].items()}


def posterior_temperature(hit_rate: float, *, t0: float = 1.0, t_min: float = 0.1) -> float:
    """``T(h) = T_min + (T_0 - T_min)(1 - h)``, ``h`` clipped to [0, 1] (see docs/algorithms.md).

    Example:
        >>> posterior_temperature(0.0, t0=1.0, t_min=0.1)
        1.0
        >>> posterior_temperature(1.0, t0=1.0, t_min=0.1)
        0.1
    """
    if not (t0 > 0 and t_min > 0):
        raise ValueError(f"temperatures must be > 0, got t0={t0}, t_min={t_min}")
    h = min(max(float(hit_rate), 0.0), 1.0)
    return t_min + (t0 - t_min) * (1.0 - h)


__all__ = [
    "CacheParams",
    "MetaConfig",
    "MetaOptimizer",
    "SPSATau",
    "WindowSignals",
    "heuristic_update",
    "is_stale",
    "meta_reward",
    "posterior_temperature",
    "project",
]
