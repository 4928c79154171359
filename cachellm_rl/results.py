"""Results folders (see docs/results.md): resolved config, per-run rows, aggregates with 95% CIs,
``table.md``, PNG plots and TensorBoard events. Shared by the experiment suites.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np

# t_{0.975, df} for small df (df >= 31 uses 1.96).
_T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    15: 2.131,
    20: 2.086,
    30: 2.042,
}


def t_critical(df: int) -> float:
    """Two-sided 95% Student-t critical value (conservative between table entries).

    Example:
        >>> t_critical(2)
        4.303
    """
    if df < 1:
        return float("nan")
    for k in sorted(_T975):
        if df <= k:
            return _T975[k]
    return 1.96


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (NaN half-width for one value).

    Example:
        >>> m, h = mean_ci95([0.5, 0.7, 0.6])
        >>> round(m, 3), round(h, 3)
        (0.6, 0.248)
    """
    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size == 1:
        return float(x[0]), float("nan")
    return float(x.mean()), float(t_critical(x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))


def binomial_ci95(successes: Sequence[float]) -> float:
    """Half-width of the normal-approximation 95% interval of a success rate over episodes."""
    x = np.asarray(list(successes), dtype=float)
    if x.size == 0:
        return float("nan")
    p = x.mean()
    return float(1.96 * math.sqrt(max(p * (1 - p), 0.0) / x.size))


def to_jsonable(obj):
    """Dataclasses, numpy scalars/arrays and NaN (as None) to plain JSON values."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def new_results_dir(name: str, out: str | Path | None = None, root: str | Path = "results") -> Path:
    """``out`` if given, else ``results/<name>-<timestamp>``; created."""
    path = Path(out) if out else Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(obj), indent=1))
    tmp.replace(path)


def append_jsonl(path: Path, row: Mapping) -> None:
    """Append one JSON row (results survive a crash mid-run)."""
    with path.open("a") as f:
        f.write(json.dumps(to_jsonable(row)) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """All rows of a JSON-lines file ([] when missing)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(v, digits: int = 3) -> str:
    """A table cell: ``digits`` decimals below 10, one below 100, none above (counts, ms)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:.0f}"
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.{digits}f}"
    return str(v)


def markdown_table(rows: Iterable[Mapping], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of ``rows`` with ``(key, header)`` columns."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body]) + "\n"


class TensorBoardLogger:
    """One TensorBoard run folder per (method, seed); a no-op when tensorboard is missing."""

    def __init__(self, logdir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # pragma: no cover - tensorboard is a declared dependency
            self._writer = None
            return
        self._writer = SummaryWriter(log_dir=str(logdir))

    def scalars(self, step: int, values: Mapping[str, float | None]) -> None:
        """Log the finite scalar values at ``step`` (None and NaN are skipped)."""
        if self._writer is None:
            return
        for k, v in values.items():
            if v is not None and isinstance(v, int | float) and math.isfinite(v):
                self._writer.add_scalar(k, float(v), step)

    def close(self) -> None:
        """Flush and close."""
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
