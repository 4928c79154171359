"""Text environments by id: one place that maps ``--env NAME`` to an env class, its games and its
episode length."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TypedDict

TEXT_ENVS = ("textworld", "alfworld", "babyai")
# The generated suite of each env (``cachellm-rl games make --suite SUITE``) and its folder.
ENV_SUITES = {"textworld": "cooking", "alfworld": "alfworld-gen", "babyai": "babyai"}
DEFAULT_SUITES = {env: f"data/games/{suite}" for env, suite in ENV_SUITES.items()}
# Episode step limits the suite uses by default (long enough for the expert's episodes).
DEFAULT_MAX_EPISODE_STEPS = {"textworld": 30, "alfworld": 50, "babyai": 64}


class SuiteCounts(TypedDict, total=False):
    """The seed and split sizes every suite config takes (a missing size keeps its default)."""

    seed: int
    n_train: int
    n_valid: int
    n_test: int


def check_env_id(env_id: str) -> str:
    """``env_id`` if known, else a ValueError listing the known ids."""
    if env_id not in TEXT_ENVS:
        raise ValueError(f"unknown env id {env_id!r}; known text envs: {list(TEXT_ENVS)}")
    return env_id


def env_of_suite(suite: str) -> str:
    """The env id that plays the games of ``suite`` (e.g. ``alfworld-gen`` -> ``alfworld``)."""
    for env_id, s in ENV_SUITES.items():
        if s == suite:
            return env_id
    raise ValueError(f"unknown game suite {suite!r}; known: {list(ENV_SUITES.values())}")


def official_alfworld_dir() -> Path | None:
    """``$ALFWORLD_DATA`` when it holds the official ALFWorld data (``json_2.1.1``, fetched
    with ``alfworld-download``), else None."""
    from cachellm_rl.envs.alfworld import is_official_data

    data = os.environ.get("ALFWORLD_DATA")
    return Path(data) if data and is_official_data(data) else None


def default_games_dir(env_id: str) -> Path:
    """The games ``env_id`` plays by default: for ALFWorld the official data when
    ``$ALFWORLD_DATA`` holds it, otherwise where ``cachellm-rl games make`` puts the env's
    generated suite."""
    if check_env_id(env_id) == "alfworld" and (official := official_alfworld_dir()):
        return official
    return Path(DEFAULT_SUITES[env_id])


def has_games(env_id: str, games_dir: str | Path) -> bool:
    """Whether ``games_dir`` holds games of ``env_id`` (a generated suite's manifest, or for
    ALFWorld the official data)."""
    from cachellm_rl.envs.games import MANIFEST

    if (Path(games_dir) / MANIFEST).is_file():
        return True
    if check_env_id(env_id) != "alfworld":
        return False
    from cachellm_rl.envs.alfworld import is_official_data

    return is_official_data(games_dir)


def env_split_games(env_id: str, games_dir: str | Path, split: str) -> list[str]:
    """The games of ``split`` in ``games_dir``: a generated suite (its manifest) or, for
    ALFWorld, the official data. Raises ValueError for a split the folder does not have."""
    if check_env_id(env_id) == "alfworld":
        from cachellm_rl.envs.alfworld import alfworld_split_games

        try:
            return alfworld_split_games(games_dir, split)
        except FileNotFoundError as e:
            raise ValueError(str(e)) from e
    from cachellm_rl.envs.games import split_games

    return split_games(games_dir, split)


def default_prior_dir(env_id: str) -> Path:
    """Where ``cachellm-rl prior train --env ENV`` writes the embedded prior by default."""
    return Path("artifacts/priors") / check_env_id(env_id)


def env_class(env_id: str):
    """The gymnasium env class of ``env_id`` (imported lazily)."""
    check_env_id(env_id)
    if env_id == "alfworld":
        from cachellm_rl.envs.alfworld import AlfWorldEnv

        return AlfWorldEnv
    if env_id == "babyai":
        from cachellm_rl.envs.babyai import BabyAIEnv

        return BabyAIEnv
    from cachellm_rl.envs.textworld_env import TextWorldEnv

    return TextWorldEnv


def make_text_env(env_id: str, config: Mapping):
    """An env of ``env_id`` built from a plain config mapping."""
    return env_class(env_id)(dict(config))


def make_games(
    env_id: str,
    out_dir: str | Path,
    *,
    n_train: int | None = None,
    n_valid: int | None = None,
    n_test: int | None = None,
    seed: int = 1234,
    progress: bool = True,
) -> dict:
    """Generate (idempotently) the default game suite of ``env_id`` into ``out_dir``.

    Split sizes left as None take the suite config's defaults.

    Returns:
        The suite's manifest, with ``generated`` (games made by this call).
    """
    counts: SuiteCounts = {"seed": seed}
    if n_train is not None:
        counts["n_train"] = n_train
    if n_valid is not None:
        counts["n_valid"] = n_valid
    if n_test is not None:
        counts["n_test"] = n_test
    if check_env_id(env_id) == "alfworld":
        from cachellm_rl.envs.alfworld_gen import AlfWorldSuiteConfig, make_alfworld_suite

        return make_alfworld_suite(AlfWorldSuiteConfig(**counts), out_dir, progress=progress)
    if env_id == "babyai":
        from cachellm_rl.envs.babyai import BabyAISuiteConfig, make_babyai_suite

        return make_babyai_suite(BabyAISuiteConfig(**counts), out_dir, progress=progress)
    from cachellm_rl.envs.games import SuiteConfig, make_suite

    return make_suite(SuiteConfig(**counts), out_dir, progress=progress)
