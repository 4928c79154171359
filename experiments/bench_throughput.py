"""Throughput of RL on a text env: where one RL iteration's time goes, and env steps/s per method.

Measured in one run, on this machine, with real parts (the env's generated games, the embedded
prior behind a real Serve deployment, the shared cache actor, RLlib's DQN loop):

1. ``raw_engine``: the game engine itself (TextWorld's ``textworld.start`` asked for the infos the
   wrapped env asks for), random admissible commands. TextWorld only.
2. ``env_only``: the wrapped env (:class:`~cachellm_rl.envs.textworld_env.TextWorldEnv` etc.,
   the fixed-size observation included), random admissible actions.
3. Each RL method (``no_prior``, ``uncached``, ``adaptive`` by default) at the preset's replay
   ratio, batch size and env-runner layout, in steady state: the clock starts after learning has
   started and ``--warmup-steps`` env steps, and runs for ``--measure-steps`` env steps.

The breakdown (ms per env step) is read from timers installed by this script. In the env
runners (summed over runners, which work in parallel): env step, module forward, prior
connector (cache actor call, state encoding, its own work); inside the Serve deployment: LM
scoring. In the driver (adding up to the wall time): waiting for samples, replay buffer,
learner update, weight sync, and what is left (RLlib's own bookkeeping).

Usage:
    python experiments/bench_throughput.py --json results/bench_throughput.json
    python experiments/bench_throughput.py --env babyai --methods no_prior,uncached

Environment: Ray noise goes to ``<json dir>/bench_throughput.log``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from cachellm_rl.argparsing import ArgumentParser
from cachellm_rl.envs.registry import TEXT_ENVS

DEFAULT_METHODS = ("no_prior", "uncached", "adaptive")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--env", choices=TEXT_ENVS, default="textworld")
    p.add_argument("--preset", default="full", help="suite preset whose settings are measured")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--split", default="test", help="games the agents play")
    p.add_argument("--num-games", type=int, default=0, help="games of the split (0 = all)")
    p.add_argument("--games", type=Path, default=None, help="game suite (default: the env's)")
    p.add_argument("--prior-model", type=Path, default=None, help="prior (default: the env's)")
    p.add_argument("--env-only-steps", type=int, default=600, help="per round")
    p.add_argument("--env-rounds", type=int, default=3, help="alternating engine/env rounds")
    p.add_argument("--warmup-steps", type=int, default=1000, help="after learning starts")
    p.add_argument("--measure-steps", type=int, default=2000)
    p.add_argument("--num-env-runners", type=int, default=None, help="default: the preset's")
    p.add_argument("--encoder", default=None, help="Q-network encoder (default: the preset's)")
    p.add_argument(
        "--prior-replicas",
        type=int,
        default=1,
        help="Serve replicas of the prior (with more than one, Serve scoring time is not read; "
        "the CPU lines still sum every replica)",
    )
    p.add_argument(
        "--overlap-sampling",
        action="store_true",
        help="the learner updates while the env runners sample (default: the preset's)",
    )
    p.add_argument(
        "--state-encoder",
        default=None,
        help="learned state-encoder folder for adaptive's cache (default: MiniLM)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path("results/bench_throughput.json"))
    p.add_argument("-v", "--verbose", action="store_true", help="library logs on the terminal")
    args = p.parse_args(argv)
    args.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.prior_replicas < 1:
        p.error(f"--prior-replicas must be >= 1, got {args.prior_replicas}")
    return args


# -- env only ---------------------------------------------------------------------------------
def _textworld_infos():
    import textworld

    return textworld.EnvInfos(
        admissible_commands=True,
        policy_commands=False,
        objective=True,
        inventory=True,
        description=True,
        won=True,
        lost=True,
        score=True,
        max_score=True,
    )


def raw_engine_steps_per_s(games: list[str], steps: int, max_episode_steps: int, seed: int):
    """TextWorld's engine alone: random admissible commands (minus the dropped verbs, as the
    wrapped env offers them), episodes cut at ``max_episode_steps``."""
    import textworld

    from cachellm_rl.envs.game_env import kept_candidates
    from cachellm_rl.envs.textworld_env import TextWorldEnvConfig

    drop = TextWorldEnvConfig(games=(games[0],)).drop_verbs
    rng = np.random.default_rng(seed)
    envs = {g: textworld.start(g, request_infos=_textworld_infos()) for g in games}
    done_steps, g = 0, 0
    t0 = time.perf_counter()
    while done_steps < steps:
        env = envs[games[g % len(games)]]
        g += 1
        gs = env.reset()
        for _ in range(max_episode_steps):
            cands = kept_candidates(gs.admissible_commands or [], drop)
            gs, _, done = env.step(cands[int(rng.integers(len(cands)))])
            done_steps += 1
            if done or gs.won or gs.lost:
                break
    wall = time.perf_counter() - t0
    for env in envs.values():
        env.close()
    return done_steps / wall


def env_only_steps_per_s(env_id: str, env_config: dict, steps: int, seed: int):
    """The wrapped env: random admissible actions, the env's own episode limit."""
    from cachellm_rl.envs.registry import make_text_env
    from cachellm_rl.envs.text_env import INFO_CANDIDATES

    env = make_text_env(env_id, env_config)
    rng = np.random.default_rng(seed)
    # Open every game once before timing (the RL runs keep games open too).
    for game in env_config["games"]:
        env.reset(options={"game": game})
    done_steps = 0
    t0 = time.perf_counter()
    _, info = env.reset(seed=seed)
    while done_steps < steps:
        a = int(rng.integers(len(info[INFO_CANDIDATES])))
        _, _, term, trunc, info = env.step(a)
        done_steps += 1
        if term or trunc:
            _, info = env.reset()
    wall = time.perf_counter() - t0
    env.close()
    return done_steps / wall


