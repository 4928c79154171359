"""Scoring speed of the LM prior per request: one request per pass against packed batches.

Times :class:`~cachellm_rl.prior.scoring.CandidateScorer`'s ways of scoring the same synthetic
requests (random token ids of fixed shape; the timing depends on the shapes, not on the words):

- ``two_pass``: one request at a time, prompt pass then candidate-tree pass on its cache;
- ``packed_1``: one request at a time in a single packed pass (prompt and tree together);
- ``packed_N``: N requests in one packed pass;
- ``serve_N`` (with ``--env``): what the Serve replica runs on a batch of N, tokenising included
  and the passes split by the scorer's padding cap (``ScorerConfig.max_padding_fraction``).

``--env textworld|babyai|alfworld`` times real requests instead: the prompts of states met by
random admissible actions on the env's test games (``--policy prior``: by the prior itself,
sampled, whole episodes; ``--min-candidates N`` keeps the states with at least N candidates,
as RL's are), scored by its embedded prior (or ``--model``, in that model's prompt layout).
Their lengths vary, so a packed pass pads, which synthetic requests of one shape do not show.

The default shape is TextWorld's in RL (334 prompt tokens, 18 candidates of 2-6 tokens) on a
randomly initialised GPT-2 of the embedded prior's size (2 layers, 128 wide, 4 heads, 4000
words); ``--model DIR`` times a real model directory instead. One torch thread by default, as in
the Serve replica. Prints a table and the largest difference in log-probability from the
two-pass scores; ``--json PATH`` writes the numbers. See docs/priors.md.

Example::

    python experiments/bench_scorer.py --json results/bench_scorer.json
    python experiments/bench_scorer.py --env textworld --requests 96
    python experiments/bench_scorer.py --env textworld --policy prior --min-candidates 30
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cachellm_rl.argparsing import ArgumentParser
from cachellm_rl.results import write_json


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="model dir (default: random GPT-2)")
    p.add_argument("--prompt-tokens", type=int, default=334)
    p.add_argument("--candidates", type=int, default=18)
    p.add_argument("--requests", type=int, default=64, help="distinct requests timed per round")
    p.add_argument("--batches", default="1,2,4,8,16", help="packed batch sizes to time")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument(
        "--env",
        default=None,
        help="time real requests instead: states of this env's test games under random "
        "admissible actions, scored by its embedded prior (or --model)",
    )
    p.add_argument(
        "--policy",
        choices=("random", "prior"),
        default="random",
        help="with --env: who plays the states timed (random admissible actions, 8-step "
        "episodes; or the prior itself, sampled, whole episodes: closer to RL's states)",
    )
    p.add_argument(
        "--min-candidates",
        type=int,
        default=1,
        help="with --env: keep only states with at least this many candidates",
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.min_candidates < 1:
        p.error(f"--min-candidates must be >= 1, got {args.min_candidates}")
    if args.env is not None:
        from cachellm_rl.envs.registry import TEXT_ENVS, default_prior_dir

        if args.env not in TEXT_ENVS:
            p.error(f"--env must be one of {list(TEXT_ENVS)}, got {args.env!r}")
        args.model = args.model or default_prior_dir(args.env)
    for name in ("prompt_tokens", "candidates", "requests", "rounds", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        args.batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    except ValueError:
        p.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if not args.batches or min(args.batches) < 1:
        p.error("--batches needs batch sizes >= 1")
    if args.model is not None and not (args.model / "config.json").is_file():
        p.error(f"no model in {args.model} (config.json missing)")
    return args


def _model(args):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if args.model is not None:
        from cachellm_rl.prior.scoring import CandidateScorer, ScorerConfig

        sc = CandidateScorer(ScorerConfig(model_dir=str(args.model), device="cpu"))
        return sc.model, len(sc.tokenizer)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=4000,
        n_positions=768,
        n_embd=128,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    cfg.activation_function = "gelu_pytorch_tanh"  # as the scorer loads GPT-2
    return GPT2LMHeadModel(cfg).eval(), 4000


def env_requests(
    env_id: str,
    n: int,
    seed: int = 0,
    games_dir: str | Path | None = None,
    prompt_config=None,
    *,
    scorer=None,
    min_candidates: int = 1,
    max_episodes: int = 2000,
):
    """``n`` real prior requests: the prompts (in layout ``prompt_config``, default the
    standard one) of states met on the env's test games.

    Without ``scorer`` the states come from random admissible actions, episodes cut at 8 steps
    (many games, early states). With ``scorer`` the prior plays: each action is sampled from
    its distribution, for whole episodes, which reaches the later, bigger states an agent
    starting from the prior meets. Only states with at least ``min_candidates`` candidates
    are kept (RL's TextWorld requests hold 36-44).

    Raises:
        ValueError: ``max_episodes`` episodes did not give ``n`` such states.
    """
    from cachellm_rl.envs.registry import default_games_dir, env_split_games, make_text_env
    from cachellm_rl.prior.prompts import prior_request

    games = env_split_games(env_id, games_dir or default_games_dir(env_id), "test")
    env = make_text_env(env_id, {"games": tuple(games)})
    rng = np.random.default_rng(seed)
    out: list = []
    episode = 0
    while len(out) < n:
        if episode >= max_episodes:
            env.close()
            raise ValueError(
                f"{max_episodes} episodes met only {len(out)} states with >= {min_candidates} "
                "candidates"
            )
        env.reset(seed=seed + episode)
        episode += 1
        for _ in range(8 if scorer is None else 1000):
            d = env.decision
            req = prior_request(d, prompt_config)
            if len(d.candidates) >= min_candidates:
                out.append(req)
            if scorer is None:
                action = int(rng.integers(len(d.candidates)))
            else:
                (resp,) = scorer.score([req])
                p = np.exp(np.asarray(resp.logp, np.float64))
                action = int(rng.choice(len(p), p=p / p.sum()))
            _, _, term, trunc, _ = env.step(action)
            if term or trunc or len(out) >= n:
                break
    env.close()
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    from cachellm_rl.prior.scoring import (
        packed_candidate_token_logprobs,
        tree_candidate_token_logprobs,
    )

    torch.set_num_threads(args.threads)
    model, vocab = _model(args)
    dev = torch.device("cpu")
    rng = np.random.default_rng(0)
    items = []
    if args.env is not None:
        from cachellm_rl.prior.scoring import CandidateScorer, ScorerConfig

        encoder = CandidateScorer(ScorerConfig(model_dir=str(args.model), device="cpu"))
        requests = env_requests(
            args.env,
            args.requests,
            prompt_config=encoder.prompt_config,
            scorer=encoder if args.policy == "prior" else None,
            min_candidates=args.min_candidates,
        )
        items = [encoder.encode(r) for r in requests]
        args.prompt_tokens = float(np.mean([len(p) for p, _ in items]))
        args.candidates = float(np.mean([len(c) for _, c in items]))
        print(
            f"{len(items)} {args.env} requests: {args.prompt_tokens:.0f} prompt tokens, "
            f"{args.candidates:.1f} candidates on average"
        )
    for _ in range(args.requests if args.env is None else 0):
        prompt = rng.integers(5, vocab, size=args.prompt_tokens).tolist()
        cands = [
            rng.integers(5, vocab, size=int(rng.integers(2, 7))).tolist()
            for _ in range(args.candidates)
        ]
        items.append((prompt, cands))

    def two_pass():
        return [tree_candidate_token_logprobs(model, p, c, device=dev) for p, c in items]

    def packed(n: int):
        def run():
            out = []
            for i in range(0, len(items), n):
                out += packed_candidate_token_logprobs(model, items[i : i + n], device=dev)
            return out

        return run

    ways = {"two_pass": two_pass, **{f"packed_{n}": packed(n) for n in args.batches}}
    if args.env is not None:
        # What the Serve replica runs on a batch of n: tokenising included, passes split by
        # the scorer's padding cap.
        def serve(n: int):
            def run():
                for i in range(0, len(requests), n):
                    for r in encoder.score_each(requests[i : i + n]):
                        if isinstance(r, Exception):
                            raise r

            return run

        ways |= {f"serve_{n}": serve(n) for n in args.batches}
    ref = two_pass()
    result: dict = {
        "prompt_tokens": args.prompt_tokens,
        "candidates": args.candidates,
        "requests": args.requests,
        "threads": args.threads,
        "model": str(args.model) if args.model else "random GPT-2, 2 layers x 128, 4 heads",
        "requests_from": f"{args.env} test games" if args.env else "random token ids",
    }
    print(f"{'way':<10} {'ms/request':>10} {'vs two_pass':>11} {'max |dlogp|':>12}")
    for name, fn in ways.items():
        got = fn()
        gap = (
            float("nan")  # serve_N returns priors, not token scores
            if got is None
            else max(
                float(np.max(np.abs(a - b)))
                for r, g in zip(ref, got, strict=True)
                for a, b in zip(r, g, strict=True)
            )
        )
        times = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) / len(items))
        ms = 1e3 * statistics.median(times)
        result[f"{name}_ms_per_request"] = ms
        result[f"{name}_max_abs_diff"] = gap
        base = result["two_pass_ms_per_request"]
        print(f"{name:<10} {ms:>10.2f} {base / ms:>10.2f}x {gap:>12.1e}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
