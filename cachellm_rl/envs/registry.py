"""Text environments by id: one place that maps ``--env NAME`` to an env class and its games."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

TEXT_ENVS = ("textworld", "alfworld")
DEFAULT_SUITES = {"textworld": "data/games/cooking", "alfworld": "data/games/alfworld-gen"}


def check_env_id(env_id: str) -> str:
    """``env_id`` if known, else a ValueError listing the known ids."""
    if env_id not in TEXT_ENVS:
        raise ValueError(f"unknown env id {env_id!r}; known text envs: {list(TEXT_ENVS)}")
    return env_id


def default_games_dir(env_id: str) -> Path:
    """Where ``cachellm-rl games make`` puts the games of ``env_id`` by default."""
    return Path(DEFAULT_SUITES[check_env_id(env_id)])


def env_class(env_id: str):
    """The gymnasium env class of ``env_id`` (imported lazily)."""
    if check_env_id(env_id) == "alfworld":
        from cachellm_rl.envs.alfworld_env import AlfWorldEnv

        return AlfWorldEnv
    from cachellm_rl.envs.textworld_env import TextWorldEnv

    return TextWorldEnv


def make_text_env(env_id: str, config: Mapping):
    """An env of ``env_id`` built from a plain config mapping."""
    return env_class(env_id)(dict(config))
