"""Offline RL on generated datasets: behaviour cloning, discrete CQL and CQL-Prior (priors read
through the shared cache under each cache preset), against the prior alone (direct_lm), with
random and expert reference rows for the normalised score.

Local (starts Ray itself):
    python experiments/offline_suite.py --preset quick
    python experiments/offline_suite.py --preset full --envs textworld,babyai --datasets random
On a running Ray cluster (see the README for Ray 2.60's token auth; the uploaded working dir has
no data/ or artifacts/, so give absolute paths):
    ray job submit --working-dir . -- python experiments/offline_suite.py --preset quick \
        --games $PWD/data/games/cooking --prior-model $PWD/artifacts/priors/textworld \
        --dataset-dir $PWD/data/offline/textworld/random-quick --out $PWD/results/offline-job

Datasets are made (``data/offline/<env>/<dataset>``; the quick preset uses a small
``...-quick`` one) and annotated under each cache preset when missing, once, and reused.
Results go to ``results/offline_suite-<timestamp>/`` (or ``--out``), one ``<env>-<dataset>/``
folder per pair: config.json, selection.json (weights chosen on the valid games), runs.jsonl,
curves.jsonl, summary.json, table.md, learning_curves.png, TensorBoard events under tb/ and
run.log at the top. Running again with the same ``--out`` resumes. See docs/offline.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout / job dir

from cachellm_rl.algorithms.cql_prior.suite import (
    OFFLINE_METHODS,
    OFFLINE_PRESETS,
    OfflineSuiteConfig,
    offline_preset,
    run_offline_suite,
)
from cachellm_rl.argparsing import (
    ArgumentParser,
    add_suite_arguments,
    check_suite_envs,
    suite_ray,
    suite_seeds,
    user_error,
)
from cachellm_rl.envs.registry import TEXT_ENVS, has_games
from cachellm_rl.logs import run_log
from cachellm_rl.offline.datasets import POLICIES
from cachellm_rl.results import new_results_dir

ENV_TABLE_COLUMNS = (
    ("env", "env-dataset"),
    ("method", "method"),
    ("success_mean", "success"),
    ("success_ci", "95% CI"),
    ("normalised", "normalised"),
    ("train_lm_queries", "train LM queries"),
    ("train_s", "train s"),
)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=OFFLINE_PRESETS, default="quick", help="quick or full")
    p.add_argument("--envs", default="textworld", help=f"comma-separated ({','.join(TEXT_ENVS)})")
    p.add_argument("--datasets", default="random", help=f"comma-separated ({','.join(POLICIES)})")
    p.add_argument("--methods", default=",".join(OFFLINE_METHODS), help="comma-separated")
    p.add_argument("--train-iters", type=int, default=None, help="algo.train() calls per run")
    p.add_argument("--num-valid-games", type=int, default=None, help="valid games (0 = all)")
    p.add_argument("--episodes", type=int, default=None, help="dataset episodes if made")
    p.add_argument(
        "--audit-probability",
        type=float,
        default=None,
        help="chance that a served semantic reuse is checked by a fresh LM call (default 0.1)",
    )
    p.add_argument(
        "--state-encoder",
        type=Path,
        default=None,
        help="learned state encoder (+ reuse verifier) for the adaptive preset, as "
        "cache_fidelity.py or `cachellm-rl cache train-encoder` writes it (default: MiniLM)",
    )
    p.add_argument(
        "--dataset-dir", type=Path, default=None, help="dataset folder (one env and dataset)"
    )
    add_suite_arguments(p)
    args = p.parse_args(argv)
    check_suite_envs(p, args)
    args.datasets = _csv(args.datasets)
    if not args.datasets:
        p.error("--datasets is empty")
    if len(args.envs) * len(args.datasets) > 1 and args.dataset_dir:
        p.error("--dataset-dir applies to one env and one dataset")
    bad = [d for d in args.datasets if d not in POLICIES]
    if bad:
        p.error(f"unknown datasets {bad}; known: {list(POLICIES)}")
    return args


def build_configs(args: argparse.Namespace) -> list[OfflineSuiteConfig]:
    """One config per (env, dataset) (ValueError on a bad value)."""
    cfgs = []
    for env in args.envs:
        for dataset in args.datasets:
            cfg = offline_preset(
                args.preset,
                env=env,
                dataset=dataset,
                methods=tuple(_csv(args.methods)),
                seeds=suite_seeds(args),
                train_iters=args.train_iters,
                num_games=args.num_games,
                num_valid_games=args.num_valid_games,
                dataset_episodes=args.episodes,
                prior_temperature=args.prior_temperature,
                games_dir=str(args.games) if args.games else None,
                prior_model=str(args.prior_model) if args.prior_model else None,
                dataset_dir=str(args.dataset_dir) if args.dataset_dir else None,
                progress=not args.no_progress,
            )
            cfgs.append(cfg)
    return cfgs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        cfgs = build_configs(args)
    except (ValueError, OSError, KeyError) as e:
        return user_error("offline_suite.py", str(e))
    if args.audit_probability is not None and not 0.0 <= args.audit_probability <= 1.0:
        return user_error("offline_suite.py", "--audit-probability must be in [0, 1]")
    if args.state_encoder and not (args.state_encoder / "decision_encoder.json").is_file():
        return user_error(
            "offline_suite.py", f"--state-encoder {args.state_encoder} holds no learned encoder"
        )
    for cfg in cfgs:
        if not has_games(cfg.env, Path(str(cfg.games_dir))):
            return user_error(
                "offline_suite.py",
                f"no {cfg.env} games in {cfg.games_dir}; make them with `cachellm-rl games make`",
            )
        if not (Path(str(cfg.prior_model)) / "config.json").is_file():
            return user_error(
                "offline_suite.py",
                f"no prior in {cfg.prior_model}; train it with `cachellm-rl prior train`",
            )
    out = new_results_dir("offline_suite", args.out)
    with run_log(out / "run.log", verbose=args.verbose) as console:
        print(f"results -> {out} (library logs: {out / 'run.log'})", file=console, flush=True)
        return run_all(cfgs, args, out, console)


def run_all(cfgs: list[OfflineSuiteConfig], args, out: Path, console) -> int:
    from cachellm_rl.algorithms.ps_dqn.methods import MethodSettings
    from cachellm_rl.argparsing import prior_server_config
    from cachellm_rl.prior.server import deploy_prior_server
    from cachellm_rl.suite import write_env_summary

    t0 = time.perf_counter()
    summaries: dict[str, dict] = {}
    settings = MethodSettings(
        state_encoder_dir=str(args.state_encoder.resolve()) if args.state_encoder else None
    )
    if args.audit_probability is not None:
        settings = replace(settings, audit_probability=args.audit_probability)

    def log(msg: str) -> None:
        print(msg, file=console, flush=True)

    with suite_ray(verbose=args.verbose, num_cpus=args.num_cpus):
        deployed = None
        for cfg in cfgs:
            if deployed != (cfg.prior_model, cfg.prior_temperature):
                deploy_prior_server(
                    prior_server_config(
                        args,
                        model_dir=str(cfg.prior_model),
                        prior_temperature=cfg.prior_temperature,
                    )
                )
                deployed = (cfg.prior_model, cfg.prior_temperature)
            key = f"{cfg.env}-{cfg.dataset}"
            sub = out if len(cfgs) == 1 else out / key
            summaries[key] = run_offline_suite(cfg, sub, settings, console=console, log=log)
            print((sub / "table.md").read_text(), file=console, flush=True)
    if len(cfgs) > 1:
        print(write_env_summary(out, summaries, ENV_TABLE_COLUMNS, "offline suite"), file=console)
    print(f"wall {time.perf_counter() - t0:.0f} s; results in {out}", file=console, flush=True)
    return 0 if all(s["methods"] for s in summaries.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
