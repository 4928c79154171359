"""The text suite: every method on the same games, seeds and env-step budget, through RLlib, with
one shared cache actor per (method, seed) run and one ``PriorServer`` for all runs. Writes the
results folder of DESIGN §5. ``experiments/text_suite.py`` is the command-line front end.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import ray
from tqdm.auto import tqdm

from cachellm_rl.algorithms.ps_dqn.connectors import PriorConnectorReport
from cachellm_rl.algorithms.ps_dqn.methods import (
    METHODS,
    RL_METHODS,
    MethodSettings,
    algo_config_for,
    check_methods,
    collect_reports,
    final_temperature,
    prior_chooser,
    start_cache,
)
from cachellm_rl.cache.actor import DEFAULT_NAMESPACE, kill_cache
from cachellm_rl.contracts import LatencyHistogram
from cachellm_rl.envs.evaluate import greedy_evaluate
from cachellm_rl.envs.registry import (
    DEFAULT_MAX_EPISODE_STEPS,
    check_env_id,
    default_games_dir,
    default_prior_dir,
)
from cachellm_rl.results import (
    TensorBoardLogger,
    append_jsonl,
    binomial_ci95,
    markdown_table,
    mean_ci95,
    read_jsonl,
    write_json,
)

logger = logging.getLogger(__name__)

PRESETS = ("quick", "full")


@dataclass(frozen=True, kw_only=True)
class TextSuiteConfig:
    """One suite run. ``games_dir``, ``prior_model`` and ``max_episode_steps`` left as None are
    resolved from ``env`` when the config is built; build a new config (not
    ``dataclasses.replace``) to change ``env``.

    Attributes:
        env: Text env id (``textworld``, ``alfworld`` or ``babyai``).
        games_dir: Generated game suite folder (None: the env's default suite).
        split: Split the agents train and are evaluated on (held out from the prior).
        num_games: Games of ``split`` used (the first ``num_games``; 0 = all).
        prior_model: Prior model folder, Hugging Face format (None: the env's embedded prior).
        prior_temperature: ``T_prior`` of the prior's softmax over candidate scores.
        methods: Methods to compare.
        seeds: RL seeds.
        env_steps: Env-step budget of each RL run.
        max_episode_steps: Episode step limit (None: the env's default).
        num_env_runners: Remote env runners (0: sample in the driver).
        settings: Hyper-parameters of the methods.
        progress: Show progress bars.
    """

    env: str = "textworld"
    games_dir: str | None = None
    split: str = "test"
    num_games: int = 0
    prior_model: str | None = None
    prior_temperature: float = 0.5
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0,)
    env_steps: int = 2000
    max_episode_steps: int | None = None
    num_env_runners: int = 1
    settings: MethodSettings = field(default_factory=MethodSettings)
    progress: bool = True

    def __post_init__(self) -> None:
        check_env_id(self.env)
        # Per-env defaults: the env's generated suite, its embedded prior, its episode limit.
        if self.games_dir is None:
            object.__setattr__(self, "games_dir", str(default_games_dir(self.env)))
        if self.prior_model is None:
            object.__setattr__(self, "prior_model", str(default_prior_dir(self.env)))
        # Absolute paths: Serve replicas and env runners do not share the driver's working dir.
        object.__setattr__(self, "games_dir", str(Path(self.games_dir).resolve()))
        object.__setattr__(self, "prior_model", str(Path(self.prior_model).resolve()))
        if self.max_episode_steps is None:
            object.__setattr__(self, "max_episode_steps", DEFAULT_MAX_EPISODE_STEPS[self.env])
        check_methods(self.methods)
        if not self.seeds:
            raise ValueError("TextSuiteConfig.seeds is empty")
        if self.env_steps < 1:
            raise ValueError("TextSuiteConfig.env_steps must be >= 1")
        if self.num_env_runners < 0:
            raise ValueError("TextSuiteConfig.num_env_runners must be >= 0")
        if self.num_games < 0:
            raise ValueError("TextSuiteConfig.num_games must be >= 0")


def preset(name: str, **overrides) -> TextSuiteConfig:
    """The ``quick`` (minutes on 2 cores) or ``full`` (3 seeds, all test games) suite."""
    if name == "quick":
        base = {"num_games": 4, "seeds": (0,), "env_steps": 1000}
    elif name == "full":
        base = {"num_games": 0, "seeds": (0, 1, 2), "env_steps": 2000}
    else:
        raise ValueError(f"unknown preset {name!r}; known: {list(PRESETS)}")
    # One construction, so the per-env defaults follow ``env`` (``dataclasses.replace`` of a
    # built config would keep the first env's games, prior and episode limit).
    return TextSuiteConfig(**{**base, **{k: v for k, v in overrides.items() if v is not None}})


def _games(cfg: TextSuiteConfig) -> list[str]:
    from cachellm_rl.envs.registry import env_split_games

    games = env_split_games(cfg.env, cfg.games_dir, cfg.split)
    return games[: cfg.num_games] if cfg.num_games else games


def _env_config(cfg: TextSuiteConfig, games: Sequence[str], seed: int) -> dict:
    return {
        "games": list(games),
        "expert": False,
        "seed": seed,
        "max_episode_steps": cfg.max_episode_steps,
    }


def _cache_stats(handle) -> dict:
    if handle is None:
        return {}
    return ray.get(handle.stats.remote()).as_flat_dict()


@dataclass
class RunOutcome:
    """Everything measured in one (method, seed) run."""

    row: dict
    curve: list[dict]
    latency_hit: LatencyHistogram
    latency_miss: LatencyHistogram


def _eval_row(method, seed, res, stats, extra) -> dict:
    succ = list(res.per_game_success.values())
    return {
        "method": method,
        "seed": seed,
        "success": float(np.mean(succ)),
        "success_ci95_games": binomial_ci95(succ),
        "return_mean": float(np.mean(res.returns)),
        "eval_episode_length_mean": float(np.mean(res.lengths)),
        "per_game_success": res.per_game_success_by_name(),
        "lm_queries": int(stats.get("lm_queries", 0)),
        "hit_rate": stats.get("hit_rate"),
        **extra,
    }


def run_direct_lm(cfg: TextSuiteConfig, seed: int, games: Sequence[str], cache_name: str):
    """``direct_lm``: the prior's argmax on every game, every decision answered by the LM."""
    from cachellm_rl.cache.client import PriorCacheClient
    from cachellm_rl.envs.registry import make_text_env

    t0 = time.perf_counter()
    handle = start_cache("direct_lm", cfg.settings, cache_name, DEFAULT_NAMESPACE)
    client = PriorCacheClient(None, cache_name=cache_name, namespace=DEFAULT_NAMESPACE)
    env = make_text_env(cfg.env, _env_config(cfg, games, seed))
    res = greedy_evaluate(env, games, prior_chooser(client, temperature=1.0))
    env.close()
    stats = _cache_stats(handle)
    wall = time.perf_counter() - t0
    row = _eval_row(
        "direct_lm",
        seed,
        res,
        stats,
        {
            "train_env_steps": 0,
            "env_steps_per_s": res.decisions / wall if wall > 0 else None,
            "wall_s": wall,
            "eval_lm_queries": int(stats.get("lm_queries", 0)),
            "latency_hit_p50_ms": res.latency_hit.quantile(0.5),
            "latency_miss_p50_ms": res.latency_miss.quantile(0.5),
            "latency_hit_p95_ms": res.latency_hit.quantile(0.95),
            "latency_miss_p95_ms": res.latency_miss.quantile(0.95),
        },
    )
    curve = [
        {"method": "direct_lm", "seed": seed, "env_steps": s, "train_success": row["success"]}
        for s in (0, cfg.env_steps)
    ]
    kill_cache(cache_name, DEFAULT_NAMESPACE)
    return RunOutcome(row, curve, res.latency_hit, res.latency_miss)


def run_rl_method(
    cfg: TextSuiteConfig,
    method: str,
    seed: int,
    games: Sequence[str],
    cache_name: str,
    tb: TensorBoardLogger,
    bar=None,
) -> RunOutcome:
    """Train one RL method for ``cfg.env_steps`` env steps, then evaluate greedily on ``games``."""
    from cachellm_rl.cache.client import PriorCacheClient
    from cachellm_rl.envs.registry import env_class, make_text_env

    t_start = time.perf_counter()
    s = cfg.settings
    handle = start_cache(method, s, cache_name, DEFAULT_NAMESPACE)
    algo_cfg = algo_config_for(
        method,
        s,
        env_class=env_class(cfg.env),
        env_config=_env_config(cfg, games, seed),
        cache_name=cache_name,
        num_env_runners=cfg.num_env_runners,
        total_env_steps=cfg.env_steps,
        seed=seed,
    )
    algo = algo_cfg.build_algo()
    curve: list[dict] = []
    report = PriorConnectorReport()
    episodes: list[dict] = []
    steps, train_s = 0, 0.0
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
                "hit_rate": stats.get("hit_rate"),
                "hit_rate_ema": stats.get("hit_rate_ema"),
                "capacity_entries": stats.get("capacity_entries"),
                "min_cosine_similarity": stats.get("min_cosine_similarity"),
                "refresh_probability": stats.get("refresh_probability"),
                "refresh_kl_ema": stats.get("refresh_kl_ema"),
                "refresh_error_ema": stats.get("refresh_error_ema"),
                "radius_narrowed": stats.get("radius_narrowed"),
                "cache_size": stats.get("size"),
                "temperature": rep.temperature if rep.decisions else None,
                "qf_loss": learner.get("qf_loss"),
            }
            curve.append(point)
            tb.scalars(
                steps,
                {
                    "train/success": point["train_success"],
                    "train/return": point["train_return"],
                    "cache/hit_rate": point["hit_rate"],
                    "cache/hit_rate_ema": point["hit_rate_ema"],
                    "cache/lm_queries": point["lm_queries"],
                    "cache/K": point["capacity_entries"],
                    "cache/tau": point["min_cosine_similarity"],
                    "cache/rho": point["refresh_probability"],
                    "cache/refresh_kl_ema": point["refresh_kl_ema"],
                    "cache/refresh_error_ema": point["refresh_error_ema"],
                    "cache/radius_narrowed": point["radius_narrowed"],
                    "cache/size": point["cache_size"],
                    "posterior/temperature": point["temperature"],
                    "learner/qf_loss": point["qf_loss"],
                },
            )
            if bar is not None:
                bar.set_postfix_str(
                    f"{method} s{seed} {steps}/{cfg.env_steps} steps "
                    f"succ={point['train_success'] if recent else float('nan'):.2f}"
                )
        module = algo.get_module()
        temperature = final_temperature(report, s)
        client = (
            None
            if method == "no_prior"
            else PriorCacheClient(
                None if method == "uncached" else _driver_encoder(),
                cache_name=cache_name,
                namespace=DEFAULT_NAMESPACE,
            )
        )
        train_lm = _cache_stats(handle).get("lm_queries", 0)
        env = make_text_env(cfg.env, _env_config(cfg, games, seed))
        res = greedy_evaluate(
            env, games, prior_chooser(client, temperature=temperature, module=module)
        )
        env.close()
    finally:
        algo.stop()
    stats = _cache_stats(handle)
    wall = time.perf_counter() - t_start
    invalid = sum(e["invalid_actions"] for e in episodes)
    row = _eval_row(
        method,
        seed,
        res,
        stats,
        {
            "train_env_steps": steps,
            "train_episodes": len(episodes),
            "train_success_last20": curve[-1]["train_success"] if curve else None,
            "train_success_all": (
                float(np.mean([e["success"] for e in episodes])) if episodes else None
            ),
            "env_steps_per_s": steps / train_s if train_s > 0 else None,
            "train_s": train_s,
            "wall_s": wall,
            "train_lm_queries": int(train_lm),
            "eval_lm_queries": int(stats.get("lm_queries", 0)) - int(train_lm),
            "latency_hit_p50_ms": report.latency_hit.quantile(0.5),
            "latency_miss_p50_ms": report.latency_miss.quantile(0.5),
            "latency_hit_p95_ms": report.latency_hit.quantile(0.95),
            "latency_miss_p95_ms": report.latency_miss.quantile(0.95),
            "final_temperature": temperature,
            "invalid_actions": invalid,
            "candidates_dropped": sum(e["candidates_dropped"] for e in episodes),
            "state_tokens_truncated": sum(e["state_tokens_truncated"] for e in episodes),
            "cache_stats": {k: v for k, v in stats.items() if not k.startswith("latency")},
            "connector_sources": report.sources,
        },
    )
    kill_cache(cache_name, DEFAULT_NAMESPACE)
    return RunOutcome(row, curve, report.latency_hit, report.latency_miss)


@functools.cache
def _driver_encoder():
    """One MiniLM per driver process (same settings as the env runners'), loaded on first use."""
    from cachellm_rl.cache.encoders import TextEncoderConfig, TextStateEncoder

    return TextStateEncoder(TextEncoderConfig(max_tokens=128))


def aggregate(rows: Sequence[dict], methods: Sequence[str]) -> dict:
    """Per-method aggregates over seeds (95% CIs over seeds; over games with one seed)."""
    out: dict[str, dict] = {}
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            continue
        succ = [r["success"] for r in rs]
        mean, ci = mean_ci95(succ)
        if len(rs) == 1:
            ci = rs[0]["success_ci95_games"]

        def avg(key, rs=rs):
            vals = [r[key] for r in rs if r.get(key) is not None and math.isfinite(r[key])]
            return float(np.mean(vals)) if vals else None

        out[m] = {
            "success_mean": mean,
            "success_ci95": ci,
            "return_mean": avg("return_mean"),
            "lm_queries": avg("lm_queries"),
            "hit_rate": avg("hit_rate"),
            "latency_hit_p50_ms": avg("latency_hit_p50_ms"),
            "latency_miss_p50_ms": avg("latency_miss_p50_ms"),
            "latency_hit_p95_ms": avg("latency_hit_p95_ms"),
            "latency_miss_p95_ms": avg("latency_miss_p95_ms"),
            "env_steps_per_s": avg("env_steps_per_s"),
            "wall_s": avg("wall_s"),
            "train_lm_queries": avg("train_lm_queries"),
            "eval_lm_queries": avg("eval_lm_queries"),
            "seeds": len(rs),
            "success_per_seed": succ,
        }
    base = out.get("uncached")
    if base and base.get("lm_queries"):
        for agg in out.values():
            if agg.get("lm_queries") is not None:
                agg["lm_queries_vs_uncached"] = agg["lm_queries"] / base["lm_queries"]
            agg["success_vs_uncached"] = (
                agg["success_mean"] / base["success_mean"] if base["success_mean"] else None
            )
    return out


TABLE_COLUMNS = (
    ("method", "method"),
    ("success_mean", "success"),
    ("success_ci95", "±95% CI"),
    ("return_mean", "return"),
    ("lm_queries", "LM queries"),
    ("lm_queries_vs_uncached", "vs uncached"),
    ("hit_rate", "hit rate"),
    ("latency_hit_p50_ms", "hit p50 ms"),
    ("latency_miss_p50_ms", "miss p50 ms"),
    ("env_steps_per_s", "env steps/s"),
    ("wall_s", "wall s"),
)


def write_outputs(out: Path, cfg: TextSuiteConfig, hists: dict) -> dict:
    """Summary, table and plots from the rows written so far."""
    from cachellm_rl.plots import plot_curves, plot_latency_histogram

    rows = read_jsonl(out / "runs.jsonl")
    curves = read_jsonl(out / "curves.jsonl")
    methods = [m for m in cfg.methods if any(r["method"] == m for r in rows)]
    agg = aggregate(rows, methods)
    summary = {"env": cfg.env, "methods": agg, "runs": rows, "config": asdict(cfg)}
    write_json(out / "summary.json", summary)
    table = markdown_table([{"method": m, **a} for m, a in agg.items()], TABLE_COLUMNS)
    (out / "table.md").write_text(
        f"# {cfg.env}: {len(cfg.seeds)} seed(s), {cfg.env_steps} env steps per RL run, "
        f"{cfg.split} games\n\n{table}"
    )
    if curves:
        plot_curves(
            curves,
            y="train_success",
            ylabel="success (last 20 training episodes)",
            out=out / "learning_curves.png",
            title=f"{cfg.env}: training success",
        )
        plot_curves(
            [c for c in curves if "lm_queries" in c],
            y="lm_queries",
            ylabel="LM queries (cumulative)",
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


def run_text_suite(cfg: TextSuiteConfig, out: Path) -> dict:
    """Run every (method, seed), appending rows as they finish; returns the summary.

    Assumes Ray is initialised and the ``PriorServer`` application is deployed.
    """
    games = _games(cfg)
    write_json(out / "config.json", {"suite": asdict(cfg), "games": games})
    runs = [(m, s) for s in cfg.seeds for m in cfg.methods]
    hists: dict[str, tuple[LatencyHistogram, LatencyHistogram]] = {}
    bar = tqdm(runs, desc="text suite", disable=not cfg.progress, unit="run")
    for method, seed in bar:
        name = f"text-suite-{method}-s{seed}"
        tb = TensorBoardLogger(out / "tb" / f"{method}-s{seed}")
        try:
            if method == "direct_lm":
                outcome = run_direct_lm(cfg, seed, games, name)
            else:
                assert method in RL_METHODS
                outcome = run_rl_method(cfg, method, seed, games, name, tb, bar)
        finally:
            tb.close()
        append_jsonl(out / "runs.jsonl", outcome.row)
        for c in outcome.curve:
            append_jsonl(out / "curves.jsonl", c)
        h = hists.get(method, (LatencyHistogram(), LatencyHistogram()))
        hists[method] = (h[0].merged(outcome.latency_hit), h[1].merged(outcome.latency_miss))
        write_outputs(out, cfg, hists)
    return write_outputs(out, cfg, hists)


ENV_TABLE_COLUMNS = (
    ("env", "env"),
    ("method", "method"),
    ("success_mean", "success"),
    ("success_ci95", "±95% CI"),
    ("lm_queries", "LM queries"),
    ("lm_queries_vs_uncached", "vs uncached"),
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
    rows = [
        {"env": env, "method": m, **a}
        for env, s in summaries.items()
        for m, a in s["methods"].items()
    ]
    write_json(out / "summary.json", {"envs": {env: s["methods"] for env, s in summaries.items()}})
    table = "# text suite, all envs\n\n" + markdown_table(rows, ENV_TABLE_COLUMNS)
    (out / "table.md").write_text(table)
    return table
