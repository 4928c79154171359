"""The embedded default prior of a text environment, end to end: demonstrations from the train
split, training, and the direct-prior (argmax) success on each split as the calibration check.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from cachellm_rl.envs.demos import collect_demonstrations
from cachellm_rl.envs.registry import (
    check_env_id,
    default_games_dir,
    env_split_games,
    make_text_env,
)
from cachellm_rl.prior.augment import renumber_instances
from cachellm_rl.prior.prompts import PromptConfig
from cachellm_rl.prior.train import (
    TRAIN_REPORT,
    PriorTrainConfig,
    decision_prompt,
    evaluate_direct_prior,
    train_prior,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PriorRecipe:
    """How an env's default prior is trained (calibrated per env; see docs/priors.md).

    Attributes:
        episodes_per_game: Demonstration episodes per train game (the first unperturbed).
        perturb_probability: Chance of a random step in the other episodes (recoveries).
        epochs: Training epochs (training stops after exactly this many: reproducible).
        max_minutes: Safety cap on training time (reported when it fires).
        renumber_copies: Extra copies of each demonstration with its instance numbers
            relabelled (:func:`~cachellm_rl.prior.augment.renumber_instances`).
        dropout: The model's dropout in training (GPT-2's 0.1; 0 trains about twice as fast
            on a CPU, see :class:`~cachellm_rl.prior.tiny_model.TinyLMConfig`).
        list_candidates: List the admissible actions in the prompt. Off for TextWorld: the
            candidates are scored after the prompt anyway, the list is about half the prompt's
            tokens in the states RL reaches, and the prior trained without it measured level
            direct success (docs/priors.md).
    """

    episodes_per_game: int = 5
    perturb_probability: float = 0.25
    epochs: int = 8
    max_minutes: float = 120.0
    renumber_copies: int = 0
    dropout: float = 0.1
    list_candidates: bool = True


PRIOR_RECIPES = {
    "textworld": PriorRecipe(list_candidates=False),
    "alfworld": PriorRecipe(episodes_per_game=2, epochs=9, renumber_copies=1),
    "babyai": PriorRecipe(episodes_per_game=3, epochs=27),
}


def train_embedded_prior(
    env_id: str,
    *,
    games_dir: str | Path | None,
    out_dir: str | Path,
    episodes_per_game: int | None = None,
    perturb_probability: float | None = None,
    epochs: int | None = None,
    max_minutes: float | None = None,
    renumber_copies: int | None = None,
    dropout: float | None = None,
    list_candidates: bool | None = None,
    evaluate: bool = True,
    eval_splits: tuple[str, ...] = ("valid", "test"),
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train the default prior of ``env_id`` from its train split and measure it.

    Args:
        env_id: Text env id (see :mod:`cachellm_rl.envs.registry`).
        games_dir: Generated suite folder (default: the env's default suite).
        out_dir: Model folder to write.
        episodes_per_game: Demonstration episodes per train game (None: the env's recipe).
        perturb_probability: Chance of a random step in perturbed demonstration episodes
            (None: the env's recipe).
        epochs: Training epochs (None: the env's recipe).
        max_minutes: Safety cap on training time (None: the env's recipe).
        renumber_copies: Renumbered copies per demonstration (None: the env's recipe).
        dropout: The model's dropout in training (None: the env's recipe).
        list_candidates: List the admissible actions in the prompt (None: the env's recipe).
            False trains a prior on shorter prompts (state, inventory, then the scored
            action), which costs about half the scoring on TextWorld's long action lists;
            the layout is saved with the model (``prompt_layout.json``).
        evaluate: Measure direct-prior success on ``eval_splits`` afterwards.
        eval_splits: Splits to measure.
        seed: Seed of demonstrations and training.
        progress: Show progress bars.

    Returns:
        The training report, with ``direct_success`` per split when evaluated.
    """
    recipe = PRIOR_RECIPES[check_env_id(env_id)]
    episodes_per_game = episodes_per_game or recipe.episodes_per_game
    perturb_probability = (
        recipe.perturb_probability if perturb_probability is None else perturb_probability
    )
    epochs = epochs or recipe.epochs
    max_minutes = max_minutes or recipe.max_minutes
    renumber_copies = recipe.renumber_copies if renumber_copies is None else renumber_copies
    if renumber_copies < 0:
        raise ValueError(f"renumber_copies must be >= 0, got {renumber_copies}")
    # checked before the (slow) demonstrations
    dropout = recipe.dropout if dropout is None else dropout
    list_candidates = recipe.list_candidates if list_candidates is None else list_candidates
    cfg = PriorTrainConfig(epochs=epochs, max_minutes=max_minutes, seed=seed)
    cfg = replace(cfg, model=replace(cfg.model, dropout=dropout))
    games_dir = Path(games_dir) if games_dir else default_games_dir(env_id)
    train_games = env_split_games(env_id, games_dir, "train")
    env = make_text_env(env_id, {"games": train_games, "expert": True, "game_order": "cycle"})
    cache = demos_cache_path(out_dir)
    key = _demos_key(env_id, train_games, episodes_per_game, perturb_probability, seed)
    loaded = _load_demos(cache, key)
    if loaded is None:
        demos, stats = collect_demonstrations(
            env,
            train_games,
            episodes_per_game=episodes_per_game,
            perturb_probability=perturb_probability,
            seed=seed,
            progress=progress,
        )
        _save_demos(cache, key, (demos, stats))
    else:
        demos, stats = loaded
        logger.info("demonstrations loaded from %s (an interrupted training's)", cache)
    layout = None if list_candidates else PromptConfig(candidates_header=None)
    examples = [(decision_prompt(d.decision, layout), d.action) for d in demos]
    rng = np.random.default_rng(seed)
    for _ in range(renumber_copies):
        for d in demos:
            decision, action = renumber_instances(d.decision, d.action, rng)
            examples.append((decision_prompt(decision, layout), action))
    report = train_prior(
        examples,
        out_dir,
        cfg,
        extra_report={
            "env": env_id,
            "games_dir": str(games_dir),
            "train_games": len(train_games),
            "demonstrations": asdict(stats),
            "episodes_per_game": episodes_per_game,
            "perturb_probability": perturb_probability,
            "renumber_copies": renumber_copies,
        },
        prompt_config=layout,
        progress=progress,
    )
    cache.unlink(missing_ok=True)  # the prior exists now; a new training collects afresh
    if evaluate:
        report["direct_success"] = evaluate_embedded_prior(
            env_id,
            games_dir=games_dir,
            model_dir=out_dir,
            splits=("train", *eval_splits),
            progress=progress,
        )
        (Path(out_dir) / TRAIN_REPORT).write_text(json.dumps(report, indent=1))
    env.close()
    return report


