"""Train and compare LM-guided agents on TextWorld games with the shared prior cache.

Local (starts Ray itself):
    python experiments/text_suite.py --preset quick
On a running Ray cluster (see the README for Ray 2.60's token auth):
    ray job submit --working-dir . -- python experiments/text_suite.py --preset quick

Games and the embedded default prior are created on first use when missing. Results go to
``results/text_suite-<timestamp>/`` (or ``--out``): config.json, runs.jsonl, curves.jsonl,
summary.json, table.md, PNG plots and TensorBoard events under tb/.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout / job dir

from cachellm_rl.algorithms.ps_dqn.methods import METHODS
from cachellm_rl.algorithms.ps_dqn.suite import PRESETS, preset, run_text_suite
from cachellm_rl.config import init_ray
from cachellm_rl.results import new_results_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="quick", help="quick or full")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (0..N-1)")
    p.add_argument("--env-steps", type=int, default=None, help="env steps per RL run")
    p.add_argument("--num-games", type=int, default=None, help="games of the split (0 = all)")
    p.add_argument("--num-env-runners", type=int, default=None, help="remote env runners")
    p.add_argument("--games", type=Path, default=Path("data/games/cooking"), help="game suite")
    p.add_argument("--prior-model", type=Path, default=None, help="HF model dir of the prior")
    p.add_argument("--prior-temperature", type=float, default=None, help="T_prior")
    p.add_argument("--soft-q-prior", action="store_true", help="KL-regularised soft-Q target")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default 2)")
    p.add_argument("--out", type=Path, default=None, help="results folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def ensure_inputs(games: Path, prior: Path, *, progress: bool) -> None:
    """Generate the games and train the default prior when they are missing."""
    from cachellm_rl.envs.games import MANIFEST, SuiteConfig, make_suite

    if not (games / MANIFEST).is_file():
        print(f"generating the game suite into {games} ...", flush=True)
        make_suite(SuiteConfig(), games, progress=progress)
    if not (prior / "config.json").is_file():
        print(f"training the embedded default prior into {prior} ...", flush=True)
        from cachellm_rl.prior.embedded import train_embedded_prior

        train_embedded_prior(
            "textworld", games_dir=games, out_dir=prior, evaluate=False, progress=progress
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    progress = not args.no_progress
    prior = args.prior_model or Path("artifacts/priors/textworld")
    cfg = preset(
        args.preset,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        seeds=tuple(range(args.seeds)) if args.seeds else None,
        env_steps=args.env_steps,
        num_games=args.num_games,
        num_env_runners=args.num_env_runners,
        games_dir=str(args.games),
        prior_model=str(prior),
        prior_temperature=args.prior_temperature,
        progress=progress,
    )
    if args.soft_q_prior:
        cfg = replace(cfg, settings=replace(cfg.settings, soft_q_prior=True))
    ensure_inputs(args.games, prior, progress=progress)
    out = new_results_dir("text_suite", args.out)
    print(f"results -> {out}", flush=True)

    import ray
    from ray import serve

    from cachellm_rl.prior.scoring import ScorerConfig
    from cachellm_rl.prior.server import PriorServerConfig, deploy_prior_server

    t0 = time.perf_counter()
    init_ray(**({"num_cpus": args.num_cpus} if args.num_cpus else {}))
    deploy_prior_server(
        PriorServerConfig(
            scorer=ScorerConfig(
                model_dir=str(prior), device="auto", prior_temperature=cfg.prior_temperature
            ),
            num_cpus=0,
        )
    )
    try:
        summary = run_text_suite(cfg, out)
    finally:
        serve.shutdown()
        ray.shutdown()
    print((out / "table.md").read_text())
    print(f"wall {time.perf_counter() - t0:.0f} s; results in {out}")
    return 0 if summary["methods"] else 1


if __name__ == "__main__":
    sys.exit(main())
