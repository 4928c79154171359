"""Ray Tune sweeps of the cache's (and the posterior's) settings on text-suite training runs.

The functional core (:func:`meta_reward`, :func:`trial_rows`, :func:`top_table`,
:func:`best_record`) has no Ray; :func:`cache_trial` (one Tune trial: a PS-DQN run with its own
cache actor) and :func:`run_sweep` (the ``tune.Tuner``) are the shell. See docs/tuning.md.

Objective: the meta-reward ``success - lambda_q * LM queries per decision``, ``success`` the
share of the trial's last ``SUCCESS_WINDOW`` training episodes won, queries per decision counted
by the trial's cache actor since the trial began (every LM call it made, exploration included;
audits are not the method's queries). Trials train and are scored on the env's ``valid`` split,
never on the test games.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cachellm_rl.contracts import DEFAULT_PRIOR_APP
from tune_spaces import PRIOR_TEMPERATURE, space

logger = logging.getLogger(__name__)

SUCCESS_WINDOW = 20
"""Training episodes the success of a report is measured over."""
METRIC = "meta_reward"
SEARCHERS = ("optuna", "random")
SWEEP_METHODS = ("adaptive", "static", "lru")


def meta_reward(success: float, lm_queries: int, decisions: int, lambda_q: float) -> float:
    """``success - lambda_q * lm_queries / decisions`` (queries per decision 1 when no decision
    was made yet, so an empty trial is not rewarded).

    Example:
        >>> meta_reward(0.5, 20, 100, 0.2)
        0.46
    """
    qpd = lm_queries / decisions if decisions else 1.0
    return round(success - lambda_q * qpd, 12)


@dataclass(frozen=True)
class SweepConfig:
    """One sweep.

    Attributes:
        env: Text env the trials train on.
        space: Search space name in ``tune_spaces`` (``cache_meta``, ``posterior``,
            ``prior_temperature``).
        method: Cached method whose settings are swept.
        num_samples: Trials.
        trial_env_steps: Env steps per trial.
        num_games: ``valid`` games the trials train on (0: all).
        seed: Seed of every trial (trials differ only in their settings).
        lambda_q: Weight of LM queries per decision in the objective.
        searcher: ``optuna`` (TPE) or ``random``.
        max_concurrent_trials: Trials at once (each reserves ``cpus_per_trial``).
        cpus_per_trial: CPUs a trial reserves (its env runner and learner run in it).
        grace_iterations: Iterations before ASHA may stop a trial.
        reduction_factor: ASHA's reduction factor.
        games_dir: Game suite (None: the env's default).
        prior_model: Prior model folder (None: the env's default).
        prior_temperature: ``T_prior`` when the space does not sweep it.
        split: Split the trials train and are scored on.
        base_settings: Dotted-key settings every trial starts from (the space's samples
            override them).
        prior_app: Serve application of the prior the trials share (``prior_temperature``
            sweeps deploy one per value instead).
    """

    env: str = "textworld"
    space: str = "cache_meta"
    method: str = "adaptive"
    num_samples: int = 8
    trial_env_steps: int = 3000
    num_games: int = 10
    seed: int = 0
    lambda_q: float = 0.2
    searcher: str = "optuna"
    max_concurrent_trials: int = 2
    cpus_per_trial: float = 1.0
    grace_iterations: int = 4
    reduction_factor: int = 2
    games_dir: str | None = None
    prior_model: str | None = None
    prior_temperature: float | None = None
    split: str = "valid"
    base_settings: dict = field(default_factory=dict)
    prior_app: str = DEFAULT_PRIOR_APP

    def __post_init__(self) -> None:
        space(self.space)  # raises on an unknown space
        if self.method not in SWEEP_METHODS:
            raise ValueError(f"method {self.method!r} has no cache to tune; use {SWEEP_METHODS}")
        if self.searcher not in SEARCHERS:
            raise ValueError(f"unknown searcher {self.searcher!r}; searchers: {SEARCHERS}")
        for name in ("num_samples", "trial_env_steps", "max_concurrent_trials"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lambda_q < 0:
            raise ValueError(f"lambda_q must be >= 0, got {self.lambda_q}")
        if self.split == "test":
            raise ValueError("trials never tune on the test games; use the valid split")


# --------------------------------------------------------------------------- functional core


def trial_rows(results: Sequence[Mapping[str, Any]]) -> list[dict]:
    """One flat row per trial (its last report and its config), best meta-reward first (ties
    broken by trial id, so a restored sweep names the same best trial); trials without a report
    are left out."""
    rows: list[dict[str, Any]] = []
    for r in results:
        metrics, config = r.get("metrics") or {}, r.get("config") or {}
        if METRIC not in metrics or metrics[METRIC] is None:
            continue
        rows.append(
            {
                "trial_id": r.get("trial_id"),
                METRIC: float(metrics[METRIC]),
                "success": metrics.get("success"),
                "queries_per_decision": metrics.get("queries_per_decision"),
                "hit_rate": metrics.get("hit_rate"),
                "env_steps": metrics.get("env_steps"),
                "stopped_early": bool(metrics.get("env_steps", 0) < r.get("budget", 0)),
                "settings": dict(config),
            }
        )
    rows.sort(key=lambda row: (-float(row[METRIC]), str(row["trial_id"])))
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def top_table(rows: Sequence[dict], *, k: int = 5, protocol: str = "") -> str:
    """Markdown table of the ``k`` best trials (one column per swept setting)."""
    if not rows:
        return "No trial reported a result.\n"
    keys = sorted({key for row in rows for key in row["settings"]})
    head = ["rank", METRIC, "success", "LM q/decision", "hit rate", "env steps", *keys]
    lines = [protocol, ""] if protocol else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, row in enumerate(rows[:k], 1):
        cells = [
            str(i),
            _fmt(row[METRIC]),
            _fmt(row["success"]),
            _fmt(row["queries_per_decision"]),
            _fmt(row["hit_rate"]),
            _fmt(row["env_steps"]),
            *[_fmt(row["settings"].get(key)) for key in keys],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def best_record(cfg: SweepConfig, rows: Sequence[dict]) -> dict:
    """What ``best.json`` holds: the best trial's settings (dotted keys) and its scores.

    Raises:
        ValueError: No trial reported a result.
    """
    if not rows:
        raise ValueError("no trial reported a result; see the sweep's run.log")
    best = rows[0]
    return {
        "env": cfg.env,
        "space": cfg.space,
        "method": cfg.method,
        "split": cfg.split,
        "lambda_q": cfg.lambda_q,
        "trial_env_steps": cfg.trial_env_steps,
        "trial_id": best["trial_id"],
        METRIC: best[METRIC],
        "success": best["success"],
        "queries_per_decision": best["queries_per_decision"],
        "settings": best["settings"],
    }


def read_settings_file(path: str | Path) -> dict:
    """The ``settings`` of a ``best.json`` (dotted keys).

    Raises:
        ValueError: The file is not a settings file.
        FileNotFoundError: No such file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--settings {p}: no such file")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--settings {p}: not JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        raise ValueError(f"--settings {p}: no 'settings' object (a best.json from a sweep)")
    return dict(data["settings"])


def objective_plot(rows: Sequence[dict], path: str | Path) -> Path | None:
    """One panel per swept setting: the objective of each trial against the setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for row in rows for k in row["settings"]})
    if not rows or not keys:
        return None
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        xs = [row["settings"].get(key) for row in rows]
        ys = [row[METRIC] for row in rows]
        full = [not row["stopped_early"] for row in rows]
        ax.scatter(
            [x for x, f in zip(xs, full, strict=True) if f],
            [y for y, f in zip(ys, full, strict=True) if f],
            label="full budget",
        )
        ax.scatter(
            [x for x, f in zip(xs, full, strict=True) if not f],
            [y for y, f in zip(ys, full, strict=True) if not f],
            marker="x",
            label="stopped by ASHA",
        )
        ax.set_xlabel(key)
        ax.set_ylabel(METRIC)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def prior_app_name(temperature: float) -> str:
    """Serve application of the prior at ``T_prior = temperature`` (prior_temperature sweeps).

    Example:
        >>> prior_app_name(0.5)
        'prior_T0.5'
    """
    return f"prior_T{temperature:g}"


def space_temperatures(param_space: Mapping[str, Any]) -> list[float]:
    """The ``T_prior`` values a space can sample (empty when it does not sweep it)."""
    dom = param_space.get(PRIOR_TEMPERATURE)
    if dom is None:
        return []
    return [float(v) for v in getattr(dom, "categories", [dom])]


def meta_reward_matrix(
    rows: Sequence[Mapping[str, Any]],
    method: str,
    games: Sequence[str],
    seeds: Sequence[int],
    lambda_q: float,
) -> np.ndarray | None:
    """``(len(seeds), len(games))`` meta-rewards of a text-suite run: each cell the greedy
    success on the game minus ``lambda_q`` times the seed's training LM queries per training
    decision (one decision per env step). None while a seed is missing.

    Example:
        >>> rows = [{"method": "adaptive", "seed": 7, "train_lm_queries": 50,
        ...          "train_env_steps": 100, "per_game_success": {"g1": 1.0, "g2": 0.0}}]
        >>> meta_reward_matrix(rows, "adaptive", ["g1", "g2"], [7], 0.2).tolist()
        [[0.9, -0.1]]
    """
    from cachellm_rl.stats import score_matrix

    success = score_matrix(rows, method, games, seeds)
    if success is None:
        return None
    by_seed = {int(r["seed"]): r for r in rows if r["method"] == method}
    qpd = np.array(
        [by_seed[s]["train_lm_queries"] / max(1, by_seed[s]["train_env_steps"]) for s in seeds]
    )
    return np.round(success - lambda_q * qpd[:, None], 12)


def confirmation_report(
    default_rows: Sequence[Mapping[str, Any]],
    tuned_rows: Sequence[Mapping[str, Any]],
    *,
    method: str,
    games: Sequence[str],
    seeds: Sequence[int],
    lambda_q: float,
    reps: int = 5000,
) -> dict[str, Any]:
    """Paired comparison of a tuned run against the default settings on the same games and
    seeds: meta-reward and success differences (tuned - default) with 95% stratified-bootstrap
    CIs over (game, seed), probability of improvement, and each side's means.

    Raises:
        ValueError: A run misses a seed or a game.
    """
    from cachellm_rl.stats import compare, score_matrix

    out: dict[str, Any] = {"method": method, "games": len(games), "seeds": list(seeds)}
    for name, fn in (
        (METRIC, lambda rows: meta_reward_matrix(rows, method, games, seeds, lambda_q)),
        ("success", lambda rows: score_matrix(rows, method, games, seeds)),
    ):
        tuned, default = fn(tuned_rows), fn(default_rows)
        if tuned is None or default is None:
            raise ValueError(f"the {method} runs do not cover every seed {list(seeds)} and game")
        out[name] = {
            "tuned": float(tuned.mean()),
            "default": float(default.mean()),
            **compare(tuned, default, reps=reps),
        }
    for side, rows in (("tuned", tuned_rows), ("default", default_rows)):
        mine = [r for r in rows if r["method"] == method and int(r["seed"]) in set(seeds)]
        q = sum(int(r["train_lm_queries"]) for r in mine)
        n = sum(int(r["train_env_steps"]) for r in mine)
        out[f"{side}_queries_per_decision"] = q / n if n else None
    return out


# --------------------------------------------------------------------------- Ray shell


def _suite_config(cfg: SweepConfig):
    from cachellm_rl.algorithms.ps_dqn.suite import preset

    return preset(
        "quick",
        env=cfg.env,
        methods=(cfg.method,),
        seeds=(cfg.seed,),
        env_steps=cfg.trial_env_steps,
        num_games=cfg.num_games,
        split=cfg.split,
        games_dir=cfg.games_dir,
        prior_model=cfg.prior_model,
        prior_temperature=cfg.prior_temperature,
        num_env_runners=0,
        eval_every_env_steps=0,
        progress=False,
    )


def cache_trial(config: dict, sweep: SweepConfig) -> None:
    """One Tune trial: ``sweep.method`` with ``config``'s settings on the valid games, its own
    cache actor (named after the trial), reporting the meta-reward after every iteration."""
    import ray
    from ray import tune

    from cachellm_rl.algorithms.ps_dqn.methods import (
        algo_config_for,
        collect_reports,
        settings_with,
        start_cache,
    )
    from cachellm_rl.algorithms.ps_dqn.suite import env_config_for, suite_games
    from cachellm_rl.cache.actor import DEFAULT_NAMESPACE, kill_cache
    from cachellm_rl.envs.registry import env_class

    suite = _suite_config(sweep)
    overrides = dict(config)
    s = replace(settings_with(suite.settings, sweep.base_settings), prior_app=sweep.prior_app)
    if PRIOR_TEMPERATURE in overrides:
        s = replace(s, prior_app=prior_app_name(float(overrides.pop(PRIOR_TEMPERATURE))))
    s = settings_with(s, overrides)
    games = suite_games(suite)
    trial_id = tune.get_context().get_trial_id() or "trial"
    cache_name = f"tune_cache_{trial_id}"
    handle = start_cache(sweep.method, s, cache_name, DEFAULT_NAMESPACE, env=sweep.env)
    algo = algo_config_for(
        sweep.method,
        s,
        env_class=env_class(sweep.env),
        env_config=env_config_for(suite, games, sweep.seed),
        cache_name=cache_name,
        num_env_runners=0,
        total_env_steps=sweep.trial_env_steps,
        seed=sweep.seed,
    ).build_algo()
    episodes: list[dict] = []
    steps = 0
    try:
        while steps < sweep.trial_env_steps:
            result = algo.train()
            steps = int(result["env_runners"].get("num_env_steps_sampled_lifetime", steps))
            episodes += collect_reports(algo).episodes
            stats = ray.get(handle.stats.remote()).as_flat_dict()
            recent = episodes[-SUCCESS_WINDOW:]
            success = float(np.mean([e["success"] for e in recent])) if recent else 0.0
            decisions, queries = int(stats["decisions"]), int(stats["lm_queries"])
            tune.report(
                {
                    METRIC: meta_reward(success, queries, decisions, sweep.lambda_q),
                    "success": success,
                    "queries_per_decision": queries / decisions if decisions else None,
                    "hit_rate": stats["hit_rate"],
                    "lm_queries": queries,
                    "decisions": decisions,
                    "episodes": len(episodes),
                    "env_steps": steps,
                }
            )
    finally:
        algo.stop()
        kill_cache(cache_name, DEFAULT_NAMESPACE)


def progress_callback(total: int, enabled: bool):
    """A Tune callback that moves a progress bar as trials end (Tune's own table is off)."""
    from ray import tune
    from tqdm.auto import tqdm

    class Bar(tune.Callback):
        def __init__(self) -> None:
            self.bar = tqdm(total=total, desc="trials", unit="trial", disable=not enabled)
            self.best = -math.inf

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get(METRIC) is not None:
                self.best = max(self.best, float(result[METRIC]))
                self.bar.set_postfix_str(f"best {METRIC} {self.best:.3f}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.bar.update(1)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.bar.update(1)

    return Bar()


def deploy_priors(cfg: SweepConfig, param_space: Mapping[str, Any]) -> None:
    """Deploy the prior once (or once per ``T_prior`` a ``prior_temperature`` space samples),
    shared by all trials."""
    from cachellm_rl.prior.scoring import ScorerConfig
    from cachellm_rl.prior.server import PriorServerConfig, deploy_prior_server

    suite = _suite_config(cfg)

    def deploy(temperature: float, app: str) -> None:
        config = PriorServerConfig(
            scorer=ScorerConfig(
                model_dir=str(suite.prior_model),
                device="auto",
                prior_temperature=temperature,
            ),
            num_cpus=0,
        )
        deploy_prior_server(config, app_name=app)

    temps = space_temperatures(param_space)
    if not temps:
        deploy(suite.prior_temperature, cfg.prior_app)
    for t in temps:
        deploy(t, prior_app_name(t))


def run_sweep(cfg: SweepConfig, out: Path, *, progress: bool = True, console=None) -> dict:
    """Run (or resume) the sweep into ``out``: Tune's folder ``out/tune``, ``trials.jsonl``,
    ``table.md``, ``objective.png`` and ``best.json``. Returns the best record."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    suite = _suite_config(cfg)
    # Tune runs each trial in its own working directory: absolute paths only.
    cfg = replace(
        cfg,
        games_dir=str(Path(str(suite.games_dir)).resolve()),
        prior_model=str(Path(str(suite.prior_model)).resolve()),
    )
    param_space = space(cfg.space)
    deploy_priors(cfg, param_space)
    per_iteration = _suite_config(cfg).settings.env_steps_per_iteration
    iterations = max(1, math.ceil(cfg.trial_env_steps / per_iteration))
    trainable = tune.with_resources(
        tune.with_parameters(cache_trial, sweep=cfg), {"cpu": cfg.cpus_per_trial}
    )
    out = out.resolve()
    path = out / "tune"
    if tune.Tuner.can_restore(str(path)):
        logger.warning("resuming the sweep in %s", path)
        tuner = tune.Tuner.restore(
            str(path), trainable=trainable, resume_errored=True, param_space=param_space
        )
    else:
        searcher = None
        if cfg.searcher == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            searcher = OptunaSearch(seed=cfg.seed)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode="max",
                num_samples=cfg.num_samples,
                search_alg=searcher,
                scheduler=ASHAScheduler(
                    time_attr="training_iteration",
                    max_t=iterations,
                    grace_period=min(cfg.grace_iterations, iterations),
                    reduction_factor=cfg.reduction_factor,
                ),
                max_concurrent_trials=cfg.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=str(out),
                verbose=0,
                callbacks=[progress_callback(cfg.num_samples, progress)],
            ),
        )
    grid = tuner.fit()
    results = []
    for i in range(len(grid)):
        res = grid[i]
        results.append(
            {
                "trial_id": (res.metrics or {}).get("trial_id"),
                "metrics": res.metrics or {},
                "config": res.config or {},
                "budget": cfg.trial_env_steps,
                "error": repr(res.error) if res.error else None,
            }
        )
    with open(out / "trials.jsonl", "w") as f:
        for r in results:
            f.write(json.dumps(r, default=_json_default) + "\n")
    rows = trial_rows(results)
    failed = [r for r in results if r["error"]]
    if failed and console is not None:
        print(
            f"{len(failed)} of {len(results)} trials failed (tracebacks in run.log): "
            + "; ".join(f"{r['trial_id']}: {r['error']}" for r in failed[:3]),
            file=console,
            flush=True,
        )
    protocol = (
        f"{cfg.method} on {cfg.env}, {cfg.num_games or 'all'} `{cfg.split}` games, seed "
        f"{cfg.seed}, {cfg.trial_env_steps} env steps per trial, {len(results)} trials "
        f"({cfg.searcher} searcher, ASHA). {METRIC} = success of the last {SUCCESS_WINDOW} "
        f"training episodes - {cfg.lambda_q} x LM queries per decision."
    )
    table = top_table(rows, protocol=protocol)
    (out / "table.md").write_text(table)
    objective_plot(rows, out / "objective.png")
    best = best_record(cfg, rows)
    (out / "best.json").write_text(json.dumps(best, indent=1, default=_json_default) + "\n")
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
    if console is not None:
        print(table, file=console, flush=True)
    return best


def _json_default(obj: Any):
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


def sweep_main(
    cfg: SweepConfig,
    out: Path,
    *,
    verbose: bool = False,
    num_cpus: int | None = None,
    progress: bool = True,
) -> int:
    """A sweep as a command runs it: library logs to ``out/run.log``, the env's games and
    prior made when missing, Ray started (or joined), the top table printed."""
    from cachellm_rl.algorithms.ps_dqn.suite import ensure_inputs
    from cachellm_rl.argparsing import suite_ray
    from cachellm_rl.logs import run_log

    out.mkdir(parents=True, exist_ok=True)
    with run_log(out / "run.log", verbose=verbose) as console:
        print(f"sweep -> {out} (library logs: {out / 'run.log'})", file=console, flush=True)
        ensure_inputs(_suite_config(cfg), progress=progress, console=console)
        with suite_ray(verbose=verbose, num_cpus=num_cpus):
            try:
                best = run_sweep(cfg, out, progress=progress, console=console)
            except ValueError as e:
                print(f"tune: error: {e}", file=console, flush=True)
                return 1
        print(
            f"best {METRIC} {best[METRIC]:.3f} (success {best['success']:.2f}); "
            f"settings in {out / 'best.json'}",
            file=console,
            flush=True,
        )
    return 0
