"""Fault drill: a multi-runner PS-DQN run without a fault, with its cache actor killed, and with
its Serve replica of the prior killed, on the same games, seed and budget.

    python experiments/fault_drill.py --json results/fault_drill.json
    python experiments/fault_drill.py --faults cache_actor --env-steps 2000 --kill-at 1000

Prints, per drill: whether the run finished, decisions that raised (goal 0), decisions served
by a fallback prior (env runners while the actor was away; the cache while the LM was away),
entries before the kill / in the restored snapshot / after the restart, the adapted parameters
before and after, recovery time and training success. Library logs go to
``<json dir>/fault_drill.log``. See docs/cluster.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cachellm_rl.argparsing import ArgumentParser, user_error
from cachellm_rl.envs.registry import TEXT_ENVS
from cachellm_rl.faults import FAULTS, FaultDrill


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--env", choices=TEXT_ENVS, default="textworld")
    p.add_argument("--method", default="adaptive", help="a cached method")
    p.add_argument("--faults", default=",".join(FAULTS), help="comma-separated drills")
    p.add_argument("--num-env-runners", type=int, default=4)
    p.add_argument("--env-steps", type=int, default=1600)
    p.add_argument("--kill-at", type=int, default=800, help="env steps before the kill")
    p.add_argument("--snapshot-interval", type=float, default=5.0, help="seconds")
    p.add_argument("--num-games", type=int, default=10, help="train games played (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--json", type=Path, default=Path("results/fault_drill.json"))
    p.add_argument("-v", "--verbose", action="store_true", help="library logs on the terminal")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    try:
        drills = [
            FaultDrill(
                fault=f,
                method=args.method,
                num_env_runners=args.num_env_runners,
                env_steps=args.env_steps,
                kill_at_env_steps=args.kill_at,
                snapshot_interval_s=args.snapshot_interval,
                seed=args.seed,
            )
            for f in faults
        ]
    except ValueError as e:
        return user_error("fault_drill.py", str(e))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    from cachellm_rl.logs import run_log

    log_path = args.json.with_name("fault_drill.log")
    with run_log(log_path, verbose=args.verbose) as console:
        return run(args, drills, log_path, console)


def _line(r: dict) -> str:
    parts = [
        f"{r['fault']:13s} finished={r['finished']} raised={r['decisions_raised']}",
        f"fallback runner/cache {r['fallback_decisions_runner']}/{r['fallback_decisions_cache']}",
        f"of {r['decisions']} decisions",
    ]
    if r["fault"] == "cache_actor" and r.get("snapshot"):
        parts.append(
            f"entries before/snapshot/restored {r['entries_before_kill']}/"
            f"{r['snapshot']['entries']}/{r['entries_restored']}"
        )
    if "recovery_s" in r:
        parts.append(f"back in {r['recovery_s']:.1f} s")
    succ = r["train_success"]
    parts.append(f"train success {succ:.3f}" if succ is not None else "no episode")
    return "; ".join(parts)


def run(args, drills: list[FaultDrill], log_path: Path, console) -> int:
    from dataclasses import replace

    from cachellm_rl.algorithms.ps_dqn.suite import (
        ensure_inputs,
        env_config_for,
        preset,
        suite_games,
    )
    from cachellm_rl.config import init_ray
    from cachellm_rl.faults import run_fault_drill
    from cachellm_rl.prior.scoring import ScorerConfig
    from cachellm_rl.prior.server import PriorServerConfig, deploy_prior_server

    say = functools.partial(print, file=console, flush=True)
    cfg = preset("quick", env=args.env, split="train", num_games=args.num_games, progress=False)
    ensure_inputs(cfg, progress=False, console=console)
    games = suite_games(cfg)
    say(
        f"{args.env}: {len(games)} train games, {args.method}, {args.num_env_runners} env "
        f"runners, {args.env_steps} env steps, kill at {args.kill_at}, snapshots every "
        f"{args.snapshot_interval:g} s; log -> {log_path}"
    )
    init_ray(num_cpus=args.num_cpus, log_to_driver=args.verbose)
    deploy_prior_server(
        PriorServerConfig(
            scorer=ScorerConfig(
                model_dir=str(cfg.prior_model), prior_temperature=cfg.prior_temperature
            ),
            num_cpus=0,
        )
    )
    rows = []
    for d in drills:
        r = run_fault_drill(
            d,
            replace(cfg.settings),
            env=args.env,
            env_config=env_config_for(cfg, games, d.seed),
            cache_name=f"drill-{d.fault}",
            snapshot_dir=args.json.parent / "fault_drill_snapshots" / d.fault,
        )
        rows.append(r)
        say(_line(r))
        args.json.write_text(json.dumps({"drills": rows}, indent=1, default=str) + "\n")
    say(f"-> {args.json}")
    return 0 if all(r["finished"] and not r["decisions_raised"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
