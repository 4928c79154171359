"""Scaling rollouts on one node: what sharing one cache actor buys, and when one actor saturates.

Two measurements, in one run, with real parts (the env's generated games, the embedded prior
behind a real Serve deployment, real cache actors, RLlib's PS-DQN loop):

1. **Rollouts.** For 1, 2, 4 and 8 env runners (fractional CPUs, ``1/N`` each, oversubscribed
   on a small machine: steps/s here measure contention, the point is hit rate and LM queries),
   ``--method`` (default ``adaptive``) trains for ``--steps-per-runner`` env steps per runner,
   every runner drawing episodes from the same games with its own RNG stream (RLlib's
   ``worker_index``), with
   (a) ``shared``: one cache actor for all runners, capacity ``N x --capacity``, and
   (b) ``isolated``: one cache actor per runner (created by the runner), ``--capacity`` each.
   Reported per (N, mode): hit rate (all reuse over all decisions, summed over the mode's
   caches), LM queries per 1000 env steps, env steps/s, the Serve batch sizes actually formed
   (mean, p50, max, share of requests scored in a batch of 2+), and the env runners' actor call
   latency p50/p99 (one round trip, encoding excluded).
2. **Cache saturation, one actor against shards.** For a cache of each ``--shards`` count (no
   meta-optimiser, no refresh, so no LM call once warm), 16, 64 and 256 concurrent synthetic
   callers (asyncio tasks spread over ``--caller-procs`` Ray actors) call ``get_priors`` with
   one state each, routed to the shard that owns its key, for ``--saturation-s`` seconds:
   calls/s, call latency p50/p99 and what served the calls, under two loads: ``exact`` (an
   ``exact_only`` cache, pre-warmed: every call an exact hit) and ``semantic`` (a ``static``
   cache, ``cos >= tau``, asked for near variants of the warmed states: every call a semantic
   search, fanned out to the other shards).

Usage:
    python experiments/bench_scaling.py --json results/bench_scaling.json
    python experiments/bench_scaling.py --runners 1,2 --steps-per-runner 200 --callers 16

Ray and library noise go to ``<json dir>/bench_scaling.log``. See docs/cluster.md.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from cachellm_rl.argparsing import ArgumentParser, user_error
from cachellm_rl.envs.registry import TEXT_ENVS

MODES = ("shared", "isolated")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--env", choices=TEXT_ENVS, default="textworld")
    p.add_argument("--method", default="adaptive", help="a cached method (adaptive, static, lru)")
    p.add_argument("--runners", type=_ints, default=[1, 2, 4, 8], help="env-runner counts")
    p.add_argument("--steps-per-runner", type=int, default=400, help="env steps per runner")
    p.add_argument("--capacity", type=int, default=256, help="cache entries per runner")
    p.add_argument("--split", default="train", help="games the runners play")
    p.add_argument("--num-games", type=int, default=20, help="games of the split (0 = all)")
    p.add_argument("--callers", type=_ints, default=[16, 64, 256], help="concurrent callers")
    p.add_argument("--caller-procs", type=int, default=4, help="processes the callers share")
    p.add_argument("--saturation-s", type=float, default=10.0, help="seconds per load level")
    p.add_argument("--shards", type=_ints, default=[1, 2], help="cache shards in saturation")
    p.add_argument(
        "--loads",
        default="exact,semantic",
        type=lambda t: [x for x in t.split(",") if x],
        help="saturation loads: exact (exact hits), semantic (semantic hits)",
    )
    p.add_argument("--skip-rollouts", action="store_true")
    p.add_argument("--skip-saturation", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--json", type=Path, default=Path("results/bench_scaling.json"))
    p.add_argument("-v", "--verbose", action="store_true", help="library logs on the terminal")
    args = p.parse_args(argv)
    if args.method not in ("adaptive", "static", "lru", "exact_only"):
        p.error(f"--method must be a cached method, got {args.method!r}")
    if not args.runners or min(args.runners) < 1:
        p.error("--runners needs counts >= 1")
    if args.steps_per_runner < 1 or args.capacity < 1:
        p.error("--steps-per-runner and --capacity must be >= 1")
    if not args.callers or min(args.callers) < 1 or args.caller_procs < 1:
        p.error("--callers and --caller-procs need counts >= 1")
    if not args.shards or min(args.shards) < 1:
        p.error("--shards needs counts >= 1")
    bad = [x for x in args.loads if x not in ("exact", "semantic")]
    if bad or not args.loads:
        p.error(f"--loads takes exact and/or semantic, got {args.loads}")
    return args


# --------------------------------------------------------------------------- pure summaries


def combine_cache_stats(stats: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Counters of several caches summed; the hit rate recomputed from the sums (reuse of any
    kind over decisions), not averaged.

    Example:
        >>> combine_cache_stats([{"decisions": 10, "lm_queries": 2, "hits": 8},
        ...                      {"decisions": 30, "lm_queries": 18, "hits": 12}])["hit_rate"]
        0.5
    """
    keys = ("decisions", "lm_queries", "hits_exact", "hits_semantic", "misses")
    out = {k: float(sum(float(s.get(k, 0) or 0) for s in stats)) for k in keys}
    out["hits"] = float(
        sum(s.get("hits", s.get("hits_exact", 0) + s.get("hits_semantic", 0)) for s in stats)
    )
    out["hit_rate"] = out["hits"] / out["decisions"] if out["decisions"] else float("nan")
    out["caches"] = float(len(stats))
    return out


