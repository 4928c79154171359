"""The suite layer every experiment suite composes (see docs/results.md).

A suite runs a list of methods over seeds on one env, appends one row per finished
(method, seed) run to ``runs.jsonl`` (and learning-curve points to ``curves.jsonl``), resumes an
interrupted suite from those files, and turns the rows into per-method aggregates with
stratified-bootstrap 95% CIs over (game, seed), paired comparisons, ``summary.json`` and
``table.md``. A method is an algorithm with a cache preset (:class:`SuiteMethod`); what an
algorithm does in one run is the suite's own business (its ``run_one`` callback).

The text suite (``cachellm_rl.algorithms.ps_dqn.suite``) and the offline suite
(``cachellm_rl.algorithms.cql_prior.suite``) are compositions of this module. It imports no
algorithm: algorithms import it.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from tqdm.auto import tqdm

from cachellm_rl import stats as rstats
from cachellm_rl.contracts import LatencyHistogram
from cachellm_rl.envs.evaluate import short_game_names
from cachellm_rl.results import append_jsonl, markdown_table, read_jsonl, write_json

logger = logging.getLogger(__name__)

RUNS_FILE = "runs.jsonl"
CURVES_FILE = "curves.jsonl"
# How a method gets its priors: ``none`` (no LM), ``uncached`` (every decision asks the LM) or
# one of the cache presets (see docs/cache.md).
CACHE_PRESETS = ("none", "uncached", "exact_only", "lru", "static", "adaptive")


@dataclass(frozen=True)
class SuiteMethod:
    """A method of a suite: an algorithm with a cache preset.

    Attributes:
        name: The method's name in rows and tables.
        algorithm: What the suite runs (e.g. ``ps_dqn``, ``prior_argmax``, ``cql``).
        cache: Where its priors come from, one of :data:`CACHE_PRESETS`.
        deterministic: The run does not depend on the seed: it runs once (seed 0) and stands
            for every seed in paired comparisons.
    """

    name: str
    algorithm: str
    cache: str
    deterministic: bool = False

    def __post_init__(self) -> None:
        if self.cache not in CACHE_PRESETS:
            raise ValueError(f"{self.name}: cache preset must be one of {CACHE_PRESETS}")


@dataclass
class RunOutcome:
    """Everything measured in one (method, seed) run: its row, its curve points and its
    decision latencies (hit, miss)."""

    row: dict
    curve: list[dict] = field(default_factory=list)
    latency_hit: LatencyHistogram = field(default_factory=LatencyHistogram)
    latency_miss: LatencyHistogram = field(default_factory=LatencyHistogram)


def planned_runs(methods: Sequence[SuiteMethod], seeds: Sequence[int]) -> list[tuple[str, int]]:
    """The (method, seed) runs of a suite: deterministic methods once (seed 0, first), the
    others per seed, seed-major.

    Example:
        >>> ms = [SuiteMethod("a", "x", "none"), SuiteMethod("d", "y", "uncached", True)]
        >>> planned_runs(ms, [0, 1])
        [('d', 0), ('a', 0), ('a', 1)]
    """
    once = [(m.name, 0) for m in methods if m.deterministic]
    return once + [(m.name, s) for s in seeds for m in methods if not m.deterministic]


Histograms = dict[str, tuple[LatencyHistogram, LatencyHistogram]]


def run_suite(
    out: Path,
    runs: Sequence[tuple[str, int]],
    run_one: Callable[[str, int, Any], RunOutcome],
    write_outputs: Callable[[Histograms], dict],
    *,
    desc: str,
    progress: bool = True,
    console: TextIO | None = None,
    degraded: Mapping[str, str] | None = None,
) -> dict:
    """Run every (method, seed) not yet in ``out/runs.jsonl``, appending rows as they finish.

    Args:
        out: Results folder (created). Rows already there are kept: a suite that stopped is
            resumed by running it again with the same folder.
        runs: The planned runs, in order.
        run_one: ``(method, seed, progress bar) -> RunOutcome``.
        write_outputs: Writes summary, tables and plots from the rows so far; called after
            every run, given the latency histograms of this invocation's runs.
        desc: Progress bar label.
        progress: Show the progress bar.
        console: Stream for the progress bar and warnings (default stderr).
        degraded: Row counters of decisions that did not get the served prior, with what to
            tell the user when one is non-zero.

    Returns:
        What the last ``write_outputs`` returned.
    """
    out.mkdir(parents=True, exist_ok=True)
    done = {(r["method"], int(r["seed"])) for r in read_jsonl(out / RUNS_FILE)}
    todo = [r for r in runs if r not in done]
    if done:
        logger.warning(
            "resuming %s: %d of %d runs already done", out, len(runs) - len(todo), len(runs)
        )
    hists: Histograms = {}
    bar = tqdm(todo, desc=desc, disable=not progress, unit="run", file=console)
    for method, seed in bar:
        outcome = run_one(method, seed, bar)
        append_jsonl(out / RUNS_FILE, outcome.row)
        for key, what in (degraded or {}).items():
            if outcome.row.get(key):
                print(
                    f"warning: {method} s{seed}: {outcome.row[key]} decisions {what}",
                    file=console or sys.stderr,
                    flush=True,
                )
        for c in outcome.curve:
            append_jsonl(out / CURVES_FILE, c)
        h = hists.get(method, (LatencyHistogram(), LatencyHistogram()))
        hists[method] = (h[0].merged(outcome.latency_hit), h[1].merged(outcome.latency_miss))
        write_outputs(hists)
    return write_outputs(hists)


# -- aggregation ------------------------------------------------------------------------------
def avg(rs: Sequence[dict], key: str) -> float | None:
    """Mean of the finite numbers under ``key`` (None when there are none).

    Example:
        >>> avg([{"x": 1}, {"x": 3.0}, {"x": None}, {}], "x")
        2.0
    """
    vals = [r[key] for r in rs if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
    return float(np.mean(vals)) if vals else None


def reuse_audit(rs: Sequence[dict]) -> dict:
    """Semantic reuse share and the audited error of served semantic reuses, pooled over runs
    (Wilson 95% interval); empty for methods without a semantic tier."""
    decisions = sum(int(r.get("decisions", 0)) for r in rs)
    semantic = sum(int(r.get("hits_semantic", 0)) for r in rs)
    audits = sum(int(r.get("audits", 0)) for r in rs)
    wrong = sum(int(r.get("audits_wrong", 0)) for r in rs)
    if not decisions or not semantic:
        return {}
    out: dict = {"semantic_share": semantic / decisions, "audits": audits}
    if audits:
        lo, hi = rstats.wilson_interval(wrong, audits)
        out.update(
            audited_error=wrong / audits,
            audited_error_ci=[lo, hi],
            audited_error_wilson_hi=hi,
            audited_error_per_lookup=wrong / audits * semantic / decisions,
        )
    return out


def success_matrices(
    rows: Sequence[dict], methods: Sequence[str], games: Sequence[str], seeds: Sequence[int]
) -> dict[str, np.ndarray | None]:
    """Each method's ``(seeds, games)`` greedy-success matrix (None until every seed is in)."""
    names = short_game_names(list(games))
    keys = [names[str(g)] for g in games]
    return {m: rstats.score_matrix(rows, m, keys, seeds) for m in methods}


