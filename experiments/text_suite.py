"""Train and compare LM-guided agents on text games (TextWorld, ALFWorld, BabyAI-Text) with the
shared prior cache.

Local (starts Ray itself):
    python experiments/text_suite.py --preset quick
    python experiments/text_suite.py --preset quick --envs textworld,alfworld,babyai
On a running Ray cluster (see the README for Ray 2.60's token auth):
    ray job submit --working-dir . -- python experiments/text_suite.py --preset quick

Each env's games and embedded default prior are created on first use when missing. Results go to
``results/text_suite-<timestamp>/`` (or ``--out``): config.json, runs.jsonl, curves.jsonl,
summary.json, table.md, PNG plots, TensorBoard events under tb/, an RLlib checkpoint per RL run
under checkpoints/ and run.log (library logs; ``-v`` shows them on the terminal instead). With
several envs each env has these in its own ``<env>/`` subfolder, and the top level holds the
all-envs summary.json and table.md. Running again with the same ``--out`` resumes an interrupted
run. See docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout / job dir

from cachellm_rl.algorithms.ps_dqn.methods import METHODS, settings_with
from cachellm_rl.algorithms.ps_dqn.posterior import TEMPERATURE_SCHEDULES, PosteriorConfig
from cachellm_rl.algorithms.ps_dqn.suite import (
    PRESETS,
    PROTOCOLS,
    TextSuiteConfig,
    ensure_inputs,
    preset,
    run_text_suite,
    write_env_summary,
)
from cachellm_rl.argparsing import (
    ArgumentParser,
    add_suite_arguments,
    check_suite_envs,
    prior_server_config,
    suite_ray,
    suite_seeds,
    user_error,
)
from cachellm_rl.envs.registry import TEXT_ENVS
from cachellm_rl.logs import run_log
from cachellm_rl.results import new_results_dir
from cachellm_rl.tuning import read_settings_file
from tune_spaces import PRIOR_TEMPERATURE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="quick", help="quick or full")
    p.add_argument(
        "--envs", default="textworld", help=f"comma-separated text envs ({','.join(TEXT_ENVS)})"
    )
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument("--env-steps", type=int, default=None, help="env steps per RL run")
    p.add_argument("--max-episode-steps", type=int, default=None, help="default: per env")
    p.add_argument("--num-env-runners", type=int, default=None, help="remote env runners")
    p.add_argument(
        "--soft-q-prior",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="KL-regularised soft-Q target with the prior (--no-soft-q-prior: double DQN; "
        "default: --posterior-from's choice, else double DQN)",
    )
    p.add_argument(
        "--conservative-alpha",
        type=float,
        default=None,
        help="weight of the conservative (CQL(H)) term of the TD loss (default 0: none)",
    )
    p.add_argument(
        "--mark-repeats",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the Q network sees which candidates it already took in the same state this "
        "episode (docs/algorithms.md, 'Repeat marks'; default: --posterior-from's choice, "
        "else off)",
    )
    p.add_argument("--protocol", choices=PROTOCOLS, default=None, help="default: same_games")
    p.add_argument(
        "--posterior-from",
        type=Path,
        default=None,
        help="selection.json of experiments/select_posterior.py (beta, T, n-step chosen on valid)",
    )
    p.add_argument(
        "--settings",
        type=Path,
        default=None,
        help="best.json of a Tune sweep (experiments/tune_cache.py): its settings, applied to "
        "every method of the run before the explicit options below",
    )
    p.add_argument("--prior-weight", type=float, default=None, help="beta of the posterior")
    p.add_argument("--schedule", choices=TEMPERATURE_SCHEDULES, default=None, help="T schedule")
    p.add_argument("--temperature", type=float, default=None, help="T (fixed) or T_0")
    p.add_argument("--temperature-final", type=float, default=None, help="last T (annealed)")
    p.add_argument("--lr", type=float, default=None, help="Q-network learning rate")
    p.add_argument("--n-step", type=int, default=None, help="n-step returns (default 3)")
    p.add_argument(
        "--n-step-tail",
        choices=("skip", "clamp"),
        default=None,
        help="an episode's last n-1 transitions: skip (default) or clamp (see docs/algorithms.md)",
    )
    p.add_argument(
        "--training-intensity", type=float, default=None, help="replayed / sampled (default 4)"
    )
    p.add_argument(
        "--overlap-sampling",
        action="store_true",
        help="the learner updates while the env runners sample the next fragment",
    )
    p.add_argument(
        "--state-encoder",
        default="minilm",
        help="adaptive's state encoder: minilm, learned (artifacts/encoders/<env>, written by "
        "experiments/cache_fidelity.py) or a learned-encoder folder",
    )
    p.add_argument("--delta", type=float, default=None, help="adaptive's error budget (0.05)")
    p.add_argument(
        "--bound",
        choices=("delta_method", "region"),
        default=None,
        help="adaptive's upper bound of P(wrong) (default delta_method; see docs/cache.md)",
    )
    p.add_argument(
        "--no-served-guard",
        action="store_true",
        help="adaptive without the on-policy guard of its served error (an ablation; see "
        "docs/cache.md)",
    )
    p.add_argument(
        "--env-runner-resource",
        default=None,
        help="custom Ray resource each env runner reserves one unit of (pins env runners to "
        "the nodes that advertise it, e.g. `rollout` in cluster.yaml)",
    )
    p.add_argument(
        "--cache-shards",
        type=int,
        default=1,
        help="cache actors the cache is sharded over (see docs/cluster.md: when to switch)",
    )
    p.add_argument("--split", default=None, help="evaluation split (default: test)")
    p.add_argument("--eval-every", type=int, default=None, help="greedy eval every N env steps")
    add_suite_arguments(p)
    args = p.parse_args(argv)
    check_suite_envs(p, args)
    if args.cache_shards < 1:
        p.error(f"--cache-shards must be >= 1, got {args.cache_shards}")
    return args


def run_env(cfg: TextSuiteConfig, out: Path, console=None, args=None) -> dict:
    """Deploy the env's prior behind Serve (replacing the previous env's) and run the suite."""
    from cachellm_rl.prior.server import deploy_prior_server

    deploy = argparse.Namespace(prior_device="auto", prior_num_gpus=0.0, prior_replicas=1)
    deploy_prior_server(
        prior_server_config(
            args or deploy,
            model_dir=str(cfg.prior_model),
            prior_temperature=cfg.prior_temperature,
        )
    )
    return run_text_suite(cfg, out, console=console)


def build_configs(args: argparse.Namespace) -> list[TextSuiteConfig]:
    """One suite config per env from the command line (ValueError on a bad value)."""
    cfgs = []
    for env in args.envs:
        cfg = preset(
            args.preset,
            env=env,
            methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
            seeds=suite_seeds(args),
            env_steps=args.env_steps,
            num_games=args.num_games,
            split=args.split,
            protocol=args.protocol,
            max_episode_steps=args.max_episode_steps,
            num_env_runners=args.num_env_runners,
            games_dir=str(args.games) if args.games else None,
            prior_model=str(args.prior_model) if args.prior_model else None,
            prior_temperature=args.prior_temperature,
            eval_every_env_steps=args.eval_every,
            progress=not args.no_progress,
        )
        s = cfg.settings
        if args.posterior_from is not None:
            selection = json.loads(Path(args.posterior_from).read_text())
            s = replace(s, posterior=PosteriorConfig.from_dict(selection["chosen"]))
            s = replace(
                s,
                n_step=int(selection.get("chosen_n_step", s.n_step)),
                gamma=float(selection.get("chosen_gamma", s.gamma)),
                encoder=str(selection.get("chosen_q_encoder", s.encoder)),
                soft_q_prior=bool(selection.get("chosen_soft_q_prior", False)),
                conservative_alpha=float(selection.get("chosen_conservative_alpha", 0.0)),
                mark_repeats=bool(selection.get("chosen_mark_repeats", False)),
            )
        if args.settings is not None:
            overrides = read_settings_file(args.settings)
            t_prior = overrides.pop(PRIOR_TEMPERATURE, None)
            s = settings_with(s, overrides)
            if t_prior is not None and args.prior_temperature is None:
                cfg = replace(cfg, prior_temperature=float(t_prior))
        post = {
            "prior_weight": args.prior_weight,
            "schedule": args.schedule,
            "temperature": args.temperature,
            "temperature_final": args.temperature_final,
        }
        post = {k: v for k, v in post.items() if v is not None}
        if post:
            s = replace(s, posterior=replace(s.posterior, **post))
        if args.soft_q_prior is not None:
            s = replace(s, soft_q_prior=args.soft_q_prior)
        if args.conservative_alpha is not None:
            s = replace(s, conservative_alpha=args.conservative_alpha)
        if args.mark_repeats is not None:
            s = replace(s, mark_repeats=args.mark_repeats)
        if args.lr is not None:
            s = replace(s, lr=args.lr)
        if args.n_step is not None:
            s = replace(s, n_step=args.n_step)
        if args.n_step_tail is not None:
            s = replace(s, n_step_tail=args.n_step_tail)
        if args.training_intensity is not None:
            s = replace(s, training_intensity=args.training_intensity)
        if args.overlap_sampling:
            s = replace(s, overlap_sampling=True)
        if args.env_runner_resource:
            s = replace(s, env_runner_resource=args.env_runner_resource)
        if args.prior_resource:  # the cache actor lives beside the prior
            s = replace(s, cache_resource=args.prior_resource)
        if args.cache_shards != 1:
            s = replace(s, cache_shards=args.cache_shards)
        if args.delta is not None:
            s = replace(s, correctness=replace(s.correctness, delta=args.delta))
        if args.bound is not None:
            s = replace(s, correctness=replace(s.correctness, bound=args.bound))
        if args.no_served_guard:
            s = replace(s, correctness=replace(s.correctness, served_guard=False))
        if args.state_encoder != "minilm":
            folder = (
                Path("artifacts/encoders") / env
                if args.state_encoder == "learned"
                else Path(args.state_encoder)
            )
            if not (folder / "decision_encoder.json").is_file():
                raise ValueError(
                    f"--state-encoder: {folder} holds no learned encoder "
                    f"(python experiments/cache_fidelity.py --envs {env} writes one)"
                )
            s = replace(s, state_encoder_dir=str(folder.resolve()))
        cfgs.append(replace(cfg, settings=s))
    return cfgs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.prior_model is not None and not (args.prior_model / "config.json").is_file():
        return user_error("text_suite.py", f"--prior-model {args.prior_model} holds no model")
    if args.games is not None and not args.games.is_dir():
        return user_error("text_suite.py", f"--games {args.games} is not a folder")
    try:
        cfgs = build_configs(args)
    except (ValueError, OSError, KeyError, TypeError) as e:
        return user_error("text_suite.py", str(e))
    out = new_results_dir("text_suite", args.out)
    with run_log(out / "run.log", verbose=args.verbose) as console:
        print(f"results -> {out} (library logs: {out / 'run.log'})", file=console, flush=True)
        for cfg in cfgs:
            ensure_inputs(cfg, progress=cfg.progress, console=console)
        return run_all(cfgs, args, out, console)


def run_all(cfgs: list[TextSuiteConfig], args: argparse.Namespace, out: Path, console) -> int:
    t0 = time.perf_counter()
    summaries: dict[str, dict] = {}
    with suite_ray(verbose=args.verbose, num_cpus=args.num_cpus):
        for cfg in cfgs:
            env_out = out if len(cfgs) == 1 else out / cfg.env
            env_out.mkdir(parents=True, exist_ok=True)
            summaries[cfg.env] = run_env(cfg, env_out, console, args)
            print((env_out / "table.md").read_text(), file=console, flush=True)
    if len(cfgs) > 1:
        print(write_env_summary(out, summaries), file=console)
    print(f"wall {time.perf_counter() - t0:.0f} s; results in {out}", file=console, flush=True)
    return 0 if all(s["methods"] for s in summaries.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
