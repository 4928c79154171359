"""Aggregates over (game, seed) score matrices with rliable (Agarwal et al., "Deep RL at the
edge of the statistical precipice", NeurIPS 2021): stratified-bootstrap 95% CIs that resample
games (tasks) and then seeds (runs) within each game, the interquartile mean, and the
probability of improvement. Paired comparisons use the same games and seeds for both methods.

A score matrix has shape ``(num_seeds, num_games)``: one row per seed, one column per game, in
the same game order for every method. A deterministic method (``direct_lm``) has one row
repeated for every seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_REPS = 5000


@dataclass(frozen=True)
class Interval:
    """A point estimate and its 95% bootstrap interval."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def score_matrix(
    rows: Sequence[Mapping], method: str, games: Sequence[str], seeds: Sequence[int]
) -> np.ndarray | None:
    """``(len(seeds), len(games))`` success matrix of ``method`` from suite rows.

    Rows carry ``method``, ``seed`` and ``per_game_success`` keyed by game name. The single row
    of a method marked ``"deterministic": True`` (``direct_lm``) stands for every seed. Returns
    None when the method has no row, or misses a seed or a game.

    Example:
        >>> rows = [{"method": "a", "seed": s, "per_game_success": {"g1": s, "g2": 1.0}}
        ...         for s in (0, 1)]
        >>> score_matrix(rows, "a", ["g1", "g2"], [0, 1]).tolist()
        [[0.0, 1.0], [1.0, 1.0]]
        >>> print(score_matrix(rows[:1], "a", ["g1", "g2"], [0, 1]))  # seed 1 still running
        None
        >>> det = [{"method": "d", "seed": 0, "deterministic": True,
        ...         "per_game_success": {"g1": 1.0, "g2": 0.0}}]
        >>> score_matrix(det, "d", ["g1", "g2"], [0, 1]).tolist()
        [[1.0, 0.0], [1.0, 0.0]]
    """
    by_seed = {int(r["seed"]): r for r in rows if r["method"] == method}
    if not by_seed:
        return None
    only = next(iter(by_seed.values()))
    if len(by_seed) == 1 and only.get("deterministic"):
        by_seed = {s: only for s in seeds}
    out = np.zeros((len(seeds), len(games)))
    for i, s in enumerate(seeds):
        if s not in by_seed:
            return None
        per_game = by_seed[s]["per_game_success"]
        for j, g in enumerate(games):
            if g not in per_game:
                return None
            out[i, j] = float(per_game[g])
    return out


_MEMO: dict[tuple, Interval] = {}
_MEMO_SIZE = 4096


def _memo_key(kind: str, arrays: tuple[np.ndarray, ...], reps: int, seed: int) -> tuple:
    return (kind, reps, seed, *((a.shape, a.tobytes()) for a in arrays))


def _remember(key: tuple, out: Interval) -> Interval:
    """Keep ``out`` under ``key`` (the oldest estimate goes when the memo is full)."""
    if len(_MEMO) >= _MEMO_SIZE:
        _MEMO.pop(next(iter(_MEMO)))
    _MEMO[key] = out
    return out


def _estimate(kind: str, scores: tuple[np.ndarray, ...], func, reps: int, seed: int) -> Interval:
    """rliable's stratified-bootstrap estimate of ``func`` on ``scores``, memoised.

    The bootstrap is seeded (rliable's stratified bootstrap draws its indices from NumPy's
    global generator whatever ``random_state`` says, so that generator is seeded for the call
    and restored after it), so an estimate depends only on ``(kind, scores, reps, seed)``: a
    suite that rewrites its aggregates after every run recomputes only the methods whose scores
    changed. Scores with a single value everywhere have that value as their estimate and
    interval (every resample is the same), without a bootstrap.
    """
    arrays = tuple(np.asarray(x, dtype=np.float64) for x in scores)
    key = _memo_key(kind, arrays, reps, seed)
    hit = _MEMO.get(key)
    if hit is not None:
        return hit
    if kind in ("mean", "iqm") and np.ptp(arrays[0]) == 0:
        v = float(arrays[0].flat[0])
        out = Interval(v, v, v)
    else:
        from rliable import library as rly

        data = arrays[0] if len(arrays) == 1 else arrays
        saved = np.random.get_state()
        np.random.seed(seed)
        try:
            point, ci = rly.get_interval_estimates(
                {"m": data},
                func,
                task_bootstrap=True,
                reps=reps,
                random_state=np.random.RandomState(seed),
            )
        finally:
            np.random.set_state(saved)
        out = Interval(float(np.ravel(point["m"])[0]), float(ci["m"][0][0]), float(ci["m"][1][0]))
    return _remember(key, out)


def mean_interval(scores: np.ndarray, *, reps: int = DEFAULT_REPS, seed: int = 0) -> Interval:
    """Mean over (seed, game) with its stratified-bootstrap 95% CI (games, then seeds)."""
    return _estimate("mean", (scores,), lambda x: np.array([np.mean(x)]), reps, seed)


