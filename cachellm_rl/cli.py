"""``cachellm-rl`` command line."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

app = typer.Typer(no_args_is_help=True, help="cachellm_rl: RL with cached language-model priors.")
prior_app = typer.Typer(no_args_is_help=True, help="Language-model priors.")
cache_app = typer.Typer(no_args_is_help=True, help="The prior cache.")
games_app = typer.Typer(no_args_is_help=True, help="Generated text games.")
data_app = typer.Typer(no_args_is_help=True, help="Offline datasets.")
app.add_typer(prior_app, name="prior")
app.add_typer(cache_app, name="cache")
app.add_typer(games_app, name="games")
app.add_typer(data_app, name="data")

DEFAULT_GAMES_DIR = Path("data/games")
DEFAULT_PRIOR_DIR = Path("artifacts/priors")

F = TypeVar("F", bound=Callable)


def fail(message: str) -> typer.Exit:
    """Print a user error as one line on stderr; return the exit (code 2) to raise."""
    print(f"cachellm-rl: error: {message}", file=sys.stderr)
    return typer.Exit(code=2)


def user_errors(fn: F) -> F:
    """Turn the library's input errors (``ValueError``, ``FileNotFoundError``) into one line
    on stderr and exit code 2, without a traceback."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError) as e:
            raise fail(str(e).splitlines()[0] if str(e) else type(e).__name__) from None

    return wrapped  # type: ignore[return-value]


@app.command()
@user_errors
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
@user_errors
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
        prompt=build_prompt(
            state=state,
            objective=objective,
            candidates=candidate,
            config=scorer.prompt_config,  # the layout the model was trained with
        ),
        candidates=tuple(candidate),
    )
    (resp,) = scorer.score([req])
    for c, lp in sorted(zip(candidate, resp.logp.tolist(), strict=True), key=lambda x: -x[1]):
        print(f"{float(np.exp(lp)):.4f}  {c}")
    print(f"model_version {resp.model_version}")


@prior_app.command("make-tiny")
@user_errors
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
@user_errors
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

    env_id = env_of_suite(suite)
    target = out or DEFAULT_GAMES_DIR / suite
    if env_id == "textworld" and food_splits:
        from cachellm_rl.envs.games import SuiteConfig, make_suite
        from cachellm_rl.envs.registry import SuiteCounts

        counts: SuiteCounts = {"seed": seed}
        for key, value in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test)):
            if value is not None:
                counts[key] = value  # type: ignore[literal-required]
        cfg = SuiteConfig(**counts, food_splits=True)
        manifest = make_suite(cfg, target)
    elif food_splits:
        raise ValueError("--food-splits applies to the cooking suite only")
    else:
        manifest = make_games(
            env_id, target, n_train=n_train, n_valid=n_valid, n_test=n_test, seed=seed
        )
    n, made = len(manifest["games"]), manifest["generated"]
    print(f"{n} games in {target} ({made} generated, {n - made} kept)")


@data_app.command("make")
@user_errors
def data_make(
    env: Annotated[str, typer.Option(help="Text env: textworld, alfworld or babyai.")],
    policy: Annotated[
        str, typer.Option(help="Behaviour policy: random, medium or expert.")
    ] = "random",
    episodes: Annotated[
        int | None,
        typer.Option(help="Episodes (default: 600 for TextWorld and BabyAI, 500 for ALFWorld)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Dataset folder (default data/offline/<env>/<policy>).")
    ] = None,
    games: Annotated[
        Path | None, typer.Option(help="Game suite folder (default: the env's suite).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the behaviour's random choices.")] = 0,
    max_episode_steps: Annotated[
        int | None, typer.Option(help="Episode cap (default per env).")
    ] = None,
    medium_mix: Annotated[
        float | None,
        typer.Option(help="medium: random-step probability (default: calibrated to halfway)."),
    ] = None,
    calibration_episodes: Annotated[
        int, typer.Option(help="medium: episodes per calibration measurement.")
    ] = 30,
    progress: Annotated[bool, typer.Option(help="Progress bars.")] = True,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Library logs.")] = False,
) -> None:
    """Record a behaviour policy on the train split's games as an RLlib offline dataset
    (parquet through Ray Data, plus a dataset.json card); idempotent. Library logs go to
    <dataset>.log beside the dataset folder. See docs/offline.md."""
    from cachellm_rl.logs import run_log
    from cachellm_rl.offline.datasets import (
        DEFAULT_EPISODES,
        DatasetConfig,
        default_dataset_dir,
        make_dataset,
    )

    _check_env_option(env)
    cfg = DatasetConfig(
        env=env,
        policy=policy,
        episodes=episodes or DEFAULT_EPISODES[env],
        games_dir=str(games) if games else None,
        seed=seed,
        max_episode_steps=max_episode_steps,
        medium_mix=medium_mix,
        calibration_episodes=calibration_episodes,
    )
    folder = out or default_dataset_dir(env, policy)
    with run_log(_beside(folder, ".log"), verbose=verbose) as console:
        _init_ray_for_data()
        say = functools.partial(print, file=console)
        card = make_dataset(cfg, folder, progress=progress, bar_file=console, log=say)
        keys = ("episodes", "transitions", "distinct_states", "behaviour_success", "medium_mix")
        say(json.dumps({k: card[k] for k in keys}, indent=1))


