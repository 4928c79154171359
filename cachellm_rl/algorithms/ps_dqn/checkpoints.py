"""RLlib checkpoints of trained agents with the metadata needed to reload them safely.

Every RL run of the text suite saves ``algo.save_to_path`` (RLlib's own checkpoint format)
plus ``cachellm_checkpoint.json``: the env, the observation encoding, the prior's model version,
the posterior (``beta`` and the temperature schedule), the protocol, the method, seed and env
steps, and the code revision. :func:`load_agent` rebuilds the trained RLModule in a fresh
process, and :func:`check_compatible` refuses a checkpoint whose env, observation encoding or
prior does not match what it is given. RLlib does not store the replay buffer in a checkpoint:
a resumed run refills it.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cachellm_rl.algorithms.ps_dqn.posterior import PosteriorConfig

METADATA_FILE = "cachellm_checkpoint.json"
MODULE_PATH = ("learner_group", "learner", "rl_module", "default_policy")


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the env or prior it is asked to run with."""


def code_revision() -> str | None:
    """The git commit of the working tree (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def save_checkpoint(algo, path: str | Path, metadata: Mapping) -> Path:
    """``algo.save_to_path(path)`` plus the metadata file (written last: a checkpoint folder
    with metadata is complete)."""
    path = Path(path).resolve()
    path.mkdir(parents=True, exist_ok=True)
    meta_file = path / METADATA_FILE
    meta_file.unlink(missing_ok=True)
    algo.save_to_path(str(path))
    tmp = meta_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(metadata), indent=1, default=str))
    tmp.replace(meta_file)
    return path


def read_metadata(path: str | Path) -> dict:
    """The metadata of a checkpoint folder; ValueError naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} is not a folder")
    meta = path / METADATA_FILE
    if not meta.is_file():
        raise ValueError(
            f"{path} is not a complete cachellm_rl checkpoint (no {METADATA_FILE}); give a "
            "folder from a results folder's checkpoints/"
        )
    return json.loads(meta.read_text())


def check_compatible(
    metadata: Mapping,
    *,
    env: str,
    obs_config: Mapping,
    prior_version: str | None,
) -> None:
    """Raise :class:`CheckpointMismatch` (one line, naming the field) when a checkpoint does not
    fit ``env``, the env's observation encoding ``obs_config`` or the prior whose model version
    is ``prior_version`` (None: no prior is used)."""
    if metadata.get("env") != env:
        raise CheckpointMismatch(
            f"checkpoint was trained on env {metadata.get('env')!r}, not {env!r}"
        )
    if dict(metadata.get("obs_config") or {}) != dict(obs_config):
        raise CheckpointMismatch(
            f"checkpoint observation encoding {metadata.get('obs_config')} differs from the "
            f"env's {dict(obs_config)}"
        )
    want = metadata.get("prior_version")
    if want is not None and prior_version is not None and want != prior_version:
        raise CheckpointMismatch(
            f"checkpoint was trained with prior version {want}, the given prior is "
            f"{prior_version} (pass the prior it was trained with: --prior-model)"
        )
    if want is not None and prior_version is None:
        raise CheckpointMismatch("checkpoint was trained with a prior: give one (--prior-model)")


def load_agent(path: str | Path):
    """The trained RLModule of a checkpoint (inference: greedy argmax of its posterior)."""
    import torch
    from ray.rllib.core.rl_module.rl_module import RLModule

    read_metadata(path)
    module_dir = Path(path).resolve().joinpath(*MODULE_PATH)  # RLlib needs an absolute path
    if not module_dir.is_dir():
        raise ValueError(f"checkpoint {path} has no RLModule at {module_dir}")
    module = RLModule.from_checkpoint(str(module_dir))
    if isinstance(module, torch.nn.Module):
        module.eval()
    return module


