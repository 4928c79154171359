"""Fault drills: a multi-runner PS-DQN run in which the cache actor or the Serve replica of the
prior is killed mid-run, and what it cost (see docs/cluster.md, "Faults").

A drill trains one cached method with several env runners and a cache actor that snapshots
every ``snapshot_interval_s`` seconds. At ``kill_at_env_steps`` it kills

- ``cache_actor``: the cache actor, as a crash would (Ray restarts it; the new instance restores
  the latest snapshot: entries, adapted parameters, correctness model, counters), or
- ``serve_replica``: the prior's Serve replica (Serve's controller starts a new one; meanwhile
  the cache answers misses with fallback priors),

and keeps training to ``env_steps``. ``none`` is the same run without a fault. The result says
whether the run finished, how many decisions raised (the goal is 0: a fault degrades, it never
crashes training), how many were served by a fallback prior (by the env runners while the actor
was away; by the cache while the LM was away), the entries before the kill, in the snapshot it
restored and after the restart, the adapted parameters on both sides, and training success.

:func:`snapshot_summary` is the pure part; :func:`run_fault_drill` is the Ray shell.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

FAULTS = ("none", "cache_actor", "serve_replica")
PARAM_KEYS = ("capacity_entries", "min_cosine_similarity", "refresh_probability")


@dataclass(frozen=True)
class FaultDrill:
    """One drill.

    Attributes:
        fault: ``none``, ``cache_actor`` or ``serve_replica``.
        method: Cached PS-DQN method trained.
        num_env_runners: Remote env runners (fractional CPUs: ``1 / num_env_runners`` each).
        env_steps: Env steps of the whole run.
        kill_at_env_steps: Env steps after which the fault is injected.
        snapshot_interval_s: Seconds between the cache actor's automatic snapshots.
        recovery_timeout_s: Longest wait for the killed part to be back before giving up.
        seed: RL seed.
    """

    fault: str = "none"
    method: str = "adaptive"
    num_env_runners: int = 4
    env_steps: int = 1600
    kill_at_env_steps: int = 800
    snapshot_interval_s: float = 5.0
    recovery_timeout_s: float = 120.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; faults: {', '.join(FAULTS)}")
        if self.num_env_runners < 1:
            raise ValueError(f"num_env_runners must be >= 1, got {self.num_env_runners}")
        if not 0 < self.kill_at_env_steps < self.env_steps:
            raise ValueError("kill_at_env_steps must be in (0, env_steps)")
        if self.snapshot_interval_s <= 0:
            raise ValueError("snapshot_interval_s must be > 0 (the drill restores a snapshot)")


def snapshot_summary(directory: str | Path) -> dict[str, Any] | None:
    """Entries and adapted parameters of the latest snapshot under ``directory`` (None when
    there is none)."""
    from cachellm_rl.cache.adaptive import AdaptiveCache

    snap = AdaptiveCache.latest_snapshot(directory)
    if snap is None:
        return None
    meta = json.loads((snap / "meta.json").read_text())
    entries = json.loads((snap / "entries.json").read_text())
    return {
        "snapshot": snap.name,
        "entries": len(entries),
        **dict(zip(PARAM_KEYS, meta["params"], strict=True)),
        "explore_probability": meta.get("explore_probability"),
        "labels": meta.get("labels_total"),
    }


def _params(stats: dict) -> dict[str, Any]:
    keys = (*PARAM_KEYS, "explore_probability")
    return {k: stats.get(k) for k in keys}


def _serve_replicas(app: str) -> list[dict]:
    """Live replicas of Serve application ``app``, from Ray's named actors (Serve names each
    replica ``SERVE_REPLICA::<app>#<deployment>#<id>``; no dashboard needed)."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#"
    return [
        {"name": a["name"], "namespace": a["namespace"], "actor_id": a["name"]}
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(prefix)
    ]


def kill_serve_replica(app: str) -> str:
    """Kill one live replica of Serve application ``app`` (Serve starts a new one); returns its
    actor id.

    Raises:
        RuntimeError: The application has no live replica.
    """
    import ray

    replicas = _serve_replicas(app)
    if not replicas:
        raise RuntimeError(f"Serve application {app!r} has no live replica")
    r = replicas[0]
    ray.kill(ray.get_actor(r["name"], namespace=r["namespace"]), no_restart=True)
    return str(r["actor_id"])


def _wait(pred, timeout_s: float, what: str) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        try:
            if pred():
                return time.perf_counter() - t0
        except Exception:  # the part is still coming back
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not come back within {timeout_s:.0f} s")