# -- timers installed in the env runners and the driver ---------------------------------------
def install_runner_timers(runner) -> bool:
    """Wrap the runner's vector env ``step`` and module forward with cumulative timers."""
    if getattr(runner, "_bench_timers", None) is not None:
        return True
    env = runner.env
    if env is None:  # the driver's local runner does not sample when remote runners exist
        return False
    timers = {"env_step_s": 0.0, "module_s": 0.0}
    runner._bench_timers = timers
    step = env.step

    def timed_step(actions):
        t0 = time.perf_counter()
        out = step(actions)
        timers["env_step_s"] += time.perf_counter() - t0
        return out

    env.step = timed_step
    module = runner.module
    forward = module.forward_exploration

    def timed_forward(*a, **k):
        t0 = time.perf_counter()
        out = forward(*a, **k)
        timers["module_s"] += time.perf_counter() - t0
        return out

    module.forward_exploration = timed_forward
    return True


def read_runner_timers(runner) -> dict:
    from cachellm_rl.algorithms.ps_dqn.connectors import find_prior_connector

    out = dict(getattr(runner, "_bench_timers", {}) or {})
    conn = find_prior_connector(runner)
    if conn is not None:
        rep = conn.report
        out.update(
            connector_s=rep.connector_s,
            actor_call_s=rep.actor_call_s,
            encode_s=rep.encode_s,
            decisions=rep.decisions,
            hits=rep.hits,
        )
    return out