def method_aggregates(
    rows: Sequence[dict],
    mats: Mapping[str, np.ndarray | None],
    methods: Sequence[str],
    avg_keys: Iterable[str],
    *,
    reps: int = rstats.DEFAULT_REPS,
) -> dict[str, dict]:
    """Per-method aggregates: ``success_mean`` (with its stratified-bootstrap 95% CI over
    (game, seed) and IQM once the method's matrix is complete), the mean of each of
    ``avg_keys`` over its runs, and the pooled reuse audit."""
    keys = list(avg_keys)
    out: dict[str, dict] = {}
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            continue
        agg: dict = {
            "success_mean": float(np.mean([r["success"] for r in rs])),
            "seeds": len(rs),
            "success_per_seed": [r["success"] for r in rs],
            **{k: avg(rs, k) for k in keys},
            **reuse_audit(rs),
        }
        mat = mats.get(m)
        if mat is not None:
            ci = rstats.mean_interval(mat, reps=reps)
            agg.update(
                success_mean=ci.value,
                success_ci95=[ci.low, ci.high],
                success_iqm=rstats.iqm_interval(mat, reps=reps).value,
            )
        out[m] = agg
    return out


def queries_relative_to(agg: dict[str, dict], base: str, key: str = "train_lm_queries") -> None:
    """Adds ``<key>_vs_<base>`` (each method's ``key`` over ``base``'s) in place."""
    ref = agg.get(base, {}).get(key)
    if not ref:
        return
    for a in agg.values():
        if a.get(key) is not None:
            a[f"{key}_vs_{base}"] = a[key] / ref


def paired_comparisons(
    mats: Mapping[str, np.ndarray | None],
    pairs: Iterable[tuple[str, str] | tuple[str, str, str]],
    *,
    reps: int = rstats.DEFAULT_REPS,
) -> dict[str, dict]:
    """``a vs b`` (or the given label) for each pair whose two matrices are complete: paired
    success difference and probability of improvement with 95% CIs (rliable)."""
    out: dict[str, dict] = {}
    for pair in pairs:
        a, b = pair[0], pair[1]
        label = pair[2] if len(pair) > 2 else f"{a} vs {b}"  # type: ignore[misc]
        if mats.get(a) is not None and mats.get(b) is not None and a != b:
            out[label] = rstats.compare(mats[a], mats[b], reps=reps)  # type: ignore[arg-type]
    return out


