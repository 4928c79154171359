"""Cache fidelity: how many lookups can a semantic cache serve, and how often is it wrong?

Per env, on the same logged states:

1. A perturbed expert plays the env's *train* games and its *test* games; every distinct state
   it visits is scored once by the env's prior LM (so every reuse can be checked).
2. The learned, decision-aware encoder (``cachellm_rl/cache/learned_encoder.py``) is trained on
   labelled pairs of *train*-game states (each state with its nearest MiniLM neighbours, the hard
   cases, and random others) and saved to ``artifacts/encoders/<env>/`` (``--encoder-out``),
   where the suite's ``adaptive`` method can pick it up.
3. The *test*-game states, which the encoder never saw, are replayed in visit order through an
   idealised cache (every earlier state cached); for each variant the share of lookups served
   from a neighbour (hit rate) and how often the served prior was wrong (same top action and
   total-variation distance <= epsilon = 0.2 is right) are measured:

   - ``minilm_tau``: all-MiniLM-L6-v2 with a fixed threshold (the ``lru``/``static`` rule),
     swept over tau; the headline row is tau = 0.95;
   - ``minilm_delta``: MiniLM with the delta rule (the correctness model fitted online on the
     replay's own labels), swept over delta; headline delta = 0.05;
   - ``learned_delta``: the learned encoder as the cache uses it: neighbours by its cosine,
     the delta rule fitted on its reuse verifier's score (``cachellm_rl/cache/verifier.py``,
     trained on the same train-game pairs after the encoder);
   - ``oracle``: the ceiling of correct serves, a lookup served whenever some earlier state's prior
     would be a correct reuse (all earlier states; ``oracle_top4_minilm`` and
     ``oracle_top4_learned``: only the 4 nearest under that encoder, as the cache retrieves);
     nothing it serves is wrong, by construction;
   - sweeps only: ``learned_tau`` and ``learned_cos_delta`` (the learned cosine without the
     verifier), ``verified_threshold`` (a fixed threshold on the verifier's score), and each
     delta-rule sweep again under the other bound (``--bound``: ``delta_method`` or
     ``region``), keyed ``<variant>_delta_<bound>``.

Writes ``<out>/fidelity.json`` (flat keys ``<env>.<variant>.hit_rate``,
``<env>.<variant>.served_error_rate``, ``<env>.<variant>.served_error_rate_wilson_hi``, plus
the sweeps, encoder latency and sizes), ``<out>/fidelity.png`` (error against hit rate) and a
table on the terminal. Library noise goes to ``<out>/fidelity.log``.

Usage:
    python experiments/cache_fidelity.py --quick                      # a few minutes
    python experiments/cache_fidelity.py --envs textworld,babyai --out results/fidelity
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from cachellm_rl.argparsing import ArgumentParser
from cachellm_rl.envs.registry import TEXT_ENVS

TAUS = (0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995)
DELTAS = (0.01, 0.02, 0.05, 0.1, 0.2)
HEADLINE_TAU = 0.95
HEADLINE_DELTA = 0.05
VERIFIER_THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99)
VERIFIER_EDGES = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0 + 1e-9)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--envs", default="textworld,babyai", help="comma-separated envs")
    p.add_argument("--quick", action="store_true", help="few games and episodes: minutes")
    p.add_argument("--train-games", type=int, default=0, help="train games (0: all)")
    p.add_argument("--test-games", type=int, default=0, help="test games (0: all)")
    p.add_argument("--episodes-per-game", type=int, default=3)
    p.add_argument("--perturb", type=float, default=0.3, help="random-step chance of the expert")
    p.add_argument("--max-tv", type=float, default=0.2, help="epsilon of a correct reuse")
    p.add_argument("--min-coverage", type=float, default=0.75)
    p.add_argument("--epochs", type=int, default=8, help="encoder training epochs")
    p.add_argument(
        "--verifier-epochs",
        type=int,
        default=8,
        help="most reuse-verifier epochs (the best on held-out train games is kept)",
    )
    p.add_argument(
        "--bound",
        default="delta_method",
        choices=("delta_method", "region"),
        help="the delta rule's bound in the headline rows (the other one is swept too)",
    )
    p.add_argument("--prior-temperature", type=float, default=0.5)
    p.add_argument("--out", type=Path, default=Path("results/fidelity"))
    p.add_argument("--encoder-out", type=Path, default=None, help="default artifacts/encoders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="library logs on the terminal")
    args = p.parse_args(argv)
    args.envs = [e.strip() for e in args.envs.split(",") if e.strip()]
    bad = [e for e in args.envs if e not in TEXT_ENVS]
    if bad:
        p.error(f"unknown env(s) {bad}; known: {list(TEXT_ENVS)}")
    if not 0 < args.max_tv <= 1:
        p.error(f"--max-tv must be in (0, 1], got {args.max_tv}")
    if args.quick:
        args.train_games = args.train_games or 12
        args.test_games = args.test_games or 8
        args.episodes_per_game = min(args.episodes_per_game, 2)
        args.epochs = min(args.epochs, 4)
    return args


def score_states(scorer, states, *, progress: bool) -> list[np.ndarray]:
    """The prior of every state (one LM call each)."""
    from tqdm import tqdm

    from cachellm_rl.prior.prompts import prior_request

    pc = scorer.prompt_config  # the layout the prior was trained with
    out = []
    for s in tqdm(states, desc="score", unit="state", disable=not progress):
        (r,) = scorer.score([prior_request(s, pc)])
        out.append(np.asarray(r.logp, np.float64))
    return out


def save_logged(folder: Path, signature: dict, data: tuple) -> None:
    """Keep the logged states, their priors and MiniLM embeddings, so a rerun with the same
    settings skips the env, the LM and MiniLM."""
    train, train_logp, train_mini, test, test_logp, test_mini = data
    folder.mkdir(parents=True, exist_ok=True)

    def states(xs, logps):
        return [
            {
                "observation": s.observation,
                "candidates": list(s.candidates),
                "objective": s.objective,
                "inventory": s.inventory,
                "logp": [float(v) for v in lp],
            }
            for s, lp in zip(xs, logps, strict=True)
        ]

    np.save(folder / "train_minilm.npy", train_mini, allow_pickle=False)
    np.save(folder / "test_minilm.npy", test_mini, allow_pickle=False)
    payload = {
        "signature": signature,
        "train": states(train, train_logp),
        "test": states(test, test_logp),
    }
    (folder / "states.json").write_text(json.dumps(payload))


def load_logged(folder: Path, signature: dict) -> tuple | None:
    """What :func:`save_logged` kept, when it was logged with the same settings."""
    from cachellm_rl.cache.client import TextState

    path = folder / "states.json"
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    if payload.get("signature") != json.loads(json.dumps(signature)):
        return None

    def states(rows):
        xs = [
            TextState(
                observation=r["observation"],
                candidates=tuple(r["candidates"]),
                objective=r["objective"],
                inventory=r["inventory"],
            )
            for r in rows
        ]
        return xs, [np.asarray(r["logp"], np.float64) for r in rows]

    train, train_logp = states(payload["train"])
    test, test_logp = states(payload["test"])
    train_mini = np.load(folder / "train_minilm.npy", allow_pickle=False)
    test_mini = np.load(folder / "test_minilm.npy", allow_pickle=False)
    return train, train_logp, train_mini, test, test_logp, test_mini


def verifier_latency_ms(verifier, pairs: list) -> float:
    """Median ms to score one pair (what a semantic lookup adds in the cache actor)."""
    times = []
    for pair in pairs:
        t0 = time.perf_counter()
        verifier.p_correct([pair])
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times)) if times else float("nan")


def encode_latency_ms(encoder, texts: list[str]) -> float:
    """Median ms to embed one new text (memo off: every call is a new text)."""
    times = []
    for t in texts:
        t0 = time.perf_counter()
        encoder.encode([t + " "])  # a text the memo has not seen
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def run_env(env: str, args: argparse.Namespace, console) -> dict:
    """All measurements of one env."""
    from cachellm_rl.cache.correctness import CorrectnessConfig
    from cachellm_rl.cache.encoders import TextEncoderConfig, TextStateEncoder
    from cachellm_rl.cache.fidelity import (
        collect_states,
        oracle_reuse,
        reliability,
        simulate_delta_on,
        simulate_pairs,
        simulate_tau,
        training_pairs,
        verifier_pairs,
    )
    from cachellm_rl.cache.learned_encoder import EncoderTrainConfig, train_decision_encoder
    from cachellm_rl.cache.verifier import VerifierConfig, VerifierTrainConfig, train_verifier
    from cachellm_rl.envs.registry import default_games_dir, default_prior_dir, env_split_games
    from cachellm_rl.prior.scoring import CandidateScorer, ScorerConfig

    progress = not args.no_progress
    games_dir, prior_dir = default_games_dir(env), default_prior_dir(env)
    if not (Path(prior_dir) / "config.json").is_file():
        raise FileNotFoundError(
            f"no {env} prior in {prior_dir}: run `cachellm-rl prior train --env {env}` first"
        )
    train_games = env_split_games(env, games_dir, "train")
    test_games = env_split_games(env, games_dir, "test")
    if args.train_games:
        train_games = train_games[: args.train_games]
    if args.test_games:
        test_games = test_games[: args.test_games]
    print(
        f"[{env}] logging states: {len(train_games)} train, {len(test_games)} test games",
        file=console,
    )
    kw = {
        "episodes_per_game": args.episodes_per_game,
        "perturb_probability": args.perturb,
        "seed": args.seed,
        "progress": progress,
    }
    minilm = TextStateEncoder(TextEncoderConfig(max_tokens=128, memo_entries=0))
    logged = args.out / f"{env}-logged"
    signature = {
        "env": env,
        "train_games": train_games,
        "test_games": test_games,
        "prior_temperature": args.prior_temperature,
        **{k: v for k, v in kw.items() if k != "progress"},
    }
    cached = load_logged(logged, signature)
    if cached is not None:
        print(f"[{env}] reusing the logged states in {logged}", file=console)
        train, train_logp, train_mini, test, test_logp, test_mini = cached
    else:
        train = [s.state for s in collect_states(env, train_games, **kw)]
        test = [s.state for s in collect_states(env, test_games, **kw)]
        scorer = CandidateScorer(
            ScorerConfig(model_dir=str(prior_dir), prior_temperature=args.prior_temperature)
        )
        train_logp = score_states(scorer, train, progress=progress)
        test_logp = score_states(scorer, test, progress=progress)
        train_mini = minilm.encode([s.key_text() for s in train])
        test_mini = minilm.encode([s.key_text() for s in test])
        save_logged(logged, signature, (train, train_logp, train_mini, test, test_logp, test_mini))
    train_texts = [s.key_text() for s in train]
    test_texts = [s.key_text() for s in test]

    ia, ib, y, tv = training_pairs(
        train, train_logp, train_mini, max_tv=args.max_tv, min_cov=args.min_coverage, seed=args.seed
    )
    print(
        f"[{env}] {len(train)} train states, {len(y)} labelled pairs ({y.mean():.2f} correct); "
        "training the encoder",
        file=console,
    )
    encoder, losses = train_decision_encoder(
        [train_texts[i] for i in ia],
        [train_texts[i] for i in ib],
        y,
        tv=tv,
        train=EncoderTrainConfig(epochs=args.epochs, seed=args.seed),
        progress=progress,
    )
    print(f"[{env}] training the reuse verifier on the same pairs", file=console)
    vpairs = verifier_pairs(train, train_logp, encoder.encode(train_texts), ia, ib)
    # early stopping on the last fifth of the train states (states come game by game, so
    # these are other games' states); pairs across the cut are left out of both
    cut = int(0.8 * len(train))
    fit = (ia < cut) & (ib < cut)
    held = (ia >= cut) & (ib >= cut)
    verifier, verifier_losses = train_verifier(
        [p for p, f in zip(vpairs, fit, strict=True) if f],
        y[fit],
        config=VerifierConfig(seed=args.seed),
        train=VerifierTrainConfig(epochs=args.verifier_epochs, seed=args.seed),
        valid=([p for p, h in zip(vpairs, held, strict=True) if h], y[held])
        if held.any()
        else None,
        progress=progress,
    )
    encoder.attach_verifier(verifier)
    enc_dir = (args.encoder_out or Path("artifacts/encoders")) / env
    encoder.save(enc_dir)
    test_learned = encoder.encode(test_texts)

    base = CorrectnessConfig(max_tv=args.max_tv, bound=args.bound)
    other = replace(base, bound="region" if args.bound == "delta_method" else "delta_method")
    common = {"min_cov": args.min_coverage}
    tau_rows = simulate_tau(test, test_logp, test_mini, TAUS, max_tv=args.max_tv, **common)
    learned_tau = simulate_tau(test, test_logp, test_learned, TAUS, max_tv=args.max_tv, **common)
    replays = {
        "minilm": simulate_pairs(test, test_logp, test_mini, max_tv=args.max_tv, **common),
        "learned_cos": simulate_pairs(test, test_logp, test_learned, max_tv=args.max_tv, **common),
        # the learned encoder as the cache ships it: neighbours by its cosine, reuse decided
        # by the delta rule on its verifier's score
        "learned": simulate_pairs(
            test, test_logp, test_learned, max_tv=args.max_tv, verifier=verifier, **common
        ),
    }

    def sweep(name: str, cfg: CorrectnessConfig) -> list:
        return [
            simulate_delta_on(replays[name], replace(cfg, delta=d), seed=args.seed) for d in DELTAS
        ]

    mini_delta, learned_cos_delta, learned_delta = (
        sweep(n, base) for n in ("minilm", "learned_cos", "learned")
    )
    other_sweeps = {f"{n}_delta_{other.bound}": sweep(n, other) for n in replays}
    verified_tau = simulate_tau(
        test,
        test_logp,
        test_learned,
        VERIFIER_THRESHOLDS,
        max_tv=args.max_tv,
        verifier=verifier,
        **common,
    )
    reliable = {
        name: reliability(test, test_logp, emb, max_tv=args.max_tv, **common)
        for name, emb in (("minilm", test_mini), ("learned", test_learned))
    }
    reliable["verified"] = reliability(
        test,
        test_logp,
        test_learned,
        edges=VERIFIER_EDGES,
        max_tv=args.max_tv,
        verifier=verifier,
        **common,
    )
    probe = test_texts[: min(50, len(test_texts))]
    latency = {
        "minilm_encode_p50_ms": encode_latency_ms(minilm, probe),
        "learned_encode_p50_ms": encode_latency_ms(encoder, probe),
    }
    oracle = {
        "oracle": oracle_reuse(test, test_logp, max_tv=args.max_tv, **common),
        "oracle_top4_minilm": oracle_reuse(
            test, test_logp, test_mini, max_tv=args.max_tv, **common
        ),
        "oracle_top4_learned": oracle_reuse(
            test, test_logp, test_learned, max_tv=args.max_tv, **common
        ),
    }
    headline = {
        "minilm_tau": next(r for r in tau_rows if r.rule == f"tau={HEADLINE_TAU:g}"),
        "minilm_delta": mini_delta[DELTAS.index(HEADLINE_DELTA)],
        "learned_delta": learned_delta[DELTAS.index(HEADLINE_DELTA)],
        **oracle,
    }
    return {
        "train_states": len(train),
        "test_states": len(test),
        "train_games": len(train_games),
        "test_games": len(test_games),
        "pairs": len(y),
        "pairs_correct": float(y.mean()) if len(y) else float("nan"),
        "encoder_losses": losses,
        "verifier_losses": verifier_losses,
        "verifier_pair_p50_ms": verifier_latency_ms(verifier, vpairs[:200]),
        "encoder_tag": encoder.tag,
        "encoder_dir": str(enc_dir),
        **latency,
        "headline": {k: v.as_dict() for k, v in headline.items()},
        "reliability": reliable,
        "sweeps": {
            "minilm_tau": [r.as_dict() for r in tau_rows],
            "learned_tau": [r.as_dict() for r in learned_tau],
            "minilm_delta": [r.as_dict() for r in mini_delta],
            "learned_cos_delta": [r.as_dict() for r in learned_cos_delta],
            "learned_delta": [r.as_dict() for r in learned_delta],
            **{k: [r.as_dict() for r in v] for k, v in other_sweeps.items()},
            "verified_threshold": [r.as_dict() for r in verified_tau],
        },
    }


def flat_keys(results: dict) -> dict:
    """``<env>.<variant>.<metric>`` keys of the headline rows."""
    out = {}
    for env, res in results.items():
        for variant, row in res["headline"].items():
            out[f"{env}.{variant}.hit_rate"] = row["hit_rate"]
            out[f"{env}.{variant}.served_error_rate"] = row["served_error_rate"]
            out[f"{env}.{variant}.served_error_rate_wilson_hi"] = row["served_error_wilson_hi"]
            out[f"{env}.{variant}.served"] = row["served"]
            out[f"{env}.{variant}.lookups"] = row["lookups"]
        out[f"{env}.minilm_encode_p50_ms"] = res["minilm_encode_p50_ms"]
        out[f"{env}.learned_encode_p50_ms"] = res["learned_encode_p50_ms"]
        out[f"{env}.verifier_pair_p50_ms"] = res["verifier_pair_p50_ms"]
    return out


def plot(results: dict, path: Path) -> None:
    """Served error rate against hit rate, one panel per env."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = list(results)
    fig, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 4), squeeze=False)
    styles = {
        "minilm_tau": ("MiniLM, fixed tau", "o-"),
        "learned_tau": ("learned, fixed tau", "o:"),
        "minilm_delta": ("MiniLM, delta rule", "s-"),
        "learned_cos_delta": ("learned cosine, delta rule", "s:"),
        "verified_threshold": ("learned + verifier, fixed threshold", "^:"),
        "learned_delta": ("learned + verifier, delta rule", "s--"),
    }
    for ax, env in zip(axes[0], envs, strict=True):
        for key, (label, style) in styles.items():
            rows = [r for r in results[env]["sweeps"][key] if r["served"]]
            if rows:
                ax.plot(
                    [r["hit_rate"] for r in rows],
                    [r["served_error_rate"] for r in rows],
                    style,
                    label=label,
                )
        ax.axhline(HEADLINE_DELTA, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{env}: test-game states")
        ax.set_xlabel("hit rate (semantic reuse / lookups)")
        ax.set_ylabel("served error rate")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_reliability(results: dict, console) -> None:
    """P(reuse of the nearest neighbour is correct) by similarity bin, per env and encoder."""
    print(
        "\nP(reuse correct) by similarity, or by the verifier's score for 'verified' (a delta "
        "rule can serve only where this is >= 1 - delta)",
        file=console,
    )
    print("| env | encoder | similarity | lookups (share) | correct [Wilson 95%] |", file=console)
    print("|---|---|---|---|---|", file=console)
    for env, res in results.items():
        for name, rows in res["reliability"].items():
            for r in rows:
                print(
                    f"| {env} | {name} | [{r['sim_lo']:.3f}, {r['sim_hi']:.3f}) | "
                    f"{r['n']} ({r['share']:.2f}) | {r['correct']:.3f} "
                    f"[{r['correct_lo']:.3f}, {r['correct_hi']:.3f}] |",
                    file=console,
                )


def main(argv: list[str] | None = None) -> int:
    from cachellm_rl.logs import run_log

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    with run_log(args.out / "fidelity.log", verbose=args.verbose) as console:
        for env in args.envs:
            try:
                results[env] = run_env(env, args, console)
            except FileNotFoundError as exc:
                print(f"error: {exc}", file=console)
                return 2
        flat = flat_keys(results)
        payload = {**flat, "envs": results, "args": {k: str(v) for k, v in vars(args).items()}}
        (args.out / "fidelity.json").write_text(json.dumps(payload, indent=1))
        plot(results, args.out / "fidelity.png")
        print(
            "\n| env | variant | lookups | served | hit rate | served error [Wilson 95%] |",
            file=console,
        )
        print("|---|---|---|---|---|---|", file=console)
        for env, res in results.items():
            for variant, r in res["headline"].items():
                err = (
                    f"{r['served_error_rate']:.3f} [{r['served_error_wilson_lo']:.3f}, "
                    f"{r['served_error_wilson_hi']:.3f}]"
                    if r["served"]
                    else "-"
                )
                if variant.startswith("oracle"):
                    err = "0 (knows every label)"
                print(
                    f"| {env} | {variant} | {r['lookups']} | {r['served']} | "
                    f"{r['hit_rate']:.3f} | {err} |",
                    file=console,
                )
            print(
                f"| {env} | encode p50 ms | MiniLM {res['minilm_encode_p50_ms']:.1f} | "
                f"learned {res['learned_encode_p50_ms']:.2f} | "
                f"verifier {res['verifier_pair_p50_ms']:.2f} per pair | |",
                file=console,
            )
        print_reliability(results, console)
        print(f"wrote {args.out / 'fidelity.json'} and {args.out / 'fidelity.png'}", file=console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