def demos_cache_path(out_dir: str | Path) -> Path:
    """Where a training keeps its demonstrations until the prior is saved (``<out>.demos.pkl``):
    a training stopped after collecting them resumes from there instead of collecting again."""
    out = Path(out_dir)
    return out.with_name(out.name + ".demos.pkl")


def _demos_key(env_id, games, episodes_per_game, perturb_probability, seed) -> dict:
    # The same games (by name, size and modification time), episodes, perturbation and seed
    # give the same demonstrations; anything else collects afresh.
    files = []
    for g in games:
        st = Path(g).stat()
        files.append([str(g), st.st_size, st.st_mtime_ns])
    return {
        "format": 1,
        "env": env_id,
        "games": files,
        "episodes_per_game": episodes_per_game,
        "perturb_probability": perturb_probability,
        "seed": seed,
    }


def _load_demos(path: Path, key: dict):
    if not path.is_file():
        return None
    try:
        with path.open("rb") as f:
            stored_key, value = pickle.load(f)
    except Exception as exc:  # a torn or foreign file: collect again
        logger.warning("ignoring unreadable demonstrations cache %s: %r", path, exc)
        return None
    return value if stored_key == key else None


def _save_demos(path: Path, key: dict, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)  # e.g. artifacts/priors/ on a fresh clone
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        pickle.dump((key, value), f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(path)


def evaluate_embedded_prior(
    env_id: str,
    *,
    games_dir: str | Path | None,
    model_dir: str | Path,
    splits: tuple[str, ...] = ("train", "valid", "test"),
    max_games: int = 60,
    progress: bool = True,
) -> dict:
    """Direct-prior (argmax, no learning) success of a prior on each split of a suite.

    Args:
        env_id: Text env id.
        games_dir: Generated suite folder (default: the env's default suite).
        model_dir: Prior model folder (Hugging Face format).
        splits: Splits to measure (a split the suite does not have is skipped).
        max_games: At most the first this many games of each split.
        progress: Show progress bars.

    Returns:
        ``{split: {success_rate, mean_return, mean_steps, games}}``.
    """
    from cachellm_rl.prior.scoring import CandidateScorer, ScorerConfig

    games_dir = Path(games_dir) if games_dir else default_games_dir(env_id)
    scorer = CandidateScorer(ScorerConfig(model_dir=str(model_dir), device="cpu"))
    out = {}
    for split in splits:
        try:
            games = env_split_games(env_id, games_dir, split)[:max_games]
        except ValueError:
            continue
        env = make_text_env(env_id, {"games": games, "expert": False})
        res = evaluate_direct_prior(scorer, env, games, progress=progress)
        env.close()
        out[split] = {
            "success_rate": res.success_rate,
            "mean_return": res.mean_return,
            "mean_steps": res.mean_steps,
            "games": len(games),
        }
    return out
