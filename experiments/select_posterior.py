"""Choose the posterior's prior weight ``beta``, its temperature schedule and the TD target
(n-step length, discount, double-DQN or soft-Q with the prior, conservative weight), the Q
network's text encoder and whether it sees repeat marks on the *valid* split.

Runs ``uncached`` on the env's valid games for every (beta, schedule, T_final, n_step, gamma,
soft_q_prior, conservative_alpha, q_encoder, mark_repeats) of a grid, plus the ``frozen_q`` and
``direct_lm`` controls, and picks the setting with the highest greedy success (ties: the smaller
``beta``, then the higher ``T_final``, the shorter n-step, the smaller discount, double DQN, the
smaller conservative weight, the bag encoder, no repeat marks). The evaluation games (``test``)
are never played. The choice is written to ``selection.json``, which ``text_suite.py
--posterior-from`` reads, so the suite's comparisons use settings chosen before seeing their
games.

Usage:
    python experiments/select_posterior.py --env textworld --out results/select-textworld
    python experiments/text_suite.py --preset full --posterior-from \\
        results/select-textworld/selection.json

Each setting's results folder (``<out>/<setting>/``) is a normal suite folder; an interrupted
selection resumes when run again with the same ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cachellm_rl.algorithms.ps_dqn.methods import MethodSettings
from cachellm_rl.algorithms.ps_dqn.posterior import TEMPERATURE_SCHEDULES, PosteriorConfig
from cachellm_rl.algorithms.ps_dqn.rl_module import ENCODERS
from cachellm_rl.algorithms.ps_dqn.suite import preset
from cachellm_rl.argparsing import ArgumentParser
from cachellm_rl.envs.registry import TEXT_ENVS
from cachellm_rl.logs import run_log
from cachellm_rl.results import write_json

CONTROLS = ("direct_lm", "frozen_q")
DEFAULT_GAMMA = MethodSettings().gamma
DEFAULT_Q_ENCODER = MethodSettings().encoder


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--env", choices=TEXT_ENVS, default="textworld")
    p.add_argument("--betas", default="0.5,1.0", help="prior weights to try")
    p.add_argument("--schedules", default="annealed", help="temperature schedules to try")
    p.add_argument("--temperature", type=float, default=1.0, help="T_0 of every schedule")
    p.add_argument("--temperature-finals", default="0.3,0.6,1.0", help="last T values to try")
    p.add_argument("--n-steps", default="1,3", help="n-step returns to try")
    p.add_argument(
        "--gammas",
        default="0.9",
        help="discounts to try (sparse, long tasks such as BabyAI need one near 1)",
    )
    p.add_argument(
        "--soft-q-priors",
        default="0",
        help="TD targets to try: 0 = double-DQN, 1 = KL-regularised soft-Q with the prior",
    )
    p.add_argument(
        "--conservative-alphas",
        default="0",
        help="weights of the conservative (CQL(H)) term to try (0 = none)",
    )
    p.add_argument(
        "--q-encoders",
        default=DEFAULT_Q_ENCODER,
        help=f"Q-network text encoders to try ({', '.join(ENCODERS)}; gru keeps word order, "
        "e.g. which object a BabyAI distance belongs to, at more learner time)",
    )
    p.add_argument(
        "--mark-repeats",
        default="0",
        help="0 and/or 1: the Q network sees which candidates it already took in the same "
        "state this episode (docs/algorithms.md, 'Repeat marks')",
    )
    p.add_argument("--env-steps", type=int, default=10_000, help="env steps per run")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--num-games", type=int, default=0, help="valid games (0 = all)")
    p.add_argument(
        "--controls",
        default=",".join(CONTROLS),
        help="control methods run on the same valid games (frozen_q trains for the full budget "
        "with lr 0, so its greedy play equals direct_lm's; long selections may keep direct_lm)",
    )
    p.add_argument("--num-env-runners", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="library logs on the terminal")
    args = p.parse_args(argv)
    args.schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    args.controls = tuple(c.strip() for c in args.controls.split(",") if c.strip())
    args.q_encoders = [e.strip() for e in args.q_encoders.split(",") if e.strip()]
    for e in args.q_encoders:
        if e not in ENCODERS:
            p.error(f"unknown Q encoder {e!r}; known: {', '.join(ENCODERS)}")
    for c in args.controls:
        if c not in CONTROLS:
            p.error(f"unknown control {c!r}; known: {', '.join(CONTROLS)}")
    for s in args.schedules:
        if s not in TEMPERATURE_SCHEDULES:
            p.error(f"unknown schedule {s!r}; known: {TEMPERATURE_SCHEDULES}")
    try:
        args.betas = _floats(args.betas)
        args.temperature_finals = _floats(args.temperature_finals)
        args.n_steps = [int(x) for x in _floats(args.n_steps)]
        args.gammas = _floats(args.gammas)
        soft = _floats(args.soft_q_priors)
        marks = _floats(args.mark_repeats)
        args.conservative_alphas = _floats(args.conservative_alphas)
    except ValueError as e:
        p.error(str(e))
    if any(x not in (0.0, 1.0) for x in soft):
        p.error(f"--soft-q-priors takes 0 and/or 1, got {args.soft_q_priors!r}")
    args.soft_q_priors = [bool(x) for x in soft]
    if any(x not in (0.0, 1.0) for x in marks):
        p.error(f"--mark-repeats takes 0 and/or 1, got {args.mark_repeats!r}")
    args.mark_repeats = [bool(x) for x in marks]
    if any(not 0 < g <= 1 for g in args.gammas):
        p.error(f"--gammas must be in (0, 1], got {args.gammas}")
    if any(not 0 <= a < math.inf for a in args.conservative_alphas):
        p.error(f"--conservative-alphas must be finite and >= 0, got {args.conservative_alphas}")
    grid_args = (
        "betas",
        "temperature_finals",
        "n_steps",
        "gammas",
        "soft_q_priors",
        "q_encoders",
        "mark_repeats",
    )
    for name in (*grid_args, "conservative_alphas"):
        if not getattr(args, name):
            p.error(f"--{name.replace('_', '-')} is empty")
    return args


class Setting(NamedTuple):
    """One point of the selection grid."""

    posterior: PosteriorConfig
    n_step: int
    soft_q_prior: bool = False
    conservative_alpha: float = 0.0
    gamma: float = DEFAULT_GAMMA
    q_encoder: str = DEFAULT_Q_ENCODER
    mark_repeats: bool = False

    @property
    def name(self) -> str:
        """The setting's folder name (a discount other than the default adds ``-g<gamma>``,
        the soft-Q target ``-soft``, a conservative term ``-cql<alpha>``, a Q encoder other
        than the default ``-<encoder>``, repeat marks ``-marks``).

        Example:
            >>> Setting(PosteriorConfig(temperature_final=0.3), 1, True, 0.1).name
            'beta1-annealed-T1-0.3-n1-soft-cql0.1'
            >>> Setting(PosteriorConfig(temperature_final=0.3), 1, True, 0.0, 0.99).name
            'beta1-annealed-T1-0.3-n1-g0.99-soft'
            >>> Setting(PosteriorConfig(temperature_final=0.3), 3, q_encoder="gru").name
            'beta1-annealed-T1-0.3-n3-gru'
            >>> Setting(PosteriorConfig(temperature_final=0.1), 1, mark_repeats=True).name
            'beta1-annealed-T1-0.1-n1-marks'
        """
        p = self.posterior
        name = f"beta{p.prior_weight:g}-{p.schedule}-T{p.temperature:g}-{p.temperature_final:g}"
        name += f"-n{self.n_step}" + (f"-g{self.gamma:g}" if self.gamma != DEFAULT_GAMMA else "")
        name += "-soft" if self.soft_q_prior else ""
        name += f"-cql{self.conservative_alpha:g}" if self.conservative_alpha else ""
        name += f"-{self.q_encoder}" if self.q_encoder != DEFAULT_Q_ENCODER else ""
        return name + ("-marks" if self.mark_repeats else "")


def grid(args: argparse.Namespace) -> list[Setting]:
    """The settings tried (``fixed`` ignores ``T_final``)."""
    out, seen = [], set()
    for beta, sched, t_final, n_step, gamma, soft, alpha, enc, marks in itertools.product(
        args.betas,
        args.schedules,
        args.temperature_finals,
        args.n_steps,
        args.gammas,
        args.soft_q_priors,
        args.conservative_alphas,
        args.q_encoders,
        args.mark_repeats,
    ):
        t_final = args.temperature if sched == "fixed" else t_final
        post = PosteriorConfig(
            prior_weight=beta,
            schedule=sched,
            temperature=args.temperature,
            temperature_final=min(t_final, args.temperature),
        )
        setting = Setting(post, n_step, soft, alpha, gamma, enc, marks)
        if setting.name not in seen:
            seen.add(setting.name)
            out.append(setting)
    return out


def merged_rows(path: Path, rows: list[dict], args: argparse.Namespace) -> list[dict]:
    """``rows`` plus the settings an earlier selection in the same folder measured at the same
    budget, seeds and number of games (a grid extended later keeps them; this run's rows win
    on a name clash).

    Example:
        >>> ns = argparse.Namespace(env="textworld", env_steps=10, seeds=1, num_games=0)
        >>> merged_rows(Path("/nonexistent.json"), [{"name": "a"}], ns)
        [{'name': 'a'}]
    """
    if not path.is_file():
        return rows
    old = json.loads(path.read_text())
    same = (old.get("env"), old.get("env_steps"), old.get("seeds"), old.get("num_games", 0)) == (
        args.env,
        args.env_steps,
        args.seeds,
        args.num_games,
    )
    if not same:
        return rows
    names = {r["name"] for r in rows}
    defaults = {
        "soft_q_prior": False,
        "conservative_alpha": 0.0,
        "gamma": DEFAULT_GAMMA,
        "q_encoder": DEFAULT_Q_ENCODER,
        "mark_repeats": False,
    }
    kept = [{**defaults, **r} for r in old.get("settings", []) if r["name"] not in names]
    return kept + rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    out = args.out or Path("results") / f"select-{args.env}"
    out.mkdir(parents=True, exist_ok=True)
    with run_log(out / "run.log", verbose=args.verbose) as console:
        return run(args, out, console)


def run(args: argparse.Namespace, out: Path, console) -> int:
    import ray
    from ray import serve

    from cachellm_rl.algorithms.ps_dqn.suite import ensure_inputs
    from cachellm_rl.config import init_ray
    from experiments.text_suite import run_env

    base = preset(
        "full",
        env=args.env,
        split="valid",
        num_games=args.num_games,
        seeds=tuple(range(args.seeds)),
        env_steps=args.env_steps,
        num_env_runners=args.num_env_runners,
        progress=not args.no_progress,
    )
    ensure_inputs(base, progress=base.progress, console=console)
    t0 = time.perf_counter()
    init_ray(log_to_driver=args.verbose)
    rows = []
    try:
        ctrl = {}
        if args.controls:
            controls = replace(base, methods=args.controls)
            summary = run_env(controls, out / "controls", console)
            ctrl = {m: a["success_mean"] for m, a in summary["methods"].items()}
            print(f"controls on valid: {ctrl}", file=console, flush=True)
        for point in grid(args):
            settings = replace(
                base.settings,
                posterior=point.posterior,
                n_step=point.n_step,
                gamma=point.gamma,
                soft_q_prior=point.soft_q_prior,
                conservative_alpha=point.conservative_alpha,
                encoder=point.q_encoder,
                mark_repeats=point.mark_repeats,
            )
            cfg = replace(base, methods=("uncached",), settings=settings)
            name = point.name
            summary = run_env(cfg, out / name, console)
            agg = summary["methods"]["uncached"]
            rows.append(
                {
                    "name": name,
                    "posterior": point.posterior.to_dict(),
                    "n_step": point.n_step,
                    "gamma": point.gamma,
                    "soft_q_prior": point.soft_q_prior,
                    "conservative_alpha": point.conservative_alpha,
                    "q_encoder": point.q_encoder,
                    "mark_repeats": point.mark_repeats,
                    "success": agg["success_mean"],
                    "train_success_all": agg.get("train_success_all"),
                }
            )
            print(f"{name}: valid success {agg['success_mean']:.3f}", file=console, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    rows = merged_rows(out / "selection.json", rows, args)
    best = max(
        rows,
        key=lambda r: (
            r["success"],
            -r["posterior"]["prior_weight"],
            r["posterior"]["temperature_final"],
            -r["n_step"],
            -r["gamma"],
            not r["soft_q_prior"],
            -r["conservative_alpha"],
            r["q_encoder"] == DEFAULT_Q_ENCODER,
            not r["mark_repeats"],
        ),
    )
    selection = {
        "env": args.env,
        "split": "valid",
        "env_steps": args.env_steps,
        "seeds": args.seeds,
        "num_games": args.num_games,
        "controls": ctrl,
        "settings_used": asdict(base.settings),
        "settings": rows,
        "chosen": best["posterior"],
        "chosen_n_step": best["n_step"],
        "chosen_gamma": best["gamma"],
        "chosen_soft_q_prior": best["soft_q_prior"],
        "chosen_conservative_alpha": best["conservative_alpha"],
        "chosen_q_encoder": best["q_encoder"],
        "chosen_mark_repeats": best["mark_repeats"],
        "chosen_success": best["success"],
        "wall_s": time.perf_counter() - t0,
    }
    write_json(out / "selection.json", selection)
    print(json.dumps({"chosen": best["name"], "valid_success": best["success"]}), file=console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
