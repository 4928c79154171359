"""The posterior policy of posterior-sampling DQN as an explicit, configurable object (pure: no
RLlib, no Ray).

``logits(a) = beta * log p(a|s) + Q(s, a) / T`` over the admissible candidates, where ``beta``
(the prior weight) and ``T`` (the temperature) are separate settings. ``T`` follows one of three
schedules (see docs/algorithms.md):

- ``fixed``: ``T = temperature`` always.
- ``annealed``: geometric from ``temperature`` to ``temperature_final`` over
  ``anneal_env_steps`` *global* env steps (all env runners together), then constant. Every
  method of a comparison acts at the same ``T`` at the same step; the default.
- ``hit_rate``: the cache-coupled schedule ``T(h) = T_final + (T_0 - T_final)(1 - h)`` with
  ``h`` the env runner's cache hit-rate EMA. Each method then acts at its own ``T`` (an uncached
  method always at ``T_0``), so it is an ablation variant, not a fair comparison.

Greedy evaluation takes the argmax of the same logits at :meth:`PosteriorConfig.final_temperature`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

TEMPERATURE_SCHEDULES = ("fixed", "annealed", "hit_rate")


@dataclass(frozen=True, kw_only=True)
class PosteriorConfig:
    """The posterior ``beta * log p(a|s) + Q(s,a) / T`` and its temperature schedule.

    Attributes:
        prior_weight: ``beta`` (>= 0). 0 ignores the prior (a Boltzmann policy over Q); 1 is the
            control-as-inference posterior ``p(a|s) exp(Q/T)``.
        schedule: ``"fixed"``, ``"annealed"`` or ``"hit_rate"`` (see the module docstring).
        temperature: ``T`` of ``fixed``; ``T_0`` of ``annealed`` and ``hit_rate`` (> 0).
        temperature_final: Last ``T`` of ``annealed``; ``T_min`` of ``hit_rate`` (> 0, at most
            ``temperature``).
        anneal_env_steps: Global env steps over which ``annealed`` goes from ``temperature`` to
            ``temperature_final`` (>= 1).

    Example:
        >>> p = PosteriorConfig(schedule="annealed", temperature=1.0, temperature_final=0.01,
        ...                     anneal_env_steps=100)
        >>> [round(p.temperature_at(t), 3) for t in (0, 50, 100, 1000)]
        [1.0, 0.1, 0.01, 0.01]
        >>> p.final_temperature()
        0.01
    """

    prior_weight: float = 1.0
    schedule: str = "annealed"
    temperature: float = 1.0
    temperature_final: float = 0.1
    anneal_env_steps: int = 10_000

    def __post_init__(self) -> None:
        if self.schedule not in TEMPERATURE_SCHEDULES:
            raise ValueError(
                f"PosteriorConfig.schedule must be one of {TEMPERATURE_SCHEDULES}, "
                f"got {self.schedule!r}"
            )
        if not (math.isfinite(self.prior_weight) and self.prior_weight >= 0):
            raise ValueError(f"PosteriorConfig.prior_weight must be >= 0, got {self.prior_weight}")
        if not 0 < self.temperature_final <= self.temperature:
            raise ValueError(
                "PosteriorConfig needs 0 < temperature_final <= temperature, got "
                f"{self.temperature_final} and {self.temperature}"
            )
        if self.anneal_env_steps < 1:
            raise ValueError("PosteriorConfig.anneal_env_steps must be >= 1")

    def temperature_at(self, env_steps: int | None, hit_rate: float | None = None) -> float:
        """``T`` at ``env_steps`` global env steps (None: the end of training), with the cache
        hit rate ``hit_rate`` for the ``hit_rate`` schedule (None counts as 0)."""
        if self.schedule == "fixed":
            return self.temperature
        if self.schedule == "hit_rate":
            h = min(max(float(hit_rate or 0.0), 0.0), 1.0)
            return self.temperature_final + (self.temperature - self.temperature_final) * (1 - h)
        if env_steps is None:
            return self.temperature_final
        frac = min(max(env_steps, 0) / self.anneal_env_steps, 1.0)
        return self.temperature * (self.temperature_final / self.temperature) ** frac

    def final_temperature(self, hit_rate: float | None = None) -> float:
        """The ``T`` greedy evaluation uses: the schedule's last value (``hit_rate``: at the
        given final hit rate)."""
        return self.temperature_at(None, hit_rate)

    def to_dict(self) -> dict:
        """Plain-dict form (RLlib ``model_config``, checkpoint metadata)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping | None) -> PosteriorConfig:
        """Inverse of :meth:`to_dict` (None: the defaults)."""
        return cls(**dict(d)) if d else cls()
