"""The text suite: every method on the same games, seeds and env-step budget, through RLlib, with
one shared cache actor per (method, seed) run and one ``PriorServer`` for all runs. Writes the
results folder described in docs/results.md. ``experiments/text_suite.py`` is the command-line
front end.

Protocols (named in the config and in every results file):

- ``same_games``: RL trains on the evaluation games and is evaluated on them.
- ``held_out``: RL trains on the ``train_split`` games (the prior's own train split) and is
  evaluated on the unseen ``split`` games.

Comparisons are paired (same games, seeds, budget): a method's greedy success forms a
``(seeds, games)`` matrix, and differences and probabilities of improvement come with
stratified-bootstrap 95% CIs over (game, seed) from rliable (:mod:`cachellm_rl.stats`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TextIO

import numpy as np
import ray

from cachellm_rl import stats as rstats
from cachellm_rl import suite as suite_layer
from cachellm_rl.algorithms.ps_dqn.checkpoints import code_revision, save_checkpoint
from cachellm_rl.algorithms.ps_dqn.connectors import PriorConnectorReport
from cachellm_rl.algorithms.ps_dqn.methods import (
    METHODS,
    RL_METHODS,
    SUITE_METHODS,
    UNCACHED_METHODS,
    MethodSettings,
    algo_config_for,
    check_methods,
    collect_reports,
    connector_config_for,
    posterior_for_run,
    prior_chooser,
    start_cache,
)
from cachellm_rl.cache.actor import DEFAULT_NAMESPACE, kill_cache
from cachellm_rl.cache.index import atomic_write_text
from cachellm_rl.envs.evaluate import GreedyResult, greedy_evaluate, short_game_names
from cachellm_rl.envs.registry import (
    DEFAULT_MAX_EPISODE_STEPS,
    check_env_id,
    default_games_dir,
    default_prior_dir,
)
from cachellm_rl.results import TensorBoardLogger, write_json
from cachellm_rl.suite import (
    RunOutcome,
    best_of,
    method_aggregates,
    paired_comparisons,
    planned_runs,
    queries_relative_to,
    read_rows,
    run_suite,
    success_matrices,
    write_table,
)

logger = logging.getLogger(__name__)

PRESETS = ("quick", "full")
PROTOCOLS = ("same_games", "held_out")
CHECKPOINTS_DIR = "checkpoints"


@dataclass(frozen=True, kw_only=True)
class TextSuiteConfig:
    """One suite run. ``games_dir``, ``prior_model`` and ``max_episode_steps`` left as None are
    resolved from ``env`` when the config is built; build a new config (not
    ``dataclasses.replace``) to change ``env``.

    Attributes:
        env: Text env id (``textworld``, ``alfworld`` or ``babyai``).
        games_dir: Generated game suite folder (None: the env's default suite).
        split: Split the agents are evaluated on (held out from the prior).
        num_games: Games of ``split`` used (the first ``num_games``; 0 = all).
        protocol: ``same_games`` (RL trains on the evaluation games) or ``held_out`` (RL trains
            on ``train_split`` and is evaluated on the unseen ``split`` games).
        train_split: Split RL trains on under ``held_out``.
        num_train_games: Games of ``train_split`` used under ``held_out`` (0 = all).
        prior_model: Prior model folder, Hugging Face format (None: the env's embedded prior).
        prior_temperature: ``T_prior`` of the prior's softmax over candidate scores.
        methods: Methods to compare.
        seeds: RL seeds.
        env_steps: Env-step budget of each RL run.
        max_episode_steps: Episode step limit (None: the env's default).
        num_env_runners: Remote env runners (0: sample in the driver).
        settings: Hyper-parameters of the methods.
        eval_every_env_steps: Greedy evaluation on the evaluation games every this many env
            steps during training (0: only at the end). Its LM queries count as evaluation
            traffic, apart from training traffic.
        checkpoint_every_env_steps: Save a resumable checkpoint every this many env steps (0:
            only the final one).
        progress: Show progress bars.
    """

    env: str = "textworld"
    games_dir: str | None = None
    split: str = "test"
    num_games: int = 0
    protocol: str = "same_games"
    train_split: str = "train"
    num_train_games: int = 0
    prior_model: str | None = None
    prior_temperature: float = 0.5
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0,)
    env_steps: int = 2000
    max_episode_steps: int | None = None
    num_env_runners: int = 2
    settings: MethodSettings = field(default_factory=MethodSettings)
    eval_every_env_steps: int = 0
    checkpoint_every_env_steps: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        check_env_id(self.env)
        # Per-env defaults: the env's generated suite, its embedded prior, its episode limit.
        if self.games_dir is None:
            object.__setattr__(self, "games_dir", str(default_games_dir(self.env)))
        if self.prior_model is None:
            object.__setattr__(self, "prior_model", str(default_prior_dir(self.env)))
        # Absolute paths: Serve replicas and env runners do not share the driver's working dir.
        object.__setattr__(self, "games_dir", str(Path(str(self.games_dir)).resolve()))
        object.__setattr__(self, "prior_model", str(Path(str(self.prior_model)).resolve()))
        if self.max_episode_steps is None:
            object.__setattr__(self, "max_episode_steps", DEFAULT_MAX_EPISODE_STEPS[self.env])
        check_methods(self.methods)
        if self.protocol not in PROTOCOLS:
            raise ValueError(
                f"TextSuiteConfig.protocol must be one of {PROTOCOLS}, got {self.protocol!r}"
            )
        if self.protocol == "held_out" and self.train_split == self.split:
            raise ValueError("held_out needs train_split != split (the evaluation split)")
        if not self.seeds:
            raise ValueError("TextSuiteConfig.seeds is empty")
        for name in ("env_steps",):
            if getattr(self, name) < 1:
                raise ValueError(f"TextSuiteConfig.{name} must be >= 1")
        for name in (
            "num_env_runners",
            "num_games",
            "num_train_games",
            "eval_every_env_steps",
            "checkpoint_every_env_steps",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"TextSuiteConfig.{name} must be >= 0")

    @property
    def steps_cap(self) -> int:
        """The episode step limit (resolved)."""
        assert self.max_episode_steps is not None
        return self.max_episode_steps


# Run-row counters of decisions that did not get the served prior, and what to tell the user.
DEGRADED_DECISIONS = {
    "lm_fallbacks": "used a fallback prior (the LM failed or was unreachable; see run.log)",
    "actor_unavailable_decisions": (
        "acted on a uniform prior while the cache actor was unavailable"
    ),
}


def preset(name: str, **overrides) -> TextSuiteConfig:
    """The ``quick`` (minutes on 2 cores) or ``full`` suite (see docs/results.md)."""
    if name == "quick":
        base: dict = {"num_games": 4, "seeds": (0,), "env_steps": 1000}
    elif name == "full":
        base = {
            "num_games": 0,
            "seeds": (0, 1, 2, 3, 4),
            "env_steps": 20_000,
            "checkpoint_every_env_steps": 5000,
        }
    else:
        raise ValueError(f"unknown preset {name!r}; known: {list(PRESETS)}")
    # One construction, so the per-env defaults follow ``env`` (``dataclasses.replace`` of a
    # built config would keep the first env's games, prior and episode limit).
    return TextSuiteConfig(**{**base, **{k: v for k, v in overrides.items() if v is not None}})


def suite_games(cfg: TextSuiteConfig) -> list[str]:
    """The games every method is evaluated on."""
    from cachellm_rl.envs.registry import env_split_games

    games = env_split_games(cfg.env, str(cfg.games_dir), cfg.split)
    return games[: cfg.num_games] if cfg.num_games else games


def training_games(cfg: TextSuiteConfig, eval_games: Sequence[str]) -> list[str]:
    """The games RL trains on: the evaluation games (``same_games``) or the train split
    (``held_out``)."""
    if cfg.protocol == "same_games":
        return list(eval_games)
    from cachellm_rl.envs.registry import env_split_games

    games = env_split_games(cfg.env, str(cfg.games_dir), cfg.train_split)
    return games[: cfg.num_train_games] if cfg.num_train_games else games


def needs_training(env: str, prior: Path) -> bool:
    """Whether a prior folder must be (re)trained: it holds no model, or it is the env's
    default prior and its training report is missing (a training that did not finish; a
    user's own model folder is never retrained)."""
    from cachellm_rl.envs.registry import default_prior_dir
    from cachellm_rl.prior.train import TRAIN_REPORT

    if not (prior / "config.json").is_file():
        return True
    default = prior.resolve() == default_prior_dir(env).resolve()
    return default and not (prior / TRAIN_REPORT).is_file()


def ensure_inputs(cfg: TextSuiteConfig, *, progress: bool, console=None) -> None:
    """Generate the env's games and train its default prior when they are missing (their
    progress bars go to ``console``)."""
    from cachellm_rl.envs.registry import has_games, make_games

    games, prior = Path(str(cfg.games_dir)), Path(str(cfg.prior_model))
    with contextlib.redirect_stderr(console or sys.stderr):
        if not has_games(cfg.env, games):
            print(f"generating the {cfg.env} game suite into {games} ...", file=sys.stderr)
            make_games(cfg.env, games, progress=progress)
        if needs_training(cfg.env, prior):
            print(f"training the {cfg.env} default prior into {prior} ...", file=sys.stderr)
            from cachellm_rl.prior.embedded import train_embedded_prior

            train_embedded_prior(
                cfg.env, games_dir=games, out_dir=prior, evaluate=False, progress=progress
            )


def env_config_for(cfg: TextSuiteConfig, games: Sequence[str], seed: int) -> dict:
    """The env config of a run on ``games``."""
    config: dict = {
        "games": list(games),
        "expert": False,
        "seed": seed,
        "max_episode_steps": cfg.max_episode_steps,
    }
    if cfg.settings.mark_repeats:
        config["obs"] = {"mark_repeats": True}
    return config


def _cache_stats(handle) -> dict:
    if handle is None:
        return {}
    return ray.get(handle.stats.remote()).as_flat_dict()


def write_label_records(handle, out: Path, method: str, seed: int) -> str | None:
    """Write the run's reuse labels (measured labels and audits, with their similarities,
    sources and texts) to ``out/labels/<method>-s<seed>.jsonl``, for analysing what the
    cache served; returns the path, or None when the cache kept none or could not be read
    (logged; the run's row is kept either way)."""
    try:
        ray.get(handle.drain.remote(), timeout=60)  # labels of refreshes still in flight
        records = ray.get(handle.label_records.remote(), timeout=120)
    except Exception as exc:  # the run's row matters more than its labels
        logger.warning("%s seed %d: the cache's labels could not be read: %r", method, seed, exc)
        return None
    if not records:
        return None
    path = out / "labels" / f"{method}-s{seed}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _eval_row(method: str, seed: int, res: GreedyResult, stats: dict, extra: dict) -> dict:
    succ = list(res.per_game_success.values())
    return {
        "method": method,
        "seed": seed,
        "success": float(np.mean(succ)),
        "return_mean": float(np.mean(res.returns)),
        "eval_episode_length_mean": float(np.mean(res.lengths)),
        "per_game_success": res.per_game_success_by_name(),
        "lm_queries": int(stats.get("lm_queries", 0)),
        "hit_rate": stats.get("hit_rate"),
        "decisions": int(stats.get("decisions", 0)),
        "hits_exact": int(stats.get("hits_exact", 0)),
        "hits_semantic": int(stats.get("hits_semantic", 0)),
        "coalesced_semantic": int(stats.get("coalesced_semantic", 0)),
        "explore_calls": int(stats.get("explore_calls", 0)),
        "guard_held": int(stats.get("guard_held", 0)),
        "on_policy_labels": int(stats.get("on_policy_labels", 0)),
        "on_policy_wrong": int(stats.get("on_policy_wrong", 0)),
        "reuse_labels": int(stats.get("labels", 0)),
        "reuse_labels_wrong": int(stats.get("labels_wrong", 0)),
        "audits": int(stats.get("audits", 0)),
        "audits_wrong": int(stats.get("audits_wrong", 0)),
        "audit_queries": int(stats.get("audit_queries", 0)),
        # decisions answered by a fallback prior (LM failed or unreachable), train + eval
        "lm_fallbacks": int(stats.get("fallbacks_stale", 0) + stats.get("fallbacks_uniform", 0)),
        **extra,
    }


def run_direct_lm(cfg: TextSuiteConfig, games: Sequence[str], cache_name: str) -> RunOutcome:
    """``direct_lm``: the prior's argmax on every game, every decision answered by the LM. It is
    deterministic, so it runs once and stands for every seed in paired comparisons."""
    from cachellm_rl.cache.client import PriorCacheClient
    from cachellm_rl.envs.registry import make_text_env

    t0 = time.perf_counter()
    handle = start_cache("direct_lm", cfg.settings, cache_name, DEFAULT_NAMESPACE)
    client = PriorCacheClient(None, cache_name=cache_name, namespace=DEFAULT_NAMESPACE)
    env = make_text_env(cfg.env, env_config_for(cfg, games, 0))
    res = greedy_evaluate(env, games, prior_chooser(client))
    env.close()
    stats = _cache_stats(handle)
    wall = time.perf_counter() - t0
    row = _eval_row(
        "direct_lm",
        0,
        res,
        stats,
        {
            "protocol": cfg.protocol,
            "deterministic": True,
            "train_env_steps": 0,
            "wall_s": wall,
            "train_lm_queries": 0,
            "eval_lm_queries": int(stats.get("lm_queries", 0)),
            "latency_miss_p50_ms": res.latency_miss.quantile(0.5),
            "latency_miss_p95_ms": res.latency_miss.quantile(0.95),
        },
    )
    kill_cache(cache_name, DEFAULT_NAMESPACE)
    return RunOutcome(row, [], res.latency_hit, res.latency_miss)


def checkpoint_dir(out: Path, method: str, seed: int) -> Path:
    """Where the (method, seed) run's checkpoint lives in a results folder."""
    return out / CHECKPOINTS_DIR / f"{method}-s{seed}"


def _prior_version(handle) -> str | None:
    if handle is None:
        return None
    version, _ = ray.get(handle.versions.remote())
    return str(version) if version else None


def _checkpoint_metadata(cfg, method, seed, steps, env_config, prior_version, hit_rate) -> dict:
    from cachellm_rl.envs.registry import make_text_env

    env = make_text_env(cfg.env, {**env_config, "games": env_config["games"][:1]})
    obs_config = asdict(env.config.obs)
    env.close()
    s = cfg.settings
    return {
        "format": 1,
        "env": cfg.env,
        "method": method,
        "seed": seed,
        "env_steps": steps,
        "protocol": cfg.protocol,
        "obs_config": obs_config,
        "max_episode_steps": cfg.max_episode_steps,
        "prior_model": None if method == "no_prior" else cfg.prior_model,
        "prior_version": None if method == "no_prior" else prior_version,
        "prior_temperature": cfg.prior_temperature,
        "posterior": posterior_for_run(s, cfg.env_steps).to_dict(),
        "inference": "q" if method == "no_prior" else "posterior",
        "final_hit_rate": hit_rate,
        "encoder": s.encoder,
        "code_revision": code_revision(),
        "ray_version": ray.__version__,
    }


def run_rl_method(
    cfg: TextSuiteConfig,
    method: str,
    seed: int,
    games: Sequence[str],
    cache_name: str,
    tb: TensorBoardLogger,
    out: Path,
    bar=None,
) -> RunOutcome:
    """Train one RL method for ``cfg.env_steps`` env steps (resuming from the run's periodic
    checkpoint when an earlier attempt left one), then evaluate greedily on ``games``."""
    from cachellm_rl.envs.registry import env_class

    t_start = time.perf_counter()
    s = cfg.settings
    train_games = training_games(cfg, games)
    handle = start_cache(method, s, cache_name, DEFAULT_NAMESPACE, env=cfg.env)
    env_config = env_config_for(cfg, train_games, seed)
    algo = algo_config_for(
        method,
        s,
        env_class=env_class(cfg.env),
        env_config=env_config,
        cache_name=cache_name,
        num_env_runners=cfg.num_env_runners,
        total_env_steps=cfg.env_steps,
        seed=seed,
    ).build_algo()
    posterior = posterior_for_run(s, cfg.env_steps)
    ckpt = checkpoint_dir(out, method, seed)
    resumed_from = 0
    if (ckpt / "cachellm_checkpoint.json").is_file():
        algo.restore_from_path(str(ckpt.resolve()))  # RLlib reads a relative path as a URI
        from cachellm_rl.algorithms.ps_dqn.checkpoints import read_metadata

        resumed_from = int(read_metadata(ckpt)["env_steps"])
        logger.warning(
            "%s seed %d: resumed from its checkpoint at %d env steps", method, seed, resumed_from
        )
    prior_version = _prior_version(handle)
    curve: list[dict] = []
    report = PriorConnectorReport()
    episodes: list[dict] = []
    steps, train_s, eval_lm = resumed_from, 0.0, 0
    next_eval = cfg.eval_every_env_steps or math.inf
    next_ckpt = cfg.checkpoint_every_env_steps or math.inf
    while next_eval <= steps:
        next_eval += cfg.eval_every_env_steps
    while next_ckpt <= steps:
        next_ckpt += cfg.checkpoint_every_env_steps
    try:
        while steps < cfg.env_steps:
            t0 = time.perf_counter()
            result = algo.train()
            train_s += time.perf_counter() - t0
            steps = int(result["env_runners"].get("num_env_steps_sampled_lifetime", steps))
            rep = collect_reports(algo)  # runner totals so far (+ the new episodes)
            report = replace(rep, episodes=[])
            episodes += rep.episodes
            if handle is not None and rep.episodes:
                handle.report_episode_returns.remote([e["return"] for e in rep.episodes])
            stats = _cache_stats(handle)
            recent = episodes[-20:]
            learner = result.get("learners", {}).get("default_policy", {})
            point = {
                "method": method,
                "seed": seed,
                "env_steps": steps,
                "wall_s": time.perf_counter() - t_start,
                "episodes": len(episodes),
                "train_success": float(np.mean([e["success"] for e in recent])) if recent else None,
                "train_return": float(np.mean([e["return"] for e in recent])) if recent else None,
                "lm_queries": stats.get("lm_queries", 0),
                "train_lm_queries": stats.get("lm_queries", 0) - eval_lm,
                "hit_rate": stats.get("hit_rate"),
                "hit_rate_ema": stats.get("hit_rate_ema"),
                "capacity_entries": stats.get("capacity_entries"),
                "min_cosine_similarity": stats.get("min_cosine_similarity"),
                "refresh_probability": stats.get("refresh_probability"),
                "refresh_kl_ema": stats.get("refresh_kl_ema"),
                "refresh_error_ema": stats.get("refresh_error_ema"),
                "radius_narrowed": stats.get("radius_narrowed"),
                "hits_semantic": stats.get("hits_semantic"),
                "semantic_refused": stats.get("semantic_refused"),
                "explore_calls": stats.get("explore_calls"),
                "guard_held": stats.get("guard_held"),
                "on_policy_labels": stats.get("on_policy_labels"),
                "on_policy_wrong": stats.get("on_policy_wrong"),
                "explore_probability": stats.get("explore_probability"),
                "reuse_labels": stats.get("labels"),
                "reuse_labels_wrong": stats.get("labels_wrong"),
                "cache_size": stats.get("size"),
                "temperature": posterior.temperature_at(steps, rep.hit_rate_ema),
                "qf_loss": learner.get("qf_loss"),
                "kl_posterior_to_prior": learner.get("kl_posterior_to_prior"),
                "qf_mean": learner.get("qf_mean"),
                "conservative_gap": learner.get("conservative_gap"),
            }
            if steps >= next_eval and steps < cfg.env_steps:
                before = _cache_stats(handle).get("lm_queries", 0)
                res = _greedy(cfg, method, seed, games, algo, cache_name, report)
                eval_lm += _cache_stats(handle).get("lm_queries", 0) - before
                point["eval_success"] = res.success_rate
                while next_eval <= steps:
                    next_eval += cfg.eval_every_env_steps
            if steps >= next_ckpt and steps < cfg.env_steps:
                meta = _checkpoint_metadata(
                    cfg, method, seed, steps, env_config, prior_version, report.hit_rate_ema
                )
                save_checkpoint(algo, ckpt, meta)
                while next_ckpt <= steps:
                    next_ckpt += cfg.checkpoint_every_env_steps
            curve.append(point)
            tb.scalars(
                steps,
                {
                    "train/success": point["train_success"],
                    "train/return": point["train_return"],
                    "eval/success": point.get("eval_success"),
                    "cache/hit_rate": point["hit_rate"],
                    "cache/hit_rate_ema": point["hit_rate_ema"],
                    "cache/lm_queries": point["lm_queries"],
                    "cache/K": point["capacity_entries"],
                    "cache/tau": point["min_cosine_similarity"],
                    "cache/rho": point["refresh_probability"],
                    "cache/refresh_kl_ema": point["refresh_kl_ema"],
                    "cache/refresh_error_ema": point["refresh_error_ema"],
                    "cache/radius_narrowed": point["radius_narrowed"],
                    "cache/hits_semantic": point["hits_semantic"],
                    "cache/explore_probability": point["explore_probability"],
                    "cache/reuse_labels": point["reuse_labels"],
                    "cache/size": point["cache_size"],
                    "posterior/temperature": point["temperature"],
                    "posterior/kl_to_prior": point["kl_posterior_to_prior"],
                    "learner/qf_loss": point["qf_loss"],
                    "learner/qf_mean": point["qf_mean"],
                    "learner/conservative_gap": point["conservative_gap"],
                },
            )
            if bar is not None:
                succ = point["train_success"]
                bar.set_postfix_str(
                    f"{method} s{seed} {steps}/{cfg.env_steps} steps "
                    f"succ={succ if succ is not None else float('nan'):.2f}"
                )
        train_lm = _cache_stats(handle).get("lm_queries", 0) - eval_lm
        meta = _checkpoint_metadata(
            cfg, method, seed, steps, env_config, prior_version, report.hit_rate_ema
        )
        save_checkpoint(algo, ckpt, meta)
        before = _cache_stats(handle).get("lm_queries", 0)
        res = _greedy(cfg, method, seed, games, algo, cache_name, report)
        eval_lm += _cache_stats(handle).get("lm_queries", 0) - before
    finally:
        algo.stop()
    stats = _cache_stats(handle)
    wall = time.perf_counter() - t_start
    invalid = sum(e["invalid_actions"] for e in episodes)
    fresh_steps = steps - resumed_from
    row = _eval_row(
        method,
        seed,
        res,
        stats,
        {
            "protocol": cfg.protocol,
            "train_games": len(train_games),
            "train_env_steps": steps,
            "resumed_from_env_steps": resumed_from,
            "train_episodes": len(episodes),
            "train_success_last20": curve[-1]["train_success"] if curve else None,
            "train_success_all": (
                float(np.mean([e["success"] for e in episodes])) if episodes else None
            ),
            "env_steps_per_s": fresh_steps / train_s if train_s > 0 else None,
            "train_s": train_s,
            "wall_s": wall,
            "lm_queries": int(train_lm),
            "train_lm_queries": int(train_lm),
            "eval_lm_queries": int(eval_lm),
            "latency_hit_p50_ms": report.latency_hit.quantile(0.5),
            "latency_all_hit_p50_ms": report.latency_all_hit.quantile(0.5),
            "latency_miss_p50_ms": report.latency_miss.quantile(0.5),
            "latency_hit_p95_ms": report.latency_hit.quantile(0.95),
            "latency_miss_p95_ms": report.latency_miss.quantile(0.95),
            "final_temperature": posterior.final_temperature(report.hit_rate_ema),
            "prior_weight": posterior.prior_weight,
            "temperature_schedule": posterior.schedule,
            "invalid_actions": invalid,
            "candidates_dropped": sum(e["candidates_dropped"] for e in episodes),
            "state_tokens_truncated": sum(e["state_tokens_truncated"] for e in episodes),
            "cache_stats": {k: v for k, v in stats.items() if not k.startswith("latency")},
            "connector_sources": report.sources,
            "actor_unavailable_decisions": report.actor_failures,
            "checkpoint": str(ckpt),
        },
    )
    if handle is not None:
        row["labels_file"] = write_label_records(handle, out, method, seed)
    kill_cache(cache_name, DEFAULT_NAMESPACE)
    return RunOutcome(row, curve, report.latency_hit, report.latency_miss)


def _greedy(cfg, method, seed, games, algo, cache_name, report) -> GreedyResult:
    """Greedy play of the trained module on ``games`` (prior through the run's cache actor)."""
    from cachellm_rl.cache.client import PriorCacheClient
    from cachellm_rl.envs.registry import make_text_env

    module = algo.get_module()
    client = None
    if method != "no_prior":
        semantic = method not in UNCACHED_METHODS and method != "exact_only"
        follow = (
            semantic and connector_config_for(method, cfg.settings, cache_name).follow_cache_encoder
        )
        client = PriorCacheClient(
            None, cache_name=cache_name, namespace=DEFAULT_NAMESPACE, follow_cache_encoder=follow
        )
        if semantic and not (follow and client.sync_encoder()):
            client.encoder = _driver_encoder()
    env = make_text_env(cfg.env, env_config_for(cfg, games, seed))
    try:
        return greedy_evaluate(
            env, games, prior_chooser(client, hit_rate=report.hit_rate_ema, module=module)
        )
    finally:
        env.close()


@functools.cache
def _driver_encoder():
    """One MiniLM per driver process (same settings as the env runners'), loaded on first use."""
    from cachellm_rl.cache.encoders import TextEncoderConfig, TextStateEncoder

    return TextStateEncoder(TextEncoderConfig(max_tokens=128))


# -- aggregation ------------------------------------------------------------------------------
AVERAGED_KEYS = (
    "return_mean",
    "lm_queries",
    "train_lm_queries",
    "eval_lm_queries",
    "hit_rate",
    "latency_hit_p50_ms",
    "latency_all_hit_p50_ms",
    "latency_miss_p50_ms",
    "latency_hit_p95_ms",
    "latency_miss_p95_ms",
    "env_steps_per_s",
    "train_success_all",
    "wall_s",
)


def aggregate(
    rows: Sequence[dict],
    methods: Sequence[str],
    games: Sequence[str],
    seeds: Sequence[int],
    *,
    reps: int = rstats.DEFAULT_REPS,
) -> dict:
    """Per-method aggregates and paired comparisons.

    ``success_mean`` with its stratified-bootstrap 95% CI over (game, seed) and its IQM;
    comparisons as paired differences with CIs and probabilities of improvement. Methods
    missing a seed (a run still going) get means but no CI.
    """
    mats = success_matrices(rows, methods, games, seeds)
    out = method_aggregates(rows, mats, methods, AVERAGED_KEYS, reps=reps)
    queries_relative_to(out, "uncached")
    return {"methods": out, "comparisons": comparisons(mats, out, reps=reps)}


def comparisons(mats: dict, agg: dict, *, reps: int = rstats.DEFAULT_REPS) -> dict:
    """The paired comparisons the suite reports (each needs both methods' full matrices).

    - ``<m> vs direct_lm`` for every RL method with a prior;
    - ``uncached vs frozen_q``: what Q-learning adds on the same agent and budget;
    - ``uncached vs best of (direct_lm, frozen_q)``: learning beyond the prior, against
      whichever control scored higher;
    - ``<cached> vs uncached``: what a cache costs (or gains) in success;
    - ``adaptive vs exact_only``: what the semantic tier costs in success.
    """
    pairs: list = [
        (m, "direct_lm")
        for m in ("uncached", "frozen_q", "exact_only", "lru", "static", "adaptive", "no_prior")
    ]
    pairs.append(("uncached", "frozen_q"))
    controls = [c for c in ("direct_lm", "frozen_q") if mats.get(c) is not None]
    best = best_of(controls, mats, agg)
    if best is not None:
        pairs.append(("uncached", best, f"uncached vs best of ({', '.join(controls)}) = {best}"))
    pairs += [(m, "uncached") for m in ("exact_only", "lru", "static", "adaptive")]
    pairs.append(("adaptive", "exact_only"))
    return paired_comparisons(mats, pairs, reps=reps)


TABLE_COLUMNS = (
    ("method", "method"),
    ("seeds", "seeds"),
    ("success_mean", "success"),
    ("success_ci", "95% CI"),
    ("success_iqm", "IQM"),
    ("return_mean", "return"),
    ("train_lm_queries", "train LM queries"),
    ("train_lm_queries_vs_uncached", "vs uncached"),
    ("eval_lm_queries", "eval LM queries"),
    ("hit_rate", "hit rate"),
    ("semantic_share", "semantic hits"),
    ("audited_error", "served error (audited)"),
    ("audited_error_wilson_hi", "its Wilson hi"),
    ("latency_hit_p50_ms", "hit p50 ms"),
    ("latency_all_hit_p50_ms", "all-hit call p50 ms"),
    ("latency_miss_p50_ms", "miss p50 ms"),
    ("env_steps_per_s", "env steps/s"),
    ("wall_s", "wall s"),
)


def protocol_note(cfg: TextSuiteConfig, games: Sequence[str], train_games: int) -> str:
    """The protocol sentence printed beside every table."""
    if cfg.protocol == "same_games":
        where = f"RL trained and evaluated on the same {len(games)} `{cfg.split}` games"
    else:
        where = (
            f"RL trained on {train_games} `{cfg.train_split}` games, evaluated on "
            f"{len(games)} unseen `{cfg.split}` games"
        )
    return (
        f"Protocol `{cfg.protocol}`: {where}; the prior was trained on the suite's `train` split. "
        f"{len(cfg.seeds)} seed(s), {cfg.env_steps} env steps per RL run; greedy evaluation, "
        "one episode per game; CIs: stratified bootstrap over (game, seed), rliable."
    )


def write_outputs(out: Path, cfg: TextSuiteConfig, hists: dict, games: Sequence[str]) -> dict:
    """Summary, table and plots from the rows written so far."""
    from cachellm_rl.plots import plot_curves, plot_latency_histogram

    rows, curves = read_rows(out, cfg.seeds)
    methods = [m for m in cfg.methods if any(r["method"] == m for r in rows)]
    result = aggregate(rows, methods, games, cfg.seeds)
    agg = result["methods"]
    n_train = len(training_games(cfg, games))
    note = protocol_note(cfg, games, n_train)
    summary = {
        "env": cfg.env,
        "protocol": cfg.protocol,
        "protocol_note": note,
        "games": list(short_game_names(list(games)).values()),
        "methods": agg,
        "comparisons": result["comparisons"],
        "runs": rows,
        "config": asdict(cfg),
    }
    write_json(out / "summary.json", summary)
    write_table(out, cfg.env, note, agg, TABLE_COLUMNS, result["comparisons"])
    direct = agg.get("direct_lm", {}).get("success_mean")
    refs = {"direct_lm (greedy)": direct} if direct is not None else {}
    if curves:
        plot_curves(
            curves,
            y="train_success",
            ylabel="success (last 20 training episodes)",
            out=out / "learning_curves.png",
            title=f"{cfg.env}: training success ({cfg.protocol})",
            hlines=refs,
        )
        if any(c.get("eval_success") is not None for c in curves):
            plot_curves(
                curves,
                y="eval_success",
                ylabel="greedy success on the evaluation games",
                out=out / "eval_curves.png",
                title=f"{cfg.env}: greedy success during training ({cfg.protocol})",
                hlines=refs,
            )
        plot_curves(
            [c for c in curves if "train_lm_queries" in c],
            y="train_lm_queries",
            ylabel="LM queries in training (cumulative)",
            out=out / "lm_queries.png",
            title=f"{cfg.env}: LM queries",
        )
        plot_curves(
            [c for c in curves if c.get("hit_rate") is not None],
            y="hit_rate",
            ylabel="cache hit rate (cumulative)",
            out=out / "hit_rate.png",
            title=f"{cfg.env}: cache hit rate",
        )
    if hists:
        plot_latency_histogram(
            {
                m: (h[0].edges_ms, h[0].counts, h[1].counts)
                for m, h in hists.items()
                if h[0].total or h[1].total
            },
            out=out / "latency_hist.png",
            title="decision latency (caller side), hit vs miss",
        )
    return summary


def run_text_suite(cfg: TextSuiteConfig, out: Path, *, console: TextIO | None = None) -> dict:
    """Run every (method, seed), appending rows as they finish; returns the summary.

    A results folder that already has rows is resumed: finished (method, seed) runs are kept,
    an interrupted run restarts from its last periodic checkpoint. Assumes Ray is initialised
    and the ``PriorServer`` application is deployed.

    Args:
        cfg: The suite.
        out: Results folder.
        console: Stream for the progress bar (default: stderr).
    """
    out.mkdir(parents=True, exist_ok=True)
    games = suite_games(cfg)
    train = training_games(cfg, games)
    write_json(
        out / "config.json",
        {"suite": asdict(cfg), "games": games, "train_games": train, "protocol": cfg.protocol},
    )
    plan = planned_runs([SUITE_METHODS[m] for m in cfg.methods], cfg.seeds)

    def run_one(method: str, seed: int, bar) -> RunOutcome:
        name = f"text-suite-{method}-s{seed}"
        if method == "direct_lm":
            return run_direct_lm(cfg, games, name)
        assert method in RL_METHODS
        tb = TensorBoardLogger(out / "tb" / f"{method}-s{seed}")
        try:
            return run_rl_method(cfg, method, seed, games, name, tb, out, bar)
        finally:
            tb.close()

    return run_suite(
        out,
        plan,
        run_one,
        lambda hists: write_outputs(out, cfg, hists, games),
        desc=f"{cfg.env} suite",
        progress=cfg.progress,
        console=console,
        degraded=DEGRADED_DECISIONS,
    )


ENV_TABLE_COLUMNS = (
    ("env", "env"),
    ("method", "method"),
    ("success_mean", "success"),
    ("success_ci", "95% CI"),
    ("train_lm_queries", "train LM queries"),
    ("train_lm_queries_vs_uncached", "vs uncached"),
    ("hit_rate", "hit rate"),
    ("env_steps_per_s", "env steps/s"),
)


def write_env_summary(out: Path, summaries: dict[str, dict]) -> str:
    """The all-envs ``summary.json`` and ``table.md`` of a multi-env suite run.

    Args:
        out: The results folder (each env's own results are in ``out/<env>/``).
        summaries: Summary of each env, as returned by :func:`run_text_suite`.

    Returns:
        The markdown table.
    """
    return suite_layer.write_env_summary(out, summaries, ENV_TABLE_COLUMNS, "text suite, all envs")