def batch_size_summary(sizes: Sequence[int]) -> dict[str, float]:
    """The Serve batches formed: count, mean, p50, max and the share of requests scored in a
    batch of two or more.

    Example:
        >>> batch_size_summary([1, 1, 2, 4])["batched_request_share"]
        0.75
    """
    if not sizes:
        return {"batches": 0.0, "mean": float("nan"), "p50": float("nan"), "max": float("nan"),
                "batched_request_share": float("nan")}  # fmt: skip
    a = np.asarray(sizes, float)
    return {
        "batches": float(len(a)),
        "mean": float(a.mean()),
        "p50": float(np.median(a)),
        "max": float(a.max()),
        "batched_request_share": float(a[a >= 2].sum() / a.sum()),
    }


def sharing_ratios(rows: Sequence[Mapping]) -> list[dict]:
    """Per runner count: shared / isolated hit rate and LM queries per env step.

    Example:
        >>> rows = [{"runners": 8, "mode": "shared", "hit_rate": 0.6, "lm_per_1k_steps": 300},
        ...         {"runners": 8, "mode": "isolated", "hit_rate": 0.4, "lm_per_1k_steps": 600}]
        >>> sharing_ratios(rows)
        [{'runners': 8, 'hit_rate_ratio': 1.5, 'lm_queries_ratio': 0.5}]
    """
    by = {(r["runners"], r["mode"]): r for r in rows}
    out = []
    for n in sorted({r["runners"] for r in rows}):
        sh, iso = by.get((n, "shared")), by.get((n, "isolated"))
        if sh is None or iso is None:
            continue
        out.append(
            {
                "runners": n,
                "hit_rate_ratio": round(sh["hit_rate"] / iso["hit_rate"], 4)
                if iso["hit_rate"]
                else float("inf"),
                "lm_queries_ratio": round(sh["lm_per_1k_steps"] / iso["lm_per_1k_steps"], 4)
                if iso["lm_per_1k_steps"]
                else float("nan"),
            }
        )
    return out


def latency_summary(ms: Sequence[float]) -> dict[str, float]:
    """p50/p99/mean of latencies in ms (NaN when empty)."""
    if not len(ms):
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "mean_ms": float("nan")}
    a = np.asarray(ms, float)
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
    }


# --------------------------------------------------------------------------- Ray shell


def _serve_batch_sizes() -> list[int]:
    from ray import serve

    from cachellm_rl.contracts import DEFAULT_PRIOR_APP

    return list(serve.get_app_handle(DEFAULT_PRIOR_APP).batch_sizes.remote().result())


def _named_caches(prefix: str, namespace: str) -> list[str]:
    import ray

    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == namespace and a["name"].startswith(prefix)
    )


