"""How much of a greedy prior's failure is looping, and what breaking the loops is worth.

Plays each game of a split once with the prior's argmax (``direct_lm``) and once with the same
argmax under a hand-written rule that never takes an action it already took in the same state
text this episode (the next-best candidate instead). It counts the failed episodes that
repeated a (state, action) pair, and the prior's log-probability gap that the rule overrode.

This is the measurement behind the Q network's repeat marks (docs/algorithms.md, "Repeat
marks"): a memoryless greedy policy that comes back to a state loops until the step limit,
and the rule's success is what an agent that learned to stop repeating could gain. It is a
diagnostic, not a method of the suite: nothing is learned.

Usage:
    python experiments/greedy_loops.py --env babyai --split valid --out results/loops-babyai.json
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cachellm_rl.argparsing import ArgumentParser
from cachellm_rl.envs.registry import (
    DEFAULT_MAX_EPISODE_STEPS,
    TEXT_ENVS,
    default_games_dir,
    default_prior_dir,
    env_split_games,
    make_text_env,
)
from cachellm_rl.envs.text_env import INFO_WON
from cachellm_rl.results import write_json

RULES = ("greedy", "no_repeat")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--env", choices=TEXT_ENVS, default="babyai")
    p.add_argument("--split", choices=("train", "valid", "test"), default="valid")
    p.add_argument("--num-games", type=int, default=0, help="first N games of the split (0 = all)")
    p.add_argument("--games", type=Path, default=None, help="suite folder (default: the env's)")
    p.add_argument("--prior-model", type=Path, default=None, help="default: the env's prior")
    p.add_argument("--prior-temperature", type=float, default=0.5)
    p.add_argument("--out", type=Path, default=None, help="JSON with per-game outcomes")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.num_games < 0:
        p.error(f"--num-games must be >= 0, got {args.num_games}")
    prior = args.prior_model or default_prior_dir(args.env)
    if not (Path(prior) / "config.json").is_file():
        p.error(f"no prior model in {prior} (train it with `cachellm-rl prior train --env ...`)")
    args.prior_model = prior
    return args


def play(env, game: str, score, rule: str, max_steps: int) -> dict:
    """One episode of ``game`` under ``rule``; ``score(decision)`` gives the prior's logp."""
    env.reset(options={"game": game})
    taken: Counter[tuple[str, str]] = Counter()
    looped, gaps, info = False, [], {}
    for t in range(max_steps):
        d = env.decision
        logp = score(d)
        order = [int(i) for i in np.argsort(-logp, kind="stable")]
        a = order[0]
        key = d.state_text()
        if rule == "no_repeat":
            fresh = [i for i in order if taken[(key, d.candidates[i])] == 0]
            if fresh and fresh[0] != a:
                gaps.append(float(logp[a] - logp[fresh[0]]))
                a = fresh[0]
        looped |= taken[(key, d.candidates[a])] > 0
        taken[(key, d.candidates[a])] += 1
        _, _, term, trunc, info = env.step(a)
        if term or trunc:
            return {"won": bool(info.get(INFO_WON)), "looped": looped, "steps": t + 1, "gaps": gaps}
    return {"won": bool(info.get(INFO_WON)), "looped": looped, "steps": max_steps, "gaps": gaps}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cachellm_rl.cache.client import DirectPriorClient, TextState
    from cachellm_rl.prior.scoring import CandidateScorer, ScorerConfig

    gdir = args.games or default_games_dir(args.env)
    games = env_split_games(args.env, gdir, args.split)
    games = games[: args.num_games] if args.num_games else games
    max_steps = DEFAULT_MAX_EPISODE_STEPS[args.env]
    env = make_text_env(
        args.env, {"games": games, "expert": False, "seed": 0, "max_episode_steps": max_steps}
    )
    client = DirectPriorClient(
        CandidateScorer(
            ScorerConfig(
                model_dir=str(args.prior_model),
                prior_temperature=args.prior_temperature,
                device="cpu",
            )
        )
    )

    def score(d) -> np.ndarray:
        state = TextState(
            objective=d.objective,
            observation=d.observation,
            inventory=d.inventory,
            candidates=tuple(d.candidates),
        )
        (r,) = client.get_priors([state])
        return np.asarray(r.logp, np.float64)

    out: dict = {"env": args.env, "split": args.split, "games": len(games), "rules": {}}
    try:
        for rule in RULES:
            eps = {
                g: play(env, g, score, rule, max_steps)
                for g in tqdm(games, desc=rule, disable=args.no_progress, unit="game")
            }
            won = np.array([e["won"] for e in eps.values()])
            looped = np.array([e["looped"] for e in eps.values()])
            gaps = [x for e in eps.values() for x in e["gaps"]]
            out["rules"][rule] = {
                "success": float(won.mean()),
                "failures": int((~won).sum()),
                "failures_that_looped": int((looped & ~won).sum()),
                "mean_steps": float(np.mean([e["steps"] for e in eps.values()])),
                "overridden_gap_nats_median": float(np.median(gaps)) if gaps else None,
                "per_game_success": {Path(g).name: float(e["won"]) for g, e in eps.items()},
            }
            r = out["rules"][rule]
            print(
                f"{args.env} {args.split} ({len(games)} games) {rule}: success "
                f"{r['success']:.3f}, {r['failures_that_looped']} of {r['failures']} failures "
                f"repeated a (state, action), mean length {r['mean_steps']:.1f}"
                + (
                    f", median prior gap overridden {r['overridden_gap_nats_median']:.2f} nats"
                    if gaps
                    else ""
                )
            )
    finally:
        env.close()
    if args.out:
        write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