def iqm_interval(scores: np.ndarray, *, reps: int = DEFAULT_REPS, seed: int = 0) -> Interval:
    """Interquartile mean over (seed, game) with its 95% CI."""
    from rliable import metrics

    return _estimate("iqm", (scores,), lambda x: np.array([metrics.aggregate_iqm(x)]), reps, seed)


def paired_difference(
    a: np.ndarray, b: np.ndarray, *, reps: int = DEFAULT_REPS, seed: int = 0
) -> Interval:
    """Mean of ``a - b`` over the same (seed, game) cells, with its 95% CI.

    Example:
        >>> a = np.ones((2, 4)); b = np.zeros((2, 4))
        >>> paired_difference(a, b, reps=200).as_dict()
        {'value': 1.0, 'low': 1.0, 'high': 1.0}
    """
    if a.shape != b.shape:
        raise ValueError(f"paired scores need equal shapes, got {a.shape} and {b.shape}")
    return mean_interval(a - b, reps=reps, seed=seed)


def probability_of_improvement(
    a: np.ndarray, b: np.ndarray, *, reps: int = DEFAULT_REPS, seed: int = 0
) -> Interval:
    """P(a run of ``a`` beats a run of ``b`` on a random game), ties counting one half
    (rliable's ``probability_of_improvement``), with its 95% percentile-bootstrap CI over
    games, then seeds within a game (see :func:`_poi_bootstrap`).

    Example:
        >>> a = np.array([[1.0, 1.0, 0.0, 1.0]]); b = np.array([[0.0, 1.0, 0.0, 0.0]])
        >>> iv = probability_of_improvement(a, b, reps=500)
        >>> iv.value, iv.low < iv.value <= iv.high
        (0.75, True)
    """
    from rliable import metrics

    if a.shape != b.shape:
        raise ValueError(f"paired scores need equal shapes, got {a.shape} and {b.shape}")
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    key = _memo_key("poi", (a, b), reps, seed)
    hit = _MEMO.get(key)
    if hit is not None:
        return hit
    point = float(metrics.probability_of_improvement(a, b))
    draws = _poi_bootstrap(a, b, reps=reps, seed=seed)
    return _remember(
        key, Interval(point, float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5)))
    )


def _poi_bootstrap(a: np.ndarray, b: np.ndarray, *, reps: int, seed: int) -> np.ndarray:
    """Bootstrap draws of the probability of improvement: games resampled with the same
    indices for both methods (the comparison is paired by game), then each method's seeds
    resampled within each drawn game.

    rliable's own interval for this statistic resamples seeds only, so with one seed it is a
    single point whatever the games say; resampling games too makes it an interval over the
    same (game, seed) population as the other CIs of the suite.
    """
    rng = np.random.default_rng(seed)
    n_seeds, n_games = a.shape
    out = np.empty(reps)
    chunk = max(1, 200_000 // max(1, n_games * n_seeds * n_seeds))
    for start in range(0, reps, chunk):
        r = min(chunk, reps - start)
        g = rng.integers(0, n_games, size=(r, 1, n_games))
        xa = a[rng.integers(0, n_seeds, size=(r, n_seeds, n_games)), g]  # (r, seeds, games)
        yb = b[rng.integers(0, n_seeds, size=(r, n_seeds, n_games)), g]
        gt = xa[:, :, None, :] > yb[:, None, :, :]
        eq = xa[:, :, None, :] == yb[:, None, :, :]
        out[start : start + r] = (gt + 0.5 * eq).mean(axis=(1, 2, 3))
    return out


def compare(
    a: np.ndarray, b: np.ndarray, *, reps: int = DEFAULT_REPS, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Paired difference of means and probability of improvement of ``a`` over ``b``."""
    return {
        "difference": paired_difference(a, b, reps=reps, seed=seed).as_dict(),
        "probability_of_improvement": probability_of_improvement(
            a, b, reps=reps, seed=seed
        ).as_dict(),
    }


def wilson_upper(k, n, *, z: float = 1.645) -> np.ndarray:
    """Wilson upper bound of ``k / n`` (elementwise; one-sided 95% for ``z = 1.645``), the
    upper end of :func:`wilson_interval` without its checks, for arrays of counts.

    Example:
        >>> round(float(wilson_upper(0, 300, z=1.96)), 4)
        0.0126
    """
    k = np.asarray(k, np.float64)
    n = np.asarray(n, np.float64)
    p = k / n
    denom = 1 + z**2 / n
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return np.minimum(1.0, (p + z**2 / (2 * n) + half) / denom)


def wilson_interval(k: int, n: int, *, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n`` (95% for ``z = 1.96``).

    Example:
        >>> lo, hi = wilson_interval(0, 300)
        >>> lo, round(hi, 4)
        (0.0, 0.0126)
    """
    if n <= 0:
        raise ValueError(f"wilson_interval needs n > 0, got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))