def measure_rollouts(n: int, mode: str, cfg, games: list[str], args) -> dict:
    """Train ``args.method`` with ``n`` env runners on a shared cache or isolated caches."""
    import ray

    from cachellm_rl.algorithms.ps_dqn.methods import (
        algo_config_for,
        cache_config_for,
        collect_reports,
        start_cache,
    )
    from cachellm_rl.algorithms.ps_dqn.suite import env_config_for
    from cachellm_rl.cache.actor import DEFAULT_NAMESPACE, kill_cache
    from cachellm_rl.envs.registry import env_class

    capacity = args.capacity * (n if mode == "shared" else 1)
    s = replace(
        cfg.settings,
        num_cpus_per_env_runner=round(1.0 / n, 4),
        capacity_entries=capacity,
        adaptive_initial_capacity=capacity,
    )
    name = f"scale-{mode}-{n}"
    total = args.steps_per_runner * n
    handle = (
        start_cache(args.method, s, name, DEFAULT_NAMESPACE, env=cfg.env)
        if mode == "shared"
        else None
    )
    algo_cfg = algo_config_for(
        args.method,
        s,
        env_class=env_class(cfg.env),
        env_config=env_config_for(cfg, games, args.seed),
        cache_name=name,
        num_env_runners=n,
        total_env_steps=total,
        seed=args.seed,
    )
    if mode == "isolated":
        own = cache_config_for(args.method, s, env=cfg.env)
        algo_cfg = algo_cfg.prior(replace(algo_cfg.prior_connector, own_cache=own))
    sizes0 = len(_serve_batch_sizes())
    algo = algo_cfg.build_algo()
    try:
        steps, t0 = 0, time.perf_counter()
        while steps < total:
            steps = int(algo.train()["env_runners"]["num_env_steps_sampled_lifetime"])
        wall = time.perf_counter() - t0
        report = collect_reports(algo)  # each runner's counters and latencies since it started
        # isolated caches belong to their runners: read them before the runners stop
        names = [name] if mode == "shared" else _named_caches(name + "-", DEFAULT_NAMESPACE)
        stats = [
            ray.get(ray.get_actor(x, namespace=DEFAULT_NAMESPACE).stats.remote()).as_flat_dict()
            for x in names
        ]
    finally:
        algo.stop()
        kill_cache(name, DEFAULT_NAMESPACE)
        del handle
    sizes = _serve_batch_sizes()[sizes0:]
    c = combine_cache_stats(stats)
    calls = report.latency_call
    return {
        "runners": n,
        "mode": mode,
        "caches": len(stats),
        "capacity_per_cache": capacity,
        "env_steps": steps,
        "wall_s": wall,
        "env_steps_per_s": steps / wall,
        "decisions": c["decisions"],
        "hit_rate": c["hit_rate"],
        "hits_exact": c["hits_exact"],
        "hits_semantic": c["hits_semantic"],
        "lm_queries": c["lm_queries"],
        "lm_per_1k_steps": 1e3 * c["lm_queries"] / max(steps, 1),
        "serve_batches": batch_size_summary(sizes),
        "actor_call_p50_ms": calls.quantile(0.5),
        "actor_call_p99_ms": calls.quantile(0.99),
        "actor_calls": calls.total,
    }


def saturation_states(n: int) -> list:
    """``n`` distinct text states shaped like a text game's."""
    from cachellm_rl.cache.client import TextState

    return [
        TextState(
            observation=f"You are in room {i}. There is a box {i % 7} and a door to the "
            f"{('north', 'south', 'east', 'west')[i % 4]}.",
            candidates=("go north", "go south", f"open box {i % 7}", "take key", "look"),
            objective="Find the key and open the door.",
            inventory="You carry nothing.",
        )
        for i in range(n)
    ]