def evaluate_checkpoint(
    path: str | Path,
    *,
    env: str,
    games_dir: str | Path | None = None,
    split: str = "test",
    num_games: int = 0,
    prior_model: str | Path | None = None,
    through_cache: bool = False,
    progress: bool = False,
    prior_weight: float | None = None,
    temperature: float | None = None,
) -> dict:
    """Reload a trained agent and play each game of ``split`` once greedily.

    Args:
        path: Checkpoint folder.
        env: Env id; must be the checkpoint's.
        games_dir: Game suite (None: the env's default suite).
        split: Split to play.
        num_games: The first ``num_games`` games (0: all).
        prior_model: Prior folder (None: the one the checkpoint records). Its model version
            must be the checkpoint's.
        through_cache: Read the prior through a fresh shared cache actor and the Serve
            deployment (starts Ray); otherwise score it in this process, uncached.
        progress: Show a progress bar.
        prior_weight: Play with this ``beta`` instead of the checkpoint's (a diagnostic: how
            much of greedy play is the prior's).
        temperature: Play at this fixed ``T`` instead of the schedule's final one.

    Returns:
        Success, mean return, per-game success, the ``beta`` and ``T`` played at, and what
        was played.

    Raises:
        CheckpointMismatch: The checkpoint does not fit the env, encoding or prior.
        ValueError: Missing checkpoint, games or prior.
    """
    from cachellm_rl.algorithms.ps_dqn.methods import prior_chooser
    from cachellm_rl.envs.evaluate import greedy_evaluate
    from cachellm_rl.envs.registry import default_games_dir, env_split_games, make_text_env

    meta = read_metadata(path)
    if meta.get("env") != env:  # before anything is built for the wrong env
        raise CheckpointMismatch(f"checkpoint was trained on env {meta.get('env')!r}, not {env!r}")
    gdir = Path(games_dir) if games_dir else default_games_dir(env)
    games = env_split_games(env, gdir, split)
    games = games[:num_games] if num_games else games
    text_env = make_text_env(
        env,
        {
            "games": games,
            "expert": False,
            "seed": 0,
            "max_episode_steps": meta.get("max_episode_steps") or 50,
            # the one observation setting a run chooses; the sizes must match as they are
            "obs": {"mark_repeats": bool((meta.get("obs_config") or {}).get("mark_repeats"))},
        },
    )
    obs_config = asdict(text_env.config.obs)
    client, prior_version, stop = None, None, None
    try:
        if meta.get("prior_version") is not None:
            model_dir = prior_model or meta.get("prior_model")
            if not model_dir:
                raise ValueError("the checkpoint was trained with a prior: give --prior-model")
            if through_cache:
                client, prior_version, stop = _cache_client(model_dir, meta)
            else:
                from cachellm_rl.cache.client import DirectPriorClient
                from cachellm_rl.prior.scoring import CandidateScorer, ScorerConfig

                scorer = CandidateScorer(
                    ScorerConfig(
                        model_dir=str(model_dir),
                        prior_temperature=float(meta.get("prior_temperature", 1.0)),
                        device="cpu",
                    )
                )
                client = DirectPriorClient(scorer)
                prior_version = scorer.model_version
        check_compatible(meta, env=env, obs_config=obs_config, prior_version=prior_version)
        module = load_agent(path)
        posterior = override_posterior(module, prior_weight=prior_weight, temperature=temperature)
        res = greedy_evaluate(
            text_env,
            games,
            prior_chooser(client, hit_rate=float(meta.get("final_hit_rate") or 0.0), module=module),
            progress=progress,
        )
    finally:
        text_env.close()
        if stop is not None:
            stop()
    return {
        "checkpoint": str(path),
        "env": env,
        "method": meta.get("method"),
        "protocol": meta.get("protocol"),
        "env_steps": meta.get("env_steps"),
        "split": split,
        "games": len(games),
        "success": res.success_rate,
        "return_mean": float(np.mean(res.returns)),
        "episode_length_mean": float(np.mean(res.lengths)),
        "per_game_success": res.per_game_success_by_name(),
        "prior": "none" if client is None else ("cache" if through_cache else "uncached"),
        "prior_weight": posterior.prior_weight if posterior else None,
        "temperature": (
            posterior.final_temperature(float(meta.get("final_hit_rate") or 0.0))
            if posterior
            else None
        ),
    }


def override_posterior(
    module, *, prior_weight: float | None = None, temperature: float | None = None
) -> PosteriorConfig | None:
    """Set a loaded module's ``beta`` and/or a fixed greedy ``T``; returns its posterior (None
    for a module without one, e.g. ``no_prior``'s Q-argmax inference)."""
    posterior = getattr(module, "posterior", None)
    if posterior is None or getattr(module, "inference", "posterior") != "posterior":
        if prior_weight is not None or temperature is not None:
            raise ValueError("this checkpoint plays argmax Q: it has no beta or T to override")
        return None
    if prior_weight is not None:
        posterior = dataclasses.replace(posterior, prior_weight=prior_weight)
    if temperature is not None:
        posterior = dataclasses.replace(
            posterior, schedule="fixed", temperature=temperature, temperature_final=temperature
        )
    module.posterior = posterior
    return posterior


def _cache_client(model_dir, meta: Mapping):
    """A cache client on a fresh Ray + Serve + cache actor; returns (client, version, stop)."""
    import ray
    from ray import serve

    from cachellm_rl.cache.actor import SharedCacheConfig, get_or_create_cache, kill_cache
    from cachellm_rl.cache.client import PriorCacheClient
    from cachellm_rl.cache.encoders import TextEncoderConfig, TextStateEncoder
    from cachellm_rl.config import init_ray
    from cachellm_rl.prior.scoring import ScorerConfig
    from cachellm_rl.prior.server import PriorServerConfig, deploy_prior_server

    owns_ray = not ray.is_initialized()
    init_ray(log_to_driver=False)
    deploy_prior_server(
        PriorServerConfig(
            scorer=ScorerConfig(
                model_dir=str(Path(model_dir).resolve()),
                prior_temperature=float(meta.get("prior_temperature", 1.0)),
            ),
            num_cpus=0,
        ),
        app_name="cachellm_eval_prior",
    )
    encoder = TextStateEncoder(TextEncoderConfig(max_tokens=128))
    name = "cachellm_eval_cache"
    handle = get_or_create_cache(
        SharedCacheConfig(prior_app="cachellm_eval_prior", encoder_tag=encoder.tag), name=name
    )
    version, _ = ray.get(handle.versions.remote())
    client = PriorCacheClient(encoder, cache_name=name)

    def stop() -> None:
        kill_cache(name)
        serve.delete("cachellm_eval_prior")
        if owns_ray:
            serve.shutdown()
            ray.shutdown()

    return client, str(version), stop
