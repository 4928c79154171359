"""``cachellm-rl`` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, help="cachellm_rl: RL with cached language-model priors.")
prior_app = typer.Typer(no_args_is_help=True, help="Language-model priors.")
cache_app = typer.Typer(no_args_is_help=True, help="The prior cache.")
games_app = typer.Typer(no_args_is_help=True, help="Generated text games.")
app.add_typer(prior_app, name="prior")
app.add_typer(cache_app, name="cache")
app.add_typer(games_app, name="games")

DEFAULT_GAMES_DIR = Path("data/games")
DEFAULT_PRIOR_DIR = Path("artifacts/priors")


@app.command()
def info() -> None:
    """Print versions and what hardware the scorer would use."""
    import faiss
    import ray
    import torch
    import transformers

    import cachellm_rl

    print(
        json.dumps(
            {
                "cachellm_rl": cachellm_rl.__version__,
                "ray": ray.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "faiss": faiss.__version__,
                "cuda": torch.cuda.is_available(),
                "faiss_gpus": getattr(faiss, "get_num_gpus", lambda: 0)(),
            },
            indent=2,
        )
    )


@prior_app.command("score")
def prior_score(
    model: Annotated[Path, typer.Option(help="Local Hugging Face model directory.")],
    state: Annotated[str, typer.Option(help="State / observation text.")],
    candidate: Annotated[list[str], typer.Option(help="A candidate action (repeat the option).")],
    objective: Annotated[str, typer.Option(help="Task objective.")] = "",
    temperature: Annotated[float, typer.Option(help="Prior temperature T_prior.")] = 1.0,
) -> None:
    """Score candidate actions of one state with a local model and print the prior."""
    import numpy as np

    from cachellm_rl.contracts import PriorRequest
    from cachellm_rl.prior.prompts import build_prompt
    from cachellm_rl.prior.scoring import CandidateScorer, ScorerConfig

    scorer = CandidateScorer(ScorerConfig(model_dir=str(model), prior_temperature=temperature))
    req = PriorRequest(
        prompt=build_prompt(state=state, objective=objective, candidates=candidate),
        candidates=tuple(candidate),
    )
    (resp,) = scorer.score([req])
    for c, lp in sorted(zip(candidate, resp.logp.tolist(), strict=True), key=lambda x: -x[1]):
        print(f"{float(np.exp(lp)):.4f}  {c}")
    print(f"model_version {resp.model_version}")


@prior_app.command("make-tiny")
def prior_make_tiny(
    out: Annotated[Path, typer.Argument(help="Directory to write the model into.")],
    corpus: Annotated[
        Path | None, typer.Option(help="Text file whose words form the vocabulary.")
    ] = None,
) -> None:
    """Save an untrained small GPT-2 with a word tokenizer (for trying the pipeline)."""
    from cachellm_rl.prior.tiny_model import make_tiny_causal_lm

    texts = corpus.read_text().splitlines() if corpus else ["go north", "take the key"]
    make_tiny_causal_lm(out, texts)
    print(f"wrote {out}")


@games_app.command("make")
def games_make(
    suite: Annotated[
        str, typer.Option(help="Game suite: cooking, alfworld-gen or babyai.")
    ] = "cooking",
    out: Annotated[
        Path | None, typer.Option(help="Suite folder (default data/games/<suite>).")
    ] = None,
    n_train: Annotated[
        int | None,
        typer.Option(help="Train games (the prior learns from these; default per suite)."),
    ] = None,
    n_valid: Annotated[int | None, typer.Option(help="Valid games (default per suite).")] = None,
    n_test: Annotated[
        int | None, typer.Option(help="Test games (held out from the prior; default per suite).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Base seed of the suite.")] = 1234,
    food_splits: Annotated[
        bool, typer.Option(help="Valid/test games use foods never seen in train games.")
    ] = False,
) -> None:
    """Generate a seeded game suite into train / valid / test splits (idempotent).

    ``alfworld-gen`` writes expert-solved ALFWorld games from the package's floor plans, split by
    floor plan; ``babyai`` writes bot-solved BabyAI level seeds. ``--food-splits`` applies to
    ``cooking`` only.
    """
    from cachellm_rl.envs.registry import env_of_suite, make_games

    try:
        env_id = env_of_suite(suite)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--suite") from e
    target = out or DEFAULT_GAMES_DIR / suite
    if env_id == "textworld" and food_splits:
        from cachellm_rl.envs.games import SuiteConfig, make_suite

        counts = {"n_train": n_train, "n_valid": n_valid, "n_test": n_test}
        cfg = SuiteConfig(
            **{k: v for k, v in counts.items() if v is not None}, seed=seed, food_splits=True
        )
        manifest = make_suite(cfg, target)
    elif food_splits:
        raise typer.BadParameter("--food-splits applies to the cooking suite only")
    else:
        manifest = make_games(
            env_id, target, n_train=n_train, n_valid=n_valid, n_test=n_test, seed=seed
        )
    n, made = len(manifest["games"]), manifest["generated"]
    print(f"{n} games in {target} ({made} generated, {n - made} kept)")


def _check_env_option(env: str) -> None:
    from cachellm_rl.envs.registry import check_env_id

    try:
        check_env_id(env)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--env") from e


@prior_app.command("train")
def prior_train(
    env: Annotated[
        str,
        typer.Option(
            help="Environment whose experts teach the prior: textworld, alfworld or babyai."
        ),
    ],
    games: Annotated[
        Path | None, typer.Option(help="Game suite folder (default: the env's suite).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Model folder (default artifacts/priors/<env>).")
    ] = None,
    episodes_per_game: Annotated[
        int | None, typer.Option(help="Demonstration episodes per game (default per env).")
    ] = None,
    perturb: Annotated[
        float | None, typer.Option(help="Chance of a random step, recoveries (default per env).")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs (default per env).")] = None,
    max_minutes: Annotated[
        float | None, typer.Option(help="Training time budget (default per env).")
    ] = None,
    evaluate: Annotated[bool, typer.Option(help="Measure direct-prior success after.")] = True,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Train the embedded default prior on the train split's expert demonstrations."""
    from cachellm_rl.prior.embedded import train_embedded_prior

    _check_env_option(env)
    report = train_embedded_prior(
        env,
        games_dir=games,
        out_dir=out or DEFAULT_PRIOR_DIR / env,
        episodes_per_game=episodes_per_game,
        perturb_probability=perturb,
        epochs=epochs,
        max_minutes=max_minutes,
        evaluate=evaluate,
        seed=seed,
    )
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))