def _beside(folder: Path, suffix: str) -> Path:
    """``data/offline/x/random`` -> ``data/offline/x/random<suffix>``: a run's log file kept
    beside its output folder (which the run may replace as a whole)."""
    folder = Path(folder)
    return folder.with_name(folder.name + suffix)


def _init_ray_for_data() -> None:
    """Start a local Ray for a data command; Ray Data's progress and INFO lines are not for
    this CLI."""
    import logging

    from cachellm_rl.config import init_ray

    init_ray(num_cpus=2, log_to_driver=False)
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


@data_app.command("annotate")
@user_errors
def data_annotate(
    dataset: Annotated[Path, typer.Option(help="Dataset folder (made by `data make`).")],
    preset: Annotated[
        str, typer.Option(help="Cache preset: uncached, exact_only, static or adaptive.")
    ] = "exact_only",
    prior_model: Annotated[
        Path | None,
        typer.Option(help="Prior model folder (default: the env's embedded prior)."),
    ] = None,
    prior_temperature: Annotated[float, typer.Option(help="T_prior of the scorer.")] = 1.0,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default <dataset>-prior-<preset>).")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Progress bar.")] = True,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Library logs.")] = False,
) -> None:
    """Add the prior's log-probabilities to a dataset through the shared cache actor and the
    Serve prior, under a cache preset; counts LM queries per preset. Library logs go to
    <output>.log beside the output folder. See docs/offline.md."""
    from cachellm_rl.algorithms.ps_dqn.methods import MethodSettings
    from cachellm_rl.config import init_ray
    from cachellm_rl.envs.registry import default_prior_dir
    from cachellm_rl.logs import run_log
    from cachellm_rl.offline.annotate import ANNOTATION_PRESETS, annotate_dataset, annotated_dir
    from cachellm_rl.offline.datasets import read_card
    from cachellm_rl.prior.scoring import ScorerConfig
    from cachellm_rl.prior.server import PriorServerConfig, deploy_prior_server

    card = read_card(dataset)
    if card is None:
        raise ValueError(f"{dataset} is not a dataset (no dataset.json); make it with `data make`")
    model = prior_model or default_prior_dir(card["env"])
    if not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(f"no prior model in {model}; train it with `prior train`")
    if preset not in ANNOTATION_PRESETS:
        raise ValueError(f"unknown cache preset {preset!r}; known: {list(ANNOTATION_PRESETS)}")
    target = out or annotated_dir(dataset, preset)
    with run_log(_beside(target, ".log"), verbose=verbose) as console:
        init_ray(num_cpus=2, log_to_driver=False)
        scorer = ScorerConfig(
            model_dir=str(Path(model).resolve()), prior_temperature=prior_temperature
        )
        deploy_prior_server(PriorServerConfig(scorer=scorer, num_cpus=0))
        say = functools.partial(print, file=console)
        result = annotate_dataset(
            dataset,
            preset,
            MethodSettings(),
            out=target,
            progress=progress,
            bar_file=console,
            log=say,
        )
        say(json.dumps(result["annotation"], indent=1))


def _check_env_option(env: str) -> None:
    from cachellm_rl.envs.registry import check_env_id

    check_env_id(env)


@prior_app.command("train")
@user_errors
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
    dropout: Annotated[
        float | None,
        typer.Option(help="Model dropout in training (default per env; 0 trains ~2x faster)."),
    ] = None,
    max_minutes: Annotated[
        float | None,
        typer.Option(help="Safety cap on training minutes (training ends after --epochs)."),
    ] = None,
    list_candidates: Annotated[
        bool | None,
        typer.Option(
            help="List the admissible actions in the prompt (default per env; off: shorter "
            "prompts, about half the scoring cost on long action lists; the layout is saved "
            "with the model)."
        ),
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
        dropout=dropout,
        max_minutes=max_minutes,
        list_candidates=list_candidates,
        evaluate=evaluate,
        seed=seed,
    )
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))