def best_of(candidates: Sequence[str], mats: Mapping, agg: Mapping[str, dict]) -> str | None:
    """The candidate with the highest mean success among those with a complete matrix."""
    have = [c for c in candidates if mats.get(c) is not None and c in agg]
    return max(have, key=lambda c: agg[c]["success_mean"]) if have else None


# -- tables -----------------------------------------------------------------------------------
COMPARISON_COLUMNS = (
    ("comparison", "paired comparison"),
    ("diff", "success difference"),
    ("diff_ci", "95% CI"),
    ("poi", "P(improvement)"),
    ("poi_ci", "95% CI"),
)


def ci_text(lo_hi) -> str | None:
    """``[lo, hi]`` with signs and two decimals (None for no interval).

    Example:
        >>> ci_text([-0.1234, 0.5])
        '[-0.12, +0.50]'
    """
    if not lo_hi:
        return None
    return f"[{lo_hi[0]:+.2f}, {lo_hi[1]:+.2f}]"


def comparison_rows(comparisons: Mapping[str, dict]) -> list[dict]:
    """Table rows of :func:`paired_comparisons`' output."""
    return [
        {
            "comparison": k,
            "diff": v["difference"]["value"],
            "diff_ci": ci_text([v["difference"]["low"], v["difference"]["high"]]),
            "poi": v["probability_of_improvement"]["value"],
            "poi_ci": ci_text(
                [v["probability_of_improvement"]["low"], v["probability_of_improvement"]["high"]]
            ),
        }
        for k, v in comparisons.items()
    ]


def method_rows(agg: Mapping[str, dict]) -> list[dict]:
    """Table rows of :func:`method_aggregates`' output (with ``success_ci`` as text)."""
    return [
        {"method": m, **a, "success_ci": ci_text(a.get("success_ci95"))} for m, a in agg.items()
    ]


def write_table(
    out: Path,
    title: str,
    note: str,
    agg: Mapping[str, dict],
    columns: Sequence[tuple[str, str]],
    comparisons: Mapping[str, dict],
    *,
    extra: str = "",
) -> str:
    """``table.md``: title, protocol note, the methods' table, the comparisons' table and
    ``extra``; returns its text."""
    table = markdown_table(method_rows(agg), columns)
    comp_rows = comparison_rows(comparisons)
    comp = markdown_table(comp_rows, COMPARISON_COLUMNS) if comp_rows else ""
    text = f"# {title}\n\n{note}\n\n{table}\n{comp}{extra}"
    (out / "table.md").write_text(text)
    return text


def write_env_summary(
    out: Path,
    summaries: Mapping[str, dict],
    columns: Sequence[tuple[str, str]],
    title: str,
) -> str:
    """The all-envs ``summary.json`` and ``table.md`` of a multi-env suite run (each env's own
    results are in ``out/<env>/``); returns the markdown table."""
    rows = [
        {"env": env, **row} for env, s in summaries.items() for row in method_rows(s["methods"])
    ]
    write_json(
        out / "summary.json",
        {
            "envs": {
                env: {
                    "methods": s["methods"],
                    "comparisons": s["comparisons"],
                    "protocol_note": s["protocol_note"],
                }
                for env, s in summaries.items()
            }
        },
    )
    notes = "\n".join(f"- {env}: {s['protocol_note']}" for env, s in summaries.items())
    table = f"# {title}\n\n" + notes + "\n\n" + markdown_table(rows, columns)
    (out / "table.md").write_text(table)
    return table


def read_rows(out: Path, seeds: Iterable[int] | None = None) -> tuple[list[dict], list[dict]]:
    """The rows and curve points of a results folder.

    Args:
        out: The results folder.
        seeds: Keep only these seeds' rows and curve points (a deterministic method's single
            row stands for every seed and is kept). None keeps everything. A folder resumed
            with fewer ``--seeds`` than it holds is summarised on the requested seeds only, so
            every column of its table describes the same runs.
    """
    rows, curves = read_jsonl(out / RUNS_FILE), read_jsonl(out / CURVES_FILE)
    if seeds is None:
        return rows, curves
    keep = {int(s) for s in seeds}
    rows = [r for r in rows if r.get("deterministic") or int(r["seed"]) in keep]
    curves = [c for c in curves if "seed" not in c or int(c["seed"]) in keep]
    return rows, curves
