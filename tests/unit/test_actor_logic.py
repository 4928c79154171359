"""SharedPriorCache logic driven directly with asyncio (no Ray): meta-updates and fallbacks."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cachellm_rl.cache.actor import SharedCacheConfig, SharedPriorCache
from cachellm_rl.cache.meta import MetaConfig
from cachellm_rl.contracts import PriorSource
from tests.helpers import query, small_config


def test_heuristic_meta_update_runs_every_window():
    cfg = SharedCacheConfig(
        cache=small_config(min_cosine_similarity=0.9),
        meta=MetaConfig(mode="heuristic", window_decisions=10, tau_step=0.01),
        prior_app=None,  # no LM: every miss falls back to the uniform prior
    )
    actor = SharedPriorCache(cfg)
    rng = np.random.default_rng(0)
    fills: list[float] = []
    step = actor._meta.step
    actor._meta.step = lambda p, sig: fills.append(sig.fill_fraction) or step(p, sig)

    async def run():
        for i in range(25):
            res = await actor.get_priors([query(f"s{i}", rng.normal(size=8))])
            assert res[0].source is PriorSource.FALLBACK_UNIFORM

    asyncio.run(run())
    s = actor.local_stats()
    assert s.meta_updates == 2  # windows of 10 decisions
    assert s.min_cosine_similarity < 0.9  # hit rate 0 < target, no refresh KL: tau falls
    assert s.fallbacks_uniform == 25 and s.lm_failures == 25
    assert len(actor.meta_history()) == 2
    assert fills == [0.0, 0.0]  # fallbacks are not cached: the cache is empty, K may not shrink


def test_spsa_mode_moves_tau_from_caller_groups():
    cfg = SharedCacheConfig(
        cache=small_config(min_cosine_similarity=0.9),
        meta=MetaConfig(mode="spsa", window_decisions=8, spsa_delta=0.01, spsa_learning_rate=0.01),
        prior_app=None,
    )
    actor = SharedPriorCache(cfg)

    async def run():
        for i in range(4):
            await actor.get_priors([query(f"a{i}", None)], caller_id=0)  # + group
        for i in range(3):
            await actor.get_priors([query(f"b{i}", None)], caller_id=1)  # - group
        actor.report_episode_returns([1.0], caller_id=0)
        actor.report_episode_returns([0.0], caller_id=1)
        assert actor.local_stats().min_cosine_similarity == 0.9  # no step before both half-windows
        await actor.get_priors([query("b3", None)], caller_id=1)  # completes the window

    asyncio.run(run())
    assert actor.local_stats().min_cosine_similarity > 0.9  # the + side earned more return


def test_near_inflight_reuse_under_delta_only_without_the_guard_and_the_verifier():
    """A near state's in-flight answer is reused under the delta rule only where the curve
    allows it, with the on-policy guard off (the guard could never check such a reuse: it is
    not explored) and no verifier deciding (its curve reads verifier scores, which an answer
    in flight has none of)."""
    from cachellm_rl.cache.correctness import CorrectnessConfig

    def actor_with(guard: bool) -> SharedPriorCache:
        cfg = SharedCacheConfig(
            cache=small_config(
                reuse_rule="delta",
                min_candidate_coverage=0.5,
                correctness=CorrectnessConfig(min_labels=20, refit_every=1, served_guard=guard),
            ),
            prior_app=None,
        )
        actor = SharedPriorCache(cfg)
        rng = np.random.default_rng(0)
        for _ in range(2000):
            s = float(rng.uniform(0.85, 1.0))
            actor._cache.correctness.record(s, s >= 0.95, on_policy=s >= 0.95)
        assert actor._cache.correctness.allows(0.99)
        return actor

    e = np.eye(8, dtype=np.float32)
    leader = query("leader", e[0])
    follower = query("follower", (e[0] * 0.99 + e[1] * np.sqrt(1 - 0.99**2)).astype(np.float32))
    guarded, free = actor_with(True), actor_with(False)
    for actor in (guarded, free):
        actor._inflight_near[leader.exact_key] = (leader.embedding, frozenset(("a", "b", "c")))
    assert guarded._cache.correctness.guard_open()
    assert guarded._near_inflight(follower) is None
    assert free._near_inflight(follower) == (leader.exact_key, pytest.approx(0.99, abs=1e-4))
    free._cache.verifier = object()  # type: ignore[assignment]  # any verifier
    assert free._near_inflight(follower) is None


def test_kill_cache_returns_only_once_the_name_is_released(monkeypatch):
    """``ray.kill`` is asynchronous: ``kill_cache`` must wait until Ray no longer knows the
    name, so a call or a ``get_or_create_cache`` right after it cannot reach the dying actor."""
    from cachellm_rl.cache import actor as actor_mod

    class Handle:
        class topology:  # stands in for the actor method
            @staticmethod
            def remote():
                return None

    state = {"killed": False, "lookups_after_kill": 0}

    def get_actor(name, namespace=None):
        if state["killed"]:
            state["lookups_after_kill"] += 1
            if state["lookups_after_kill"] > 3:  # Ray releases the name a little later
                raise ValueError(name)
        return Handle()

    def kill(handle, no_restart=True):
        state["killed"] = True

    monkeypatch.setattr(actor_mod.ray, "get_actor", get_actor)
    monkeypatch.setattr(actor_mod.ray, "get", lambda ref, timeout=None: [1])
    monkeypatch.setattr(actor_mod.ray, "kill", kill)
    assert actor_mod.kill_cache("c", "ns")
    with pytest.raises(ValueError):
        actor_mod.ray.get_actor("c", namespace="ns")