class DriverTimers:
    """Cumulative timers around the DQN loop's parts in the driver process."""

    def __init__(self, algo) -> None:
        import ray.rllib.algorithms.dqn.dqn as dqn_mod

        self.t = {"sample_s": 0.0, "replay_s": 0.0, "learner_s": 0.0, "sync_s": 0.0}
        self.updates = 0
        self._dqn_mod = dqn_mod
        self._orig_sample = dqn_mod.synchronous_parallel_sample
        dqn_mod.synchronous_parallel_sample = self._wrap(self._orig_sample, "sample_s")
        rb = algo.local_replay_buffer
        rb.add = self._wrap(rb.add, "replay_s")
        rb.sample = self._wrap(rb.sample, "replay_s")
        lg = algo.learner_group
        lg.update = self._wrap(lg.update, "learner_s", count=True)
        erg = algo.env_runner_group
        erg.sync_weights = self._wrap(erg.sync_weights, "sync_s")
        # With overlap_sampling the driver waits for samples here instead.
        erg.fetch_ready_async_reqs = self._wrap(erg.fetch_ready_async_reqs, "sample_s")

    def _wrap(self, fn, key: str, count: bool = False):
        def wrapped(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            self.t[key] += time.perf_counter() - t0
            if count:
                self.updates += 1
            return out

        return wrapped

    def close(self) -> None:
        self._dqn_mod.synchronous_parallel_sample = self._orig_sample


def _runner_totals(algo) -> dict:
    totals: dict[str, float] = {}
    for d in algo.env_runner_group.foreach_env_runner(read_runner_timers):
        for k, v in d.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return totals


def _server_timings() -> dict:
    from ray import serve

    from cachellm_rl.contracts import DEFAULT_PRIOR_APP

    return serve.get_app_handle(DEFAULT_PRIOR_APP).timings.remote().result()


# -- CPU time by process role ------------------------------------------------------------------
CPU_ROLES = (
    ("ServeReplica", "Serve replica (LM scoring)"),
    ("SharedPriorCache", "cache actor"),
    ("EnvRunner", "env runners"),
    ("ServeController", "Serve controller"),
    ("raylet", "Ray system (raylet, GCS, agents)"),
    ("gcs_server", "Ray system (raylet, GCS, agents)"),
    ("dashboard", "Ray system (raylet, GCS, agents)"),
    ("log_monitor", "Ray system (raylet, GCS, agents)"),
    ("runtime_env", "Ray system (raylet, GCS, agents)"),
    ("ray::", "other Ray workers"),
)


def _cpu_role(pid: int, cmdline: str) -> str:
    if pid == os.getpid():
        return "driver (RLlib loop, learner)"
    for needle, role in CPU_ROLES:
        if needle in cmdline:
            return role
    return "other processes (not this benchmark)"


def cpu_seconds_by_role() -> dict[str, float]:
    """User + system CPU seconds of every live process on the machine, summed by role (Linux
    ``/proc``; empty elsewhere). Diffing two snapshots says where the CPU went in between, and
    whether something outside the benchmark was using it."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out: dict[str, float] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return out
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process exited while we read it
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        cpu_s = (int(fields[11]) + int(fields[12])) / tick
        role = _cpu_role(int(d.name), cmd)
        out[role] = out.get(role, 0.0) + cpu_s
    return out


def cpu_ms_per_step(before: dict[str, float], after: dict[str, float], steps: int) -> dict:
    """CPU milliseconds per env step by role between two :func:`cpu_seconds_by_role` snapshots
    (processes that started in between count from 0; ones that exited are lost)."""
    return {
        k: 1e3 * max(after.get(k, 0.0) - before.get(k, 0.0), 0.0) / max(steps, 1)
        for k in sorted(set(after) | set(before))
    }


def measure_method(method: str, cfg, games: list[str], args) -> dict:
    """Build the method's algorithm, warm it up, then time ``args.measure_steps`` env steps."""
    import ray

    from cachellm_rl.algorithms.ps_dqn.methods import algo_config_for, start_cache
    from cachellm_rl.algorithms.ps_dqn.suite import env_config_for
    from cachellm_rl.cache.actor import DEFAULT_NAMESPACE, kill_cache
    from cachellm_rl.envs.registry import env_class

    s = cfg.settings
    name = f"bench-{method}"
    handle = start_cache(method, s, name, DEFAULT_NAMESPACE)
    total = args.warmup_steps + args.measure_steps + s.learning_starts
    algo = algo_config_for(
        method,
        s,
        env_class=env_class(cfg.env),
        env_config=env_config_for(cfg, games, args.seed),
        cache_name=name,
        num_env_runners=cfg.num_env_runners,
        total_env_steps=total,
        seed=args.seed,
    ).build_algo()
    try:
        algo.env_runner_group.foreach_env_runner(install_runner_timers)
        timers = DriverTimers(algo)
        steps = 0
        while steps < s.learning_starts + args.warmup_steps:
            steps = algo.train()["env_runners"]["num_env_steps_sampled_lifetime"]
        r0, d0, u0 = _runner_totals(algo), dict(timers.t), timers.updates
        read_server = method != "no_prior" and args.prior_replicas == 1
        srv0 = _server_timings() if read_server else {}
        cpu0 = cpu_seconds_by_role()
        steps0, t0 = steps, time.perf_counter()
        while steps < steps0 + args.measure_steps:
            steps = algo.train()["env_runners"]["num_env_steps_sampled_lifetime"]
        wall = time.perf_counter() - t0
        cpu1 = cpu_seconds_by_role()
        r1, d1, u1 = _runner_totals(algo), dict(timers.t), timers.updates
        srv1 = _server_timings() if read_server else {}
        timers.close()
    finally:
        algo.stop()
        stats = ray.get(handle.stats.remote()).as_flat_dict() if handle is not None else {}
        kill_cache(name, DEFAULT_NAMESPACE)
    n = steps - steps0
    updates = u1 - u0
    parts = {k: r1.get(k, 0.0) - r0.get(k, 0.0) for k in set(r1) | set(r0)}
    drv = {k: d1[k] - d0[k] for k in d1}
    score_s = srv1.get("score_s", 0.0) - srv0.get("score_s", 0.0)
    lm_requests = srv1.get("requests", 0.0) - srv0.get("requests", 0.0)
    lm_batches = srv1.get("batches", 0.0) - srv0.get("batches", 0.0)
    lm_candidates = srv1.get("candidates", 0.0) - srv0.get("candidates", 0.0)
    lm_chars = srv1.get("prompt_chars", 0.0) - srv0.get("prompt_chars", 0.0)
    env_s, module_s = parts.get("env_step_s", 0.0), parts.get("module_s", 0.0)
    conn_s = parts.get("connector_s", 0.0)
    actor_s, enc_s = parts.get("actor_call_s", 0.0), parts.get("encode_s", 0.0)
    # Env runners (summed over runners; with several they work in parallel, so their sum can
    # exceed the wall time) and the driver's own loop (its parts add up to the wall time).
    breakdown_s = {
        "runner: env step": env_s,
        "runner: module forward (acting)": module_s,
        "runner: cache actor call": actor_s,
        "runner: state encoding": enc_s,
        "runner: connector's own work": max(conn_s - actor_s - enc_s, 0.0),
        "driver: waiting for samples": drv["sample_s"],
        "driver: replay buffer add + sample": drv["replay_s"],
        "driver: learner update": drv["learner_s"],
        "driver: weight sync": drv["sync_s"],
    }
    driver_known = drv["sample_s"] + drv["replay_s"] + drv["learner_s"] + drv["sync_s"]
    breakdown_s["driver: RLlib and other"] = max(wall - driver_known, 0.0)
    decisions = parts.get("decisions", 0.0)
    cpu = cpu_ms_per_step(cpu0, cpu1, n)
    ncpu = os.cpu_count() or 1
    return {
        "method": method,
        "env_steps": n,
        "wall_s": wall,
        "steps_per_s": n / wall,
        "updates": updates,
        "updates_per_s": updates / wall,
        "replay_ratio": updates * s.train_batch_size / max(n, 1),
        "breakdown_ms_per_step": {k: 1e3 * v / max(n, 1) for k, v in breakdown_s.items()},
        "serve_scoring_ms_per_step": 1e3 * score_s / max(n, 1),
        "cpu_ms_per_step": cpu,
        # Share of the machine's CPU time the benchmark's processes used while measured.
        "cpu_busy": sum(v for k, v in cpu.items() if not k.startswith("other processes"))
        * n
        / 1e3
        / (wall * ncpu),
        "lm_requests": lm_requests,
        "lm_batches": lm_batches,
        "lm_candidates_per_request": lm_candidates / lm_requests if lm_requests else None,
        "lm_prompt_chars_per_request": lm_chars / lm_requests if lm_requests else None,
        "hit_rate_measured": parts.get("hits", 0.0) / decisions if decisions else None,
        "cache_lm_queries": stats.get("lm_queries"),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    from cachellm_rl.logs import run_log

    log_path = args.json.with_name("bench_throughput.log")
    with run_log(log_path, verbose=args.verbose) as console:
        return run(args, log_path, console)


def run(args: argparse.Namespace, log_path: Path, console) -> dict:
    from dataclasses import replace

    from cachellm_rl.algorithms.ps_dqn.suite import env_config_for, preset, suite_games

    cfg = preset(
        args.preset,
        env=args.env,
        split=args.split,
        num_games=args.num_games,
        games_dir=str(args.games) if args.games else None,
        prior_model=str(args.prior_model) if args.prior_model else None,
        num_env_runners=args.num_env_runners,
        progress=False,
    )
    if args.encoder:
        cfg = replace(cfg, settings=replace(cfg.settings, encoder=args.encoder))
    if args.overlap_sampling:
        cfg = replace(cfg, settings=replace(cfg.settings, overlap_sampling=True))
    if args.state_encoder:
        if not (Path(args.state_encoder) / "decision_encoder.json").is_file():
            raise SystemExit(
                f"error: --state-encoder {args.state_encoder} holds no learned encoder"
            )
        enc_dir = str(Path(args.state_encoder).resolve())
        cfg = replace(cfg, settings=replace(cfg.settings, state_encoder_dir=enc_dir))
    games = suite_games(cfg)
    env_cfg = env_config_for(cfg, games, args.seed)
    out: dict = {
        "env": args.env,
        "preset": args.preset,
        "games": len(games),
        "num_env_runners": cfg.num_env_runners,
        "num_envs_per_env_runner": cfg.settings.num_envs_per_env_runner,
        "rollout_fragment_length": cfg.settings.rollout_fragment_length,
        "train_batch_size": cfg.settings.train_batch_size,
        "training_intensity": cfg.settings.training_intensity,
        "encoder": cfg.settings.encoder,
        "overlap_sampling": cfg.settings.overlap_sampling,
        "prior_replicas": args.prior_replicas,
        "state_encoder": cfg.settings.state_encoder_dir or "minilm",
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    }
    say = functools.partial(print, file=console, flush=True)
    say(f"{args.env}: {len(games)} {args.split} games; log -> {log_path}")
    # Engine and wrapped env in alternating rounds (the machine's load drifts; medians).
    raw, wrapped = [], []
    for r in range(args.env_rounds):
        if args.env == "textworld":
            raw.append(
                raw_engine_steps_per_s(games, args.env_only_steps, cfg.steps_cap, args.seed + r)
            )
        wrapped.append(env_only_steps_per_s(args.env, env_cfg, args.env_only_steps, args.seed + r))
    if raw:
        out["raw_engine_steps_per_s"] = float(np.median(raw))
        out["raw_engine_rounds"] = raw
        say(f"raw engine      {out['raw_engine_steps_per_s']:7.1f} steps/s  (rounds {raw})")
    say(f"wrapped env     {float(np.median(wrapped)):7.1f} steps/s  (rounds {wrapped})")

    import ray
    from ray import serve

    from cachellm_rl.config import init_ray
    from cachellm_rl.prior.scoring import ScorerConfig
    from cachellm_rl.prior.server import PriorServerConfig, deploy_prior_server

    init_ray(num_cpus=2, log_to_driver=args.verbose)
    rows = []
    try:
        if any(m != "no_prior" for m in args.methods):
            deploy_prior_server(
                PriorServerConfig(
                    scorer=ScorerConfig(
                        model_dir=str(cfg.prior_model), prior_temperature=cfg.prior_temperature
                    ),
                    num_cpus=0,
                    num_replicas=args.prior_replicas,
                )
            )
        for m in args.methods:
            row = measure_method(m, cfg, games, args)
            rows.append(row)
            say(
                f"{m:15s} {row['steps_per_s']:7.1f} steps/s  {row['updates_per_s']:5.1f} "
                f"updates/s  replay ratio {row['replay_ratio']:.2f}"
            )
    finally:
        serve.shutdown()
        ray.shutdown()
    # Once more after the RL runs; the reference is the median of every wrapped-env round.
    wrapped.append(env_only_steps_per_s(args.env, env_cfg, args.env_only_steps, args.seed + 99))
    env_sps = float(np.median(wrapped))
    out["env_only_steps_per_s"] = env_sps
    out["env_only_rounds"] = wrapped
    if raw:
        out["env_vs_raw_engine"] = float(np.median(wrapped[: len(raw)])) / float(np.median(raw))
    for row in rows:
        m = row["method"]
        out[f"{m}_steps_per_s"] = row["steps_per_s"]
        out[f"{m}_vs_env_only"] = row["steps_per_s"] / env_sps
        out[f"{m}_updates_per_s"] = row["updates_per_s"]
        out[f"{m}_replay_ratio"] = row["replay_ratio"]
        for k, v in row["breakdown_ms_per_step"].items():
            out[f"{m}_ms_per_step/{k}"] = v
        out[f"{m}_ms_per_step/serve scoring (inside the actor call)"] = row[
            "serve_scoring_ms_per_step"
        ]
        out[f"{m}_lm_requests_per_batch"] = (
            row["lm_requests"] / row["lm_batches"] if row["lm_batches"] else None
        )
        out[f"{m}_lm_requests_per_step"] = (
            row["lm_requests"] / row["env_steps"] if row["lm_batches"] else None
        )
        out[f"{m}_lm_candidates_per_request"] = row["lm_candidates_per_request"]
        out[f"{m}_lm_prompt_chars_per_request"] = row["lm_prompt_chars_per_request"]
        out[f"{m}_hit_rate"] = row["hit_rate_measured"]
        out[f"{m}_cpu_busy"] = row["cpu_busy"]
        for k, v in row["cpu_ms_per_step"].items():
            out[f"{m}_cpu_ms_per_step/{k}"] = v
    if rows:
        out["updates_per_s"] = float(np.mean([r["updates_per_s"] for r in rows]))
        out["replay_ratio"] = float(np.mean([r["replay_ratio"] for r in rows]))
    print_report(out, rows, say)
    args.json.write_text(json.dumps(out, indent=2))
    say(f"wrote {args.json}")
    return out


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _per(a: float, b: float) -> str:
    # Serve's counters are read only with one replica; with more, "-" (not 0).
    return "-" if not a or not b else f"{a / b:.2f}"


def print_report(out: dict, rows: list[dict], say=print) -> None:
    env_sps = out["env_only_steps_per_s"]
    say()
    if "raw_engine_steps_per_s" in out:
        say(
            f"raw engine {out['raw_engine_steps_per_s']:.1f} steps/s; wrapped env {env_sps:.1f} "
            f"(in the same rounds: {out['env_vs_raw_engine']:.2f}x raw)"
        )
    else:
        say(f"wrapped env {env_sps:.1f} steps/s")
    if not rows:
        return
    keys = list(rows[0]["breakdown_ms_per_step"])
    head = ["", *[r["method"] for r in rows]]
    lines = [
        ["env steps/s", *[f"{r['steps_per_s']:.1f}" for r in rows]],
        ["vs wrapped env", *[f"{r['steps_per_s'] / env_sps:.2f}x" for r in rows]],
        ["updates/s", *[f"{r['updates_per_s']:.1f}" for r in rows]],
        ["replay ratio", *[f"{r['replay_ratio']:.2f}" for r in rows]],
        ["ms per env step:", *["" for _ in rows]],
        *[[f"  {k}", *[f"{r['breakdown_ms_per_step'][k]:.2f}" for r in rows]] for k in keys],
        [
            "  (Serve scoring, in actor call)",
            *[f"{r['serve_scoring_ms_per_step']:.2f}" for r in rows],
        ],
        ["LM requests per env step", *[_per(r["lm_requests"], r["env_steps"]) for r in rows]],
        ["  candidates per request", *[_num(r.get("lm_candidates_per_request")) for r in rows]],
        ["  prompt chars per request", *[_num(r.get("lm_prompt_chars_per_request")) for r in rows]],
    ]
    roles = sorted({k for r in rows for k in r["cpu_ms_per_step"]})
    lines += [
        ["CPU ms per env step:", *["" for _ in rows]],
        *[[f"  {k}", *[f"{r['cpu_ms_per_step'].get(k, 0.0):.2f}" for r in rows]] for k in roles],
        ["CPU busy (this benchmark)", *[f"{r['cpu_busy']:.0%}" for r in rows]],
    ]
    width = max(len(x[0]) for x in [head, *lines]) + 2
    say("".ljust(width) + "".join(h.rjust(12) for h in head[1:]))
    for line in lines:
        say(line[0].ljust(width) + "".join(c.rjust(12) for c in line[1:]))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
