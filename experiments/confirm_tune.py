"""Confirm a Tune sweep's best settings: the swept method with its default settings and with
``best.json``, on the same test games, fresh seeds and budget, compared paired.

    python experiments/tune_cache.py --space cache_meta --env textworld --out results/tune-tw
    python experiments/confirm_tune.py --sweep results/tune-tw --seeds 3 --first-seed 100

Runs ``experiments/text_suite.py`` twice (``default/`` and ``tuned/`` under ``--out``, each
resumable) and writes ``confirm.json`` and ``confirm.md``: the meta-reward (greedy success on each
test game minus ``lambda_q`` x the seed's training LM queries per decision, ``lambda_q`` the
sweep's) and the success, tuned minus default, with 95% stratified-bootstrap CIs over
(game, seed) and the probability of improvement. See docs/tuning.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout / job dir

from cachellm_rl.argparsing import ArgumentParser, user_error
from cachellm_rl.results import new_results_dir, read_jsonl
from cachellm_rl.tuning import METRIC, confirmation_report

SUITE = Path(__file__).resolve().parent / "text_suite.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sweep", type=Path, required=True, help="a sweep's folder (has best.json)")
    p.add_argument("--seeds", type=int, default=3, help="fresh seeds per side")
    p.add_argument("--first-seed", type=int, default=100, help="first seed (the sweep used 0)")
    p.add_argument("--num-games", type=int, default=10, help="test games (0 = all)")
    p.add_argument("--env-steps", type=int, default=None, help="default: the sweep's budget")
    p.add_argument(
        "--posterior-from",
        type=Path,
        default=None,
        help="a select_posterior.py selection.json: beta and T (chosen on the valid split) for "
        "both sides",
    )
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default 2)")
    p.add_argument("--out", type=Path, default=None, help="results folder (resumes if there)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _markdown(rep: dict, best: dict, steps: int) -> str:
    posterior = rep.get("posterior_from") or "the default posterior"
    lines = [
        f"Protocol: {best['method']} on {best['env']}, {rep['games']} `test` games (the sweep "
        f"tuned on `{best['split']}`), seeds {rep['seeds']} (the sweep used its own), "
        f"{steps} env steps per run, greedy evaluation, {posterior} on both sides. {METRIC} = "
        f"greedy success - {best['lambda_q']} x training LM queries per decision.",
        "",
        "| score | default | tuned | tuned - default [95% CI] | P(tuned > default) [95% CI] |",
        "|---|---|---|---|---|",
    ]
    for key in (METRIC, "success"):
        r = rep[key]
        d, p = r["difference"], r["probability_of_improvement"]
        lines.append(
            f"| {key} | {r['default']:.3f} | {r['tuned']:.3f} | {d['value']:+.3f} "
            f"[{d['low']:+.3f}, {d['high']:+.3f}] | {p['value']:.2f} "
            f"[{p['low']:.2f}, {p['high']:.2f}] |"
        )
    lines.append(
        f"| LM queries / decision | {rep['default_queries_per_decision']:.3f} | "
        f"{rep['tuned_queries_per_decision']:.3f} | | |"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    best_path = args.sweep / "best.json"
    if not best_path.is_file():
        return user_error("confirm_tune.py", f"--sweep {args.sweep} holds no best.json")
    if args.seeds < 1 or args.first_seed < 0 or args.num_games < 0:
        return user_error("confirm_tune.py", "--seeds >= 1, --first-seed >= 0, --num-games >= 0")
    if args.posterior_from is not None and not args.posterior_from.is_file():
        return user_error("confirm_tune.py", f"--posterior-from {args.posterior_from}: no file")
    best = json.loads(best_path.read_text())
    steps = int(args.env_steps or best["trial_env_steps"])
    out = new_results_dir("confirm_tune", args.out)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    common = [
        "--envs", best["env"], "--methods", best["method"], "--seeds", str(args.seeds),
        "--first-seed", str(args.first_seed), "--num-games", str(args.num_games),
        "--env-steps", str(steps), "--split", "test",
    ]  # fmt: skip
    if args.posterior_from is not None:
        common += ["--posterior-from", str(args.posterior_from)]
    if args.num_cpus:
        common += ["--num-cpus", str(args.num_cpus)]
    if args.no_progress:
        common.append("--no-progress")
    for side, extra in (("default", []), ("tuned", ["--settings", str(best_path)])):
        print(f"== {side} settings -> {out / side}", flush=True)
        cmd = [sys.executable, str(SUITE), *common, *extra, "--out", str(out / side)]
        code = subprocess.call(cmd)
        if code:
            print(f"confirm_tune.py: the {side} run failed (exit {code})", file=sys.stderr)
            return code
    default_rows = read_jsonl(out / "default" / "runs.jsonl")
    tuned_rows = read_jsonl(out / "tuned" / "runs.jsonl")
    games = sorted(
        next(r for r in default_rows if r["method"] == best["method"])["per_game_success"]
    )
    rep = confirmation_report(
        default_rows,
        tuned_rows,
        method=best["method"],
        games=games,
        seeds=seeds,
        lambda_q=float(best["lambda_q"]),
    )
    rep.update(
        sweep=str(args.sweep),
        env=best["env"],
        env_steps=steps,
        best=best,
        posterior_from=str(args.posterior_from) if args.posterior_from else None,
    )
    (out / "confirm.json").write_text(json.dumps(rep, indent=1) + "\n")
    table = _markdown(rep, best, steps)
    (out / "confirm.md").write_text(table)
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
