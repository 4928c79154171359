"""How well does embedding similarity predict that a cached prior is still right?

Plays the test games with a perturbed expert, scores every distinct state with the prior LM and
embeds it with the cache's encoder, then pairs each state with its most similar earlier state (the
entry a semantic cache would serve it from). Per similarity band it reports how often the two
priors pick the same action, the cache-error rate the adaptive cache uses (top-1 regret of the
neighbour's prior under the state's own prior >= 1 nat) and the median KL(fresh || cached).

Usage:
    python experiments/semantic_error.py [--games data/games/cooking]
        [--prior-model artifacts/priors/textworld] [--episodes 40] [--json results/x.json]

This is what the adaptive cache's settings rest on (see docs/cache.md): on tw-cooking, raising
tau barely lowers the error rate of semantic hits, because states that differ by one decisive
word ("fried" vs "raw") embed almost identically.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cachellm_rl.algorithms.ps_dqn.connectors import text_state_from_info
from cachellm_rl.cache.adaptive import RefreshMeasure, align_prior
from cachellm_rl.cache.encoders import TextEncoderConfig, TextStateEncoder
from cachellm_rl.envs.games import split_games
from cachellm_rl.envs.text_env import INFO_CANDIDATES
from cachellm_rl.envs.textworld_env import TextWorldEnv, TextWorldEnvConfig
from cachellm_rl.prior.prompts import prior_request
from cachellm_rl.prior.scoring import CandidateScorer, ScorerConfig

BANDS = ((0.90, 0.93), (0.93, 0.95), (0.95, 0.97), (0.97, 0.98), (0.98, 0.99), (0.99, 1.001))


def collect_states(games, episodes: int, expert_probability: float, seed: int) -> list:
    """Distinct ``TextState`` s visited by a perturbed expert."""
    env = TextWorldEnv(TextWorldEnvConfig(games=tuple(games), expert=True, max_episode_steps=30))
    rng = np.random.default_rng(seed)
    seen: dict = {}
    for ep in tqdm(range(episodes), desc="play", unit="ep"):
        _, info = env.reset(options={"game": games[ep % len(games)]})
        for _ in range(30):
            s = text_state_from_info(info)
            seen.setdefault((s.key_text(), s.candidates), s)
            cands = info[INFO_CANDIDATES]
            expert = info.get("expert_action")
            take_expert = expert in cands and rng.random() < expert_probability
            a = cands.index(expert) if take_expert else int(rng.integers(len(cands)))
            _, _, term, trunc, info = env.step(a)
            if term or trunc:
                break
    env.close()
    return list(seen.values())


def pair_measures(states, embeddings, logps, min_coverage: float) -> list[dict]:
    """Each state against its nearest earlier state (what a semantic hit would serve)."""
    out = []
    for i in range(1, len(states)):
        sims = embeddings[:i] @ embeddings[i]
        j = int(np.argmax(sims))
        cached, cov = align_prior(states[j].candidates, logps[j], states[i].candidates, 2.0)
        if cov < min_coverage:
            continue
        m = RefreshMeasure.of(logps[i], cached, 1.0)
        agree = int(np.argmax(cached)) == int(np.argmax(logps[i]))
        out.append({"sim": float(sims[j]), "kl": m.kl, "error": m.error, "agree": agree})
    return out


def band_table(pairs: list[dict]) -> list[dict]:
    """Agreement, error rate and median KL per similarity band."""
    rows = []
    for lo, hi in BANDS:
        b = [p for p in pairs if lo <= p["sim"] < hi]
        if b:
            rows.append(
                {
                    "band": f"[{lo:.2f}, {min(hi, 1.0):.2f}{']' if hi > 1 else ')'}",
                    "pairs": len(b),
                    "top1_agreement": float(np.mean([p["agree"] for p in b])),
                    "error_rate": float(np.mean([p["error"] for p in b])),
                    "kl_median": float(np.median([p["kl"] for p in b])),
                }
            )
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--games", default="data/games/cooking")
    ap.add_argument("--split", default="test")
    ap.add_argument("--prior-model", default="artifacts/priors/textworld")
    ap.add_argument("--prior-temperature", type=float, default=0.5)
    ap.add_argument("--episodes", type=int, default=40)
    ap.add_argument("--expert-probability", type=float, default=0.6)
    ap.add_argument("--min-coverage", type=float, default=0.75)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the pairs and the table here")
    args = ap.parse_args(argv)
    games = split_games(args.games, args.split)
    states = collect_states(games, args.episodes, args.expert_probability, args.seed)
    encoder = TextStateEncoder(TextEncoderConfig(max_tokens=128))
    embeddings = encoder.encode([s.key_text() for s in states])
    scorer = CandidateScorer(
        ScorerConfig(model_dir=args.prior_model, prior_temperature=args.prior_temperature)
    )
    pc = scorer.prompt_config  # the layout the prior was trained with
    logps = []
    for s in tqdm(states, desc="score", unit="state"):
        (r,) = scorer.score([prior_request(s, pc)])
        logps.append(np.asarray(r.logp))
    pairs = pair_measures(states, embeddings, logps, args.min_coverage)
    rows = band_table(pairs)
    print(f"{len(states)} distinct states, {len(pairs)} pairs with coverage >= {args.min_coverage}")
    print("| cosine band | pairs | top-1 agreement | error rate (regret >= 1 nat) | median KL |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['band']} | {r['pairs']} | {r['top1_agreement']:.2f} | {r['error_rate']:.2f} "
            f"| {r['kl_median']:.2f} |"
        )
    result = {"states": len(states), "bands": rows, "pairs": pairs, "args": vars(args)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