@prior_app.command("evaluate")
@user_errors
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
@user_errors
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
    from cachellm_rl.prior.prompts import load_prompt_config
    from cachellm_rl.prior.train import decision_prompt

    _check_env_option(env)
    layout = load_prompt_config(model)  # the adapter is scored in its base model's layout
    if shots < 1:
        raise ValueError("--shots must be >= 1")
    train = env_split_games(env, games or default_games_dir(env), "train")[:shots]
    text_env = make_text_env(env, {"games": train, "expert": True})
    demos, _ = collect_demonstrations(text_env, train, episodes_per_game=1, seed=seed)
    text_env.close()
    examples = [(decision_prompt(d.decision, layout), d.action) for d in demos]
    adapter = finetune_lora(
        model, examples, out_dir=out, config=FinetuneConfig(epochs=epochs, seed=seed)
    )
    print(f"{len(train)} episodes, {len(examples)} expert decisions; adapter saved to {adapter}")


@cache_app.command("inspect")
@user_errors
def cache_inspect(
    snapshot: Annotated[Path, typer.Argument(help="Snapshot root (with LATEST) or snap-* folder.")],
) -> None:
    """Print the size, parameters and counters of a cache snapshot."""
    from cachellm_rl.cache.adaptive import AdaptiveCache

    cache = AdaptiveCache.restore(snapshot)
    s = cache.snapshot_stats()
    out: dict[str, object] = {
        k: v for k, v in s.as_flat_dict().items() if not k.startswith("latency")
    }
    out.update(
        model_version=cache.model_version,
        encoder_tag=cache.encoder_tag,
        reuse_rule=cache.config.reuse_rule,
        correctness_labels=cache.correctness.num_labels,
        min_servable_similarity=cache.correctness.min_servable_similarity(),
        stored_labels=len(cache.labels),
    )
    print(json.dumps(out, indent=2))


@cache_app.command("train-encoder")
@user_errors
def cache_train_encoder(
    labels: Annotated[
        Path,
        typer.Argument(help="A cache snapshot (its labels.jsonl) or a labels .jsonl file."),
    ],
    out: Annotated[Path, typer.Option(help="Folder for the learned encoder.")],
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    verifier_epochs: Annotated[
        int, typer.Option(help="Epochs of the reuse verifier trained after it (0: none).")
    ] = 6,
) -> None:
    """Train the decision-aware state encoder on a cache's reuse labels (pairs of state texts
    and whether reusing one's prior for the other was correct), then its reuse verifier on the
    same labels (texts and the new encoder's cosine only: labels keep no candidates or
    priors)."""
    from cachellm_rl.cache.adaptive import AdaptiveCache
    from cachellm_rl.cache.learned_encoder import EncoderTrainConfig, train_decision_encoder
    from cachellm_rl.cache.verifier import (
        VerifierConfig,
        VerifierPair,
        VerifierTrainConfig,
        train_verifier,
    )

    if verifier_epochs < 0:
        raise ValueError(f"--verifier-epochs must be >= 0, got {verifier_epochs}")

    if labels.is_file():
        lines = labels.read_text().splitlines()
    else:
        snap = labels if (labels / "meta.json").is_file() else AdaptiveCache.latest_snapshot(labels)
        if snap is None or not (snap / "labels.jsonl").is_file():
            raise FileNotFoundError(f"no cache snapshot with labels.jsonl under {str(labels)!r}")
        lines = (snap / "labels.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    usable = [r for r in records if r.get("query_text") and r.get("neighbour_text")]
    ys = [bool(r["correct"]) for r in usable]
    if len(usable) < 20 or all(ys) or not any(ys):
        raise ValueError(
            f"{labels}: {len(usable)} labels with both texts "
            f"({sum(ys)} correct): need >= 20 with both outcomes"
        )
    enc, losses = train_decision_encoder(
        [r["query_text"] for r in usable],
        [r["neighbour_text"] for r in usable],
        ys,
        train=EncoderTrainConfig(epochs=epochs, seed=seed),
        progress=True,
    )
    if verifier_epochs:
        a = enc.encode([r["query_text"] for r in usable])
        b = enc.encode([r["neighbour_text"] for r in usable])
        cos = (a * b).sum(axis=1).tolist()
        pairs = [
            VerifierPair(r["query_text"], r["neighbour_text"], c)
            for r, c in zip(usable, cos, strict=True)
        ]
        verifier, _ = train_verifier(
            pairs,
            ys,
            config=VerifierConfig(prior_features=False, candidate_features=False, seed=seed),
            train=VerifierTrainConfig(epochs=verifier_epochs, seed=seed),
            progress=True,
        )
        enc.attach_verifier(verifier)
    enc.save(out)
    print(
        f"{len(usable)} labels ({sum(ys)} correct); loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
        f"encoder {enc.tag}{' with its reuse verifier' if verifier_epochs else ''} saved to {out}"
    )


@app.command("evaluate")
@user_errors
def evaluate(
    checkpoint: Annotated[
        Path, typer.Option(help="A checkpoint folder (a results folder's checkpoints/<run>).")
    ],
    env: Annotated[str, typer.Option(help="Environment: textworld, alfworld or babyai.")],
    games: Annotated[
        Path | None, typer.Option(help="Game suite folder (default: the env's suite).")
    ] = None,
    split: Annotated[str, typer.Option(help="Split of the suite to play.")] = "test",
    num_games: Annotated[int, typer.Option(help="The first N games of the split (0 = all).")] = 0,
    prior_model: Annotated[
        Path | None,
        typer.Option(help="Prior model folder (default: the one the checkpoint was trained with)."),
    ] = None,
    cache: Annotated[
        bool,
        typer.Option(help="Read the prior through a shared cache actor and Serve (needs Ray)."),
    ] = False,
    prior_weight: Annotated[
        float | None,
        typer.Option(help="Play with this prior weight beta instead of the checkpoint's."),
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option(help="Play at this fixed T instead of the schedule's final T."),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the results as JSON here.")
    ] = None,
) -> None:
    """Play a trained agent greedily (argmax of its posterior) on a suite's games.

    The checkpoint's metadata must match the env, its observation encoding and the prior
    (model version) given; otherwise nothing is played. Prints success and return.
    """
    from cachellm_rl.algorithms.ps_dqn.checkpoints import evaluate_checkpoint

    _check_env_option(env)
    if num_games < 0:
        raise ValueError("--num-games must be >= 0")
    if prior_weight is not None and not prior_weight >= 0:
        raise ValueError(f"--prior-weight must be >= 0, got {prior_weight}")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {temperature}")
    res = evaluate_checkpoint(
        checkpoint,
        env=env,
        games_dir=games,
        split=split,
        num_games=num_games,
        prior_model=prior_model,
        through_cache=cache,
        prior_weight=prior_weight,
        temperature=temperature,
    )
    for game, won in res["per_game_success"].items():
        print(f"{'won ' if won else 'lost'}  {game}")
    played_at = (
        f", beta {res['prior_weight']:g}, T {res['temperature']:g}"
        if res["prior_weight"] is not None
        else ""
    )
    print(
        f"{res['method']} ({res['protocol']}, {res['env_steps']} env steps{played_at}): success "
        f"{res['success']:.3f} over {res['games']} games, mean return {res['return_mean']:.3f}"
    )
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(res, indent=1))