class Caller:
    """A process of synthetic callers: ``k`` asyncio tasks calling a cache's actors, each state
    sent to the shard that owns its exact key (as :class:`PriorCacheClient` routes)."""

    def __init__(self, cache_name: str, namespace: str, queries: list, num_shards: int) -> None:
        import ray

        from cachellm_rl.cache.sharding import shard_name, shard_of

        self.shards = [
            ray.get_actor(shard_name(cache_name, i), namespace=namespace) for i in range(num_shards)
        ]
        self.owner = [shard_of(q.exact_key, num_shards) for q in queries]
        self.queries = queries

    async def run(self, k: int, seconds: float, seed: int) -> tuple[list[float], dict[str, int]]:
        rng = np.random.default_rng(seed)
        deadline = time.perf_counter() + seconds
        lat: list[float] = []
        sources: dict[str, int] = {}

        async def one(j: int) -> None:
            i = int(rng.integers(len(self.queries)))
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                shard = self.shards[self.owner[i]]
                (res,) = await shard.get_priors.remote([self.queries[i]], 10_000 + j)
                lat.append(1e3 * (time.perf_counter() - t))
                sources[res.source.value] = sources.get(res.source.value, 0) + 1
                i = (i + 1) % len(self.queries)

        await asyncio.gather(*[one(j) for j in range(k)])
        return lat, sources


def near_variant(state):
    """The same state with its last full stop turned into an exclamation mark: another exact
    key, an embedding at cosine about 0.99 (a semantic hit under the ``tau`` rule)."""
    from dataclasses import replace as dc_replace

    return dc_replace(state, observation=state.observation[:-1] + "!")


def measure_saturation(cfg, args, say) -> list[dict]:
    """Calls/s and latency of a cache of 1, 2, ... shards under 16/64/256 concurrent callers,
    for exact hits (the states themselves) and semantic hits (near variants: every call a
    semantic search, fanned out to the other shards when sharded)."""
    import ray

    from cachellm_rl.algorithms.ps_dqn.methods import start_cache
    from cachellm_rl.cache.actor import DEFAULT_NAMESPACE, kill_cache
    from cachellm_rl.cache.client import PriorCacheClient
    from cachellm_rl.cache.encoders import TextStateEncoder

    encoder = TextStateEncoder()
    states = saturation_states(256)
    rows = []
    for shards in args.shards:
        for load in args.loads:
            name = f"scale-saturation-{shards}-{load}"
            # no meta-optimiser, no refresh: the actor's own work. exact: the exact tier
            # alone (every warmed state is its own entry); semantic: cos >= tau
            s = replace(
                cfg.settings,
                capacity_entries=4096,
                refresh_probability=0.0,
                audit_probability=0.0,
                cache_shards=shards,
            )
            method = "exact_only" if load == "exact" else "static"
            handle = start_cache(method, s, name, DEFAULT_NAMESPACE, env=cfg.env)
            client = PriorCacheClient(encoder, cache_name=name, namespace=DEFAULT_NAMESPACE)
            for i in range(0, len(states), 32):  # warm: the states' priors in the cache
                client.get_priors(states[i : i + 32])
            sent = states if load == "exact" else [near_variant(x) for x in states]
            queries = client.build_queries(sent)
            before = ray.get(handle.stats.remote()).as_flat_dict()
            remote = ray.remote(num_cpus=0, max_concurrency=1000)(Caller)
            procs = [
                remote.remote(name, DEFAULT_NAMESPACE, queries, shards)
                for _ in range(args.caller_procs)
            ]
            try:
                for total in args.callers:
                    row = _load_level(procs, total, args.saturation_s)
                    row.update(shards=shards, load=load, method=method)
                    rows.append(row)
                    say(
                        f"  {shards} shard(s) {load:8s} {total:4d} callers: "
                        f"{row['calls_per_s']:7.0f} calls/s, p50 {row['p50_ms']:.1f} ms, "
                        f"p99 {row['p99_ms']:.1f} ms, served {row['sources']}"
                    )
                after = ray.get(handle.stats.remote()).as_flat_dict()
                for r in rows[-len(args.callers) :]:
                    r["lm_queries_during_load"] = int(after["lm_queries"] - before["lm_queries"])
            finally:
                for p in procs:
                    ray.kill(p)
                kill_cache(name, DEFAULT_NAMESPACE)
                del handle
    return rows