def run_fault_drill(
    drill: FaultDrill,
    settings,
    *,
    env: str,
    env_config: dict,
    cache_name: str,
    snapshot_dir: str | Path,
    progress=None,
) -> dict[str, Any]:
    """Run ``drill`` (see the module docstring) and return what it measured.

    Args:
        drill: The drill.
        settings: ``MethodSettings`` of the run (its ``prior_app`` names the Serve app).
        env: Text env id.
        env_config: The env's config (games, max steps).
        cache_name: Name of the run's cache actor (killed at the end).
        snapshot_dir: Where the cache actor snapshots (emptied first).
        progress: Optional callable ``progress(env_steps)`` after every iteration.
    """
    import shutil

    import ray

    from cachellm_rl.algorithms.ps_dqn.methods import (
        algo_config_for,
        cache_config_for,
        collect_reports,
        merge_reports,
    )
    from cachellm_rl.cache.actor import DEFAULT_NAMESPACE, get_or_create_cache, kill_cache
    from cachellm_rl.envs.registry import env_class

    snap = Path(snapshot_dir)
    shutil.rmtree(snap, ignore_errors=True)
    n = drill.num_env_runners
    s = replace(settings, num_cpus_per_env_runner=round(1.0 / n, 4))
    cache_cfg = cache_config_for(drill.method, s, env=env)
    if cache_cfg is None:
        raise ValueError(f"{drill.method!r} uses no cache; drill a cached method")
    cache_cfg = replace(
        cache_cfg,
        snapshot_dir=str(snap),
        snapshot_interval_s=drill.snapshot_interval_s,
        max_restarts=max(cache_cfg.max_restarts, 1),
    )
    handle = get_or_create_cache(cache_cfg, name=cache_name, namespace=DEFAULT_NAMESPACE)
    ray.get(handle.ping.remote())
    algo = algo_config_for(
        drill.method,
        s,
        env_class=env_class(env),
        env_config=env_config,
        cache_name=cache_name,
        num_env_runners=n,
        total_env_steps=drill.env_steps,
        seed=drill.seed,
    ).build_algo()
    out: dict[str, Any] = {"fault": drill.fault, "num_env_runners": n, "kills": 0}
    episodes: list[dict] = []
    report = merge_reports([])
    steps, raised, finished = 0, 0, False
    t0 = time.perf_counter()
    try:
        while steps < drill.env_steps:
            try:
                result = algo.train()
            except Exception as exc:  # a decision (or a runner) raised: the drill's failure
                raised += 1
                out["error"] = repr(exc)
                break
            steps = int(result["env_runners"]["num_env_steps_sampled_lifetime"])
            episodes += collect_reports(algo).episodes  # counters are cumulative, episodes not
            if progress is not None:
                progress(steps)
            if drill.fault != "none" and out["kills"] == 0 and steps >= drill.kill_at_env_steps:
                out.update(_inject(drill, handle, snap, s.prior_app))
                out["kill_at_env_steps"] = steps
        else:
            finished = True
        report = collect_reports(algo)  # each runner's counters since it started
        out["env_runner_restarts"] = int(
            getattr(algo.env_runner_group, "num_remote_worker_restarts", lambda: 0)()
        )
    finally:
        wall = time.perf_counter() - t0
        stats = {}
        try:
            stats = ray.get(handle.stats.remote(), timeout=30).as_flat_dict()
        except Exception as exc:  # reported, not raised: the drill's numbers still come back
            logger.warning("cache stats unavailable after the drill: %r", exc)
        algo.stop()
        kill_cache(cache_name, DEFAULT_NAMESPACE)
    episodes += report.episodes
    out.update(
        finished=finished,
        env_steps=steps,
        wall_s=wall,
        decisions=report.decisions,
        decisions_raised=raised,
        fallback_decisions_runner=report.actor_failures,
        fallback_decisions_cache=int(
            stats.get("fallbacks_stale", 0) + stats.get("fallbacks_uniform", 0)
        ),
        lm_failures=int(stats.get("lm_failures", 0)),
        lm_timeouts=int(stats.get("lm_timeouts", 0)),
        lm_queries=int(stats.get("lm_queries", 0)),
        actor_restarts=int(stats.get("actor_restarts", 0)),
        entries_final=int(stats.get("size", 0)),
        episodes=len(episodes),
        train_success=float(np.mean([e["success"] for e in episodes])) if episodes else None,
    )
    return out


def _inject(drill: FaultDrill, handle, snap: Path, prior_app: str) -> dict[str, Any]:
    """Kill the drill's part and wait until it is back; what was there before and after."""
    import ray

    before = ray.get(handle.stats.remote()).as_flat_dict()
    rec: dict[str, Any] = {
        "kills": 1,
        "entries_before_kill": int(before["size"]),
        "params_before_kill": _params(before),
        "lm_queries_before_kill": int(before["lm_queries"]),
    }
    if drill.fault == "cache_actor":
        _wait(
            lambda: snapshot_summary(snap) is not None, 3 * drill.snapshot_interval_s, "a snapshot"
        )
        ray.kill(handle, no_restart=False)  # as a crash: Ray restarts the actor
        # the dead actor writes nothing more: the latest snapshot is the one the new one restores
        rec["snapshot"] = snapshot_summary(snap)

        def restored() -> bool:
            s = ray.get(handle.stats.remote(), timeout=5)
            rec["after_restart"] = s.as_flat_dict()
            return bool(s.actor_restarts)

        rec["recovery_s"] = _wait(restored, drill.recovery_timeout_s, "the cache actor")
        after = rec.pop("after_restart")
        rec["entries_restored"] = int(after["restored_entries"])
        rec["entries_after_restart"] = int(after["size"])
        rec["params_after_restart"] = _params(after)
    else:
        rec["killed_replica"] = kill_serve_replica(prior_app)
        old = rec["killed_replica"]
        rec["recovery_s"] = _wait(
            lambda: any(r["actor_id"] != old for r in _serve_replicas(prior_app)),
            drill.recovery_timeout_s,
            "the Serve replica",
        )
    return rec
