"""Ray Tune search spaces over cachellm_rl's settings.

Each function returns a ``param_space`` dict for ``tune.Tuner``: keys are dotted settings of
``cachellm_rl.algorithms.ps_dqn.methods.MethodSettings`` (``"meta.rho_min"`` is
``MethodSettings.meta.rho_min``), plus ``"prior_temperature"`` (the prior's ``T_prior``, a
setting of the Serve deployment). A ``best.json`` written by ``cachellm-rl tune`` holds one
sampled point of a space under ``"settings"``; ``text_suite.py --settings best.json`` applies it.

The cache's error budget ``delta`` is the user's, never swept: a sweep that widened it would buy
hits with errors. Ranges keep each sample valid (``rho_min <= rho_0 <= rho_max``, the initial
exploration rate inside ``[explore_min, explore_max]``).

Example:
    >>> from tune_spaces import SPACES, space
    >>> sorted(SPACES)
    ['cache_meta', 'posterior', 'prior_temperature']
    >>> "correctness.delta" in space("cache_meta")
    False
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray import tune

PRIOR_TEMPERATURE = "prior_temperature"
"""Key of the prior's temperature (not a ``MethodSettings`` field: it selects a Serve app)."""


def cache_meta() -> dict[str, Any]:
    """The adaptive cache's meta-parameters: initial capacity K, refresh-probability bounds
    and start, the exploration rate of the delta rule and its step, the meta step sizes and
    the meta-optimiser's window."""
    return {
        # up to the meta-optimiser's ceiling (the default start): a small start evicts states
        # the agent meets again before capacity misses can grow K (docs/cache.md)
        "adaptive_initial_capacity": tune.lograndint(64, 1_000_001),
        "refresh_probability": tune.uniform(0.05, 0.2),
        "meta.rho_min": tune.uniform(0.0, 0.05),
        "meta.rho_max": tune.uniform(0.2, 0.5),
        "meta.rho_step": tune.loguniform(0.002, 0.05),
        # the on-policy guard explores at least guard_explore_probability (0.1) of what the
        # delta rule would serve, so the rate is swept above it
        "correctness.explore_probability": tune.loguniform(0.1, 0.3),
        "meta.explore_step": tune.loguniform(0.002, 0.05),
        "meta.capacity_gain": tune.uniform(0.5, 4.0),
        "meta.window_decisions": tune.choice([100, 200, 500, 1000]),
    }


def posterior() -> dict[str, Any]:
    """The posterior ``p^beta * exp(Q/T)``: the prior weight beta, the first and last ``T`` of
    the annealed schedule (the ranges meet at 0.5, so ``T_final <= T_0`` always holds)."""
    return {
        "posterior.prior_weight": tune.uniform(0.25, 2.0),
        "posterior.temperature": tune.loguniform(0.5, 3.0),
        "posterior.temperature_final": tune.loguniform(0.05, 0.5),
    }


def prior_temperature() -> dict[str, Any]:
    """The prior's softmax temperature ``T_prior`` (one Serve application per value)."""
    return {PRIOR_TEMPERATURE: tune.choice([0.25, 0.5, 1.0, 2.0])}


SPACES: dict[str, Callable[[], dict[str, Any]]] = {
    "cache_meta": cache_meta,
    "posterior": posterior,
    "prior_temperature": prior_temperature,
}


def space(name: str) -> dict[str, Any]:
    """The search space called ``name``.

    Raises:
        ValueError: No such space.
    """
    if name not in SPACES:
        raise ValueError(f"unknown search space {name!r}; spaces: {', '.join(sorted(SPACES))}")
    return SPACES[name]()