@app.command("tune")
@user_errors
def tune_command(
    space: Annotated[
        str, typer.Option(help="Search space in tune_spaces: cache_meta, posterior, ...")
    ] = "cache_meta",
    env: Annotated[str, typer.Option(help="Environment the trials train on.")] = "textworld",
    method: Annotated[str, typer.Option(help="Cached method to tune.")] = "adaptive",
    num_samples: Annotated[int, typer.Option(help="Trials.")] = 8,
    trial_env_steps: Annotated[int, typer.Option(help="Env steps per trial.")] = 3000,
    num_games: Annotated[int, typer.Option(help="Valid-split games (0 = all).")] = 10,
    lambda_q: Annotated[
        float, typer.Option(help="Objective: success - lambda_q * LM queries per decision.")
    ] = 0.2,
    searcher: Annotated[str, typer.Option(help="optuna or random.")] = "optuna",
    max_concurrent: Annotated[int, typer.Option(help="Trials at once.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of every trial.")] = 0,
    games: Annotated[Path | None, typer.Option(help="Game suite folder.")] = None,
    prior_model: Annotated[Path | None, typer.Option(help="Prior model folder.")] = None,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of a local Ray.")] = None,
    out: Annotated[Path | None, typer.Option(help="Results folder (resumes if there).")] = None,
    progress: Annotated[bool, typer.Option(help="Progress bar.")] = True,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Library logs.")] = False,
) -> None:
    """Ray Tune sweep of a cached method's settings on the valid games (writes best.json,
    which `experiments/text_suite.py --settings` reads). See docs/tuning.md."""
    from cachellm_rl.results import new_results_dir
    from cachellm_rl.tuning import SweepConfig, sweep_main

    _check_env_option(env)
    if prior_model is not None and not (prior_model / "config.json").is_file():
        raise ValueError(f"--prior-model {prior_model} holds no model")
    cfg = SweepConfig(
        env=env,
        space=space,
        method=method,
        num_samples=num_samples,
        trial_env_steps=trial_env_steps,
        num_games=num_games,
        seed=seed,
        lambda_q=lambda_q,
        searcher=searcher,
        max_concurrent_trials=max_concurrent,
        games_dir=str(games) if games else None,
        prior_model=str(prior_model) if prior_model else None,
    )
    folder = new_results_dir(f"tune-{space}", out)
    code = sweep_main(cfg, folder, verbose=verbose, num_cpus=num_cpus, progress=progress)
    if code:
        raise typer.Exit(code=code)


if __name__ == "__main__":
    app()
