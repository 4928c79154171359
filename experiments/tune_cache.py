"""Ray Tune sweep of the cache's meta-parameters (or the posterior, or T_prior) on text-suite
training runs, scored on the valid split's games.

    python experiments/tune_cache.py --space cache_meta --env textworld --num-samples 8
    python experiments/text_suite.py --preset full --methods adaptive --settings RESULTS/best.json

Each trial trains ``--method`` (default ``adaptive``) for ``--trial-env-steps`` env steps with its
own cache actor (all trials share one Serve application of the prior) and reports the
meta-reward ``success - lambda_q * LM queries per decision`` after every iteration; Optuna's TPE
proposes settings and ASHA stops poor trials early. Writes ``tune/`` (Tune's folder), trials.jsonl,
table.md (the best configurations), objective.png and best.json. Running it again with the same
``--out`` resumes the sweep (``Tuner.restore``). Same as ``cachellm-rl tune``. See docs/tuning.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout / job dir

from cachellm_rl.argparsing import ArgumentParser, user_error
from cachellm_rl.envs.registry import TEXT_ENVS
from cachellm_rl.results import new_results_dir
from cachellm_rl.tuning import SEARCHERS, SWEEP_METHODS, SweepConfig, sweep_main
from tune_spaces import SPACES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--space", choices=sorted(SPACES), default="cache_meta")
    p.add_argument("--env", choices=TEXT_ENVS, default="textworld")
    p.add_argument("--method", choices=SWEEP_METHODS, default="adaptive")
    p.add_argument("--num-samples", type=int, default=8, help="trials")
    p.add_argument("--trial-env-steps", type=int, default=3000, help="env steps per trial")
    p.add_argument("--num-games", type=int, default=10, help="valid games (0 = all)")
    p.add_argument("--lambda-q", type=float, default=0.2, help="weight of LM queries/decision")
    p.add_argument("--searcher", choices=SEARCHERS, default="optuna")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--games", type=Path, default=None, help="game suite")
    p.add_argument("--prior-model", type=Path, default=None, help="HF model dir")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default 2)")
    p.add_argument("--out", type=Path, default=None, help="results folder (resumes if there)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="library logs on the terminal")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.prior_model is not None and not (args.prior_model / "config.json").is_file():
        return user_error("tune_cache.py", f"--prior-model {args.prior_model} holds no model")
    try:
        cfg = SweepConfig(
            env=args.env,
            space=args.space,
            method=args.method,
            num_samples=args.num_samples,
            trial_env_steps=args.trial_env_steps,
            num_games=args.num_games,
            seed=args.seed,
            lambda_q=args.lambda_q,
            searcher=args.searcher,
            max_concurrent_trials=args.max_concurrent,
            games_dir=str(args.games) if args.games else None,
            prior_model=str(args.prior_model) if args.prior_model else None,
        )
    except ValueError as e:
        return user_error("tune_cache.py", str(e))
    out = new_results_dir(f"tune-{args.space}", args.out)
    return sweep_main(
        cfg, out, verbose=args.verbose, num_cpus=args.num_cpus, progress=not args.no_progress
    )


if __name__ == "__main__":
    sys.exit(main())