@prior_app.command("evaluate")
def prior_evaluate(
    env: Annotated[str, typer.Option(help="Environment: textworld, alfworld or babyai.")],
    model: Annotated[
        Path | None, typer.Option(help="Prior model folder (default artifacts/priors/<env>).")
    ] = None,
    games: Annotated[
        Path | None, typer.Option(help="Game suite folder (default: the env's suite).")
    ] = None,
    split: Annotated[list[str] | None, typer.Option(help="Split to measure (repeat).")] = None,
    max_games: Annotated[int, typer.Option(help="At most this many games per split.")] = 60,
) -> None:
    """Direct-prior (argmax) success of a prior on the suite's splits."""
    from cachellm_rl.prior.embedded import evaluate_embedded_prior

    _check_env_option(env)
    res = evaluate_embedded_prior(
        env,
        games_dir=games,
        model_dir=model or DEFAULT_PRIOR_DIR / env,
        splits=tuple(split or ("valid", "test")),
        max_games=max_games,
    )
    print(json.dumps(res, indent=2))


@prior_app.command("finetune")
def prior_finetune(
    model: Annotated[Path, typer.Option(help="Local Hugging Face model directory (the base).")],
    shots: Annotated[int, typer.Option(help="Expert episodes (k) to fine-tune on.")] = 5,
    env: Annotated[str, typer.Option(help="Environment whose experts give the episodes.")] = (
        "textworld"
    ),
    games: Annotated[
        Path | None, typer.Option(help="Game suite folder (default: the env's suite).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Adapter folder (default <model>-lora beside it).")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Fine-tuning epochs.")] = 30,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """LoRA few-shot fine-tuning on k expert episodes of the train split; saves the adapter."""
    from cachellm_rl.envs.demos import collect_demonstrations
    from cachellm_rl.envs.registry import default_games_dir, env_split_games, make_text_env
    from cachellm_rl.prior.finetune import FinetuneConfig, finetune_lora
    from cachellm_rl.prior.train import decision_prompt

    _check_env_option(env)
    if shots < 1:
        raise typer.BadParameter("--shots must be >= 1")
    train = env_split_games(env, games or default_games_dir(env), "train")[:shots]
    text_env = make_text_env(env, {"games": train, "expert": True})
    demos, _ = collect_demonstrations(text_env, train, episodes_per_game=1, seed=seed)
    text_env.close()
    examples = [(decision_prompt(d.decision), d.action) for d in demos]
    adapter = finetune_lora(
        model, examples, out_dir=out, config=FinetuneConfig(epochs=epochs, seed=seed)
    )
    print(f"{len(train)} episodes, {len(examples)} expert decisions; adapter saved to {adapter}")


@cache_app.command("inspect")
def cache_inspect(
    snapshot: Annotated[Path, typer.Argument(help="Snapshot root (with LATEST) or snap-* folder.")],
) -> None:
    """Print the size, parameters and counters of a cache snapshot."""
    from cachellm_rl.cache.adaptive import AdaptiveCache

    cache = AdaptiveCache.restore(snapshot)
    s = cache.snapshot_stats()
    out = {k: v for k, v in s.as_flat_dict().items() if not k.startswith("latency")}
    out.update(model_version=cache.model_version, encoder_tag=cache.encoder_tag)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    app()