def _load_level(procs, total: int, seconds: float) -> dict:
    import ray

    per = [total // len(procs) + (1 if i < total % len(procs) else 0) for i in range(len(procs))]
    t0 = time.perf_counter()
    parts = ray.get(
        [
            p.run.remote(k, seconds, 7 + i)
            for i, (p, k) in enumerate(zip(procs, per, strict=True))
            if k
        ]
    )
    wall = time.perf_counter() - t0
    flat = [x for lat, _ in parts for x in lat]
    sources: dict[str, int] = {}
    for _, src in parts:
        for key, n in src.items():
            sources[key] = sources.get(key, 0) + n
    return {
        "callers": total,
        "calls": len(flat),
        "calls_per_s": len(flat) / wall,
        "sources": sources,
        **latency_summary(flat),
    }


def main(argv: list[str] | None = None) -> dict | int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    from cachellm_rl.logs import run_log

    log_path = args.json.with_name("bench_scaling.log")
    with run_log(log_path, verbose=args.verbose) as console:
        try:
            return run(args, log_path, console)
        except ValueError as e:
            return user_error("bench_scaling.py", str(e))


def run(args: argparse.Namespace, log_path: Path, console) -> dict:
    from cachellm_rl.algorithms.ps_dqn.suite import ensure_inputs, preset, suite_games

    cfg = preset("quick", env=args.env, split=args.split, num_games=args.num_games, progress=False)
    say = functools.partial(print, file=console, flush=True)
    ensure_inputs(cfg, progress=False, console=console)
    games = suite_games(cfg)
    out: dict = {
        "env": args.env,
        "method": args.method,
        "split": args.split,
        "games": len(games),
        "steps_per_runner": args.steps_per_runner,
        "capacity_per_runner": args.capacity,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "protocol": (
            f"{args.method} (quick preset) on {len(games)} {args.env} `{args.split}` games, "
            f"{args.steps_per_runner} env steps per runner, seed {args.seed}; every runner its "
            "own RLlib worker_index game stream; shared: one cache of N x capacity, isolated: "
            "one cache of capacity per runner"
        ),
    }
    say(f"{args.env}: {len(games)} {args.split} games, {args.method}; log -> {log_path}")

    from cachellm_rl.config import init_ray
    from cachellm_rl.prior.scoring import ScorerConfig
    from cachellm_rl.prior.server import PriorServerConfig, deploy_prior_server

    init_ray(num_cpus=args.num_cpus, log_to_driver=args.verbose)
    deploy_prior_server(
        PriorServerConfig(
            scorer=ScorerConfig(
                model_dir=str(cfg.prior_model), prior_temperature=cfg.prior_temperature
            ),
            num_cpus=0,
        )
    )
    rows: list[dict] = []
    if not args.skip_rollouts:
        say(
            "rollouts: runners, mode, hit rate, LM queries / 1k steps, steps/s, "
            "Serve batch mean, actor call p50/p99"
        )
        for n in args.runners:
            for mode in MODES:
                r = measure_rollouts(n, mode, cfg, games, args)
                rows.append(r)
                say(
                    f"  {n} {mode:8s} hit {r['hit_rate']:.3f}  LM/1k {r['lm_per_1k_steps']:6.1f}  "
                    f"{r['env_steps_per_s']:5.1f} steps/s  batch {r['serve_batches']['mean']:.2f}  "
                    f"call {r['actor_call_p50_ms']:.1f}/{r['actor_call_p99_ms']:.1f} ms"
                )
                _write(args.json, {**out, "rollouts": rows})
        out["rollouts"] = rows
        out["sharing"] = sharing_ratios(rows)
        for r in out["sharing"]:
            say(
                f"  {r['runners']} runners: shared/isolated hit rate x{r['hit_rate_ratio']:.2f}, "
                f"LM queries x{r['lm_queries_ratio']:.2f}"
            )
    if not args.skip_saturation:
        say("cache saturation (static cache, no LM; exact hits, then semantic hits):")
        out["saturation"] = measure_saturation(cfg, args, say)
    _write(args.json, out)
    say(f"-> {args.json}")
    return out


def _write(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1, default=float) + "\n")


if __name__ == "__main__":
    res = main()
    sys.exit(res if isinstance(res, int) else 0)
