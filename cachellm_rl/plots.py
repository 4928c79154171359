"""PNG plots of suite results (matplotlib, headless)."""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_curve(runs: Sequence[Sequence[tuple[float, float]]], grid: np.ndarray):
    """Mean and standard error over runs of step curves interpolated on ``grid``."""
    ys = []
    for pts in runs:
        pts = [(x, y) for x, y in pts if y is not None and np.isfinite(y)]
        if not pts:
            continue
        x, y = np.array(pts, dtype=float).T
        ys.append(np.interp(grid, x, y, left=np.nan, right=y[-1]))
    if not ys:
        return None, None
    arr = np.vstack(ys)
    # Grid points before a run's first point are NaN in every run: no warning for those.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(arr, axis=0)
        se = np.nanstd(arr, axis=0) / np.sqrt(np.maximum(np.sum(~np.isnan(arr), 0), 1))
    return mean, se


def plot_curves(
    curves: Sequence[Mapping],
    *,
    y: str,
    ylabel: str,
    out: Path,
    title: str,
    x: str = "env_steps",
    logy: bool = False,
    hlines: Mapping[str, float] | None = None,
) -> Path:
    """One line per method (mean over seeds, shaded standard error) of ``y`` against ``x``.

    Args:
        curves: Rows with ``method``, ``seed``, ``x`` and ``y``.
        y: Column to plot.
        ylabel: Y-axis label.
        out: PNG path.
        title: Plot title.
        x: X column.
        logy: Log-scale y axis.
        hlines: Reference levels drawn as dashed horizontal lines (e.g. ``direct_lm``).

    Returns:
        ``out``.
    """
    plt = _plt()
    by: dict[str, dict[int, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in curves:
        if r.get(y) is not None:
            by[r["method"]][r["seed"]].append((r[x], r[y]))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xmax = max((r[x] for r in curves), default=1)
    grid = np.linspace(0, xmax, 200)
    for method, seeds in by.items():
        mean, se = _mean_curve([sorted(v) for v in seeds.values()], grid)
        if mean is None:
            continue
        ax.plot(grid, mean, label=method)
        ax.fill_between(grid, mean - se, mean + se, alpha=0.2)
    for k, (label, level) in enumerate((hlines or {}).items()):
        ax.axhline(level, linestyle="--", color=f"C{(len(by) + k) % 10}", label=label)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("symlog")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_latency_histogram(
    histograms: Mapping[str, tuple[Sequence[float], Sequence[int], Sequence[int]]],
    *,
    out: Path,
    title: str,
) -> Path:
    """Decision-latency histograms split hit/miss, one panel per method.

    Args:
        histograms: ``method -> (bucket edges ms, hit counts, miss counts)``.
        out: PNG path.
        title: Figure title.
    """
    plt = _plt()
    methods = list(histograms)
    fig, axes = plt.subplots(
        1, max(len(methods), 1), figsize=(3.2 * max(len(methods), 1), 3.2), squeeze=False
    )
    for ax, m in zip(axes[0], methods, strict=False):
        bucket_edges, hits, misses = histograms[m]
        edges = np.asarray(bucket_edges)
        centers = np.sqrt(edges[:-1] * edges[1:])
        widths = np.diff(edges)
        for counts, label in ((hits, "hit"), (misses, "miss")):
            c = np.asarray(counts)[1 : len(edges)]
            if c.sum():
                ax.bar(centers, c, width=widths, alpha=0.6, label=label, align="center")
        ax.set_xscale("log")
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("decision latency (ms)")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
