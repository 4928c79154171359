"""Quiet runs: the terminal shows progress bars, our own warnings and the results; library noise
(Ray, RLlib, Serve and transformers INFO and deprecation messages, numpy warnings, C++ log lines)
goes to the run's log file.

The redirection is at the file-descriptor level (stdout and stderr, fds 1 and 2, point at the
log file while a run is quiet), because Ray's C++ core, its raylet messages and its worker
processes write there directly, bypassing Python's logging. Progress bars, our messages and the
results get a stream onto the *original* stdout: write them there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

_OUR_LOGGER = "cachellm_rl"
_LIBRARY_LOGGERS = ("ray", "ray.rllib", "ray.serve", "ray.data", "ray.tune", "transformers")


@contextlib.contextmanager
def run_log(path: str | Path, *, verbose: bool = False) -> Iterator[TextIO]:
    """Send library noise to ``path`` for the duration of a run.

    Args:
        path: Log file (appended to; its folder is created).
        verbose: Change nothing: everything stays on the terminal (``-v``). The log file still
            gets Python log records.

    Yields:
        The stream for progress bars, console messages and results (the terminal's stdout).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with run_log(Path(d) / "run.log") as console:
        ...         logging.getLogger("ray").warning("noise")
        ...     "noise" in (Path(d) / "run.log").read_text()
        True
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    saved_level = root.level
    root.addHandler(file_handler)
    root.setLevel(logging.INFO)
    if verbose:
        try:
            yield sys.stdout
        finally:
            root.removeHandler(file_handler)
            root.setLevel(saved_level)
            file_handler.close()
        return
    saved: dict[str, tuple[int, bool]] = {}
    for name in _LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        saved[name] = (lg.level, lg.propagate)
        lg.propagate = True
    _quiet_transformers()
    logging.captureWarnings(True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = {fd: os.dup(fd) for fd in (1, 2)}
    log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for fd in (1, 2):
        os.dup2(log_fd, fd)
    os.close(log_fd)
    console = os.fdopen(os.dup(saved_fds[1]), "w", buffering=1)
    ours = logging.getLogger(_OUR_LOGGER)
    console_handler = logging.StreamHandler(console)
    console_handler.setLevel(logging.WARNING)
    console_handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    ours.addHandler(console_handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield console
    finally:
        ours.removeHandler(console_handler)
        logging.captureWarnings(False)
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved_fd in saved_fds.items():
            os.dup2(saved_fd, fd)
            os.close(saved_fd)
        console.flush()
        console.close()
        for name, (level, propagate) in saved.items():
            lg = logging.getLogger(name)
            lg.setLevel(level)
            lg.propagate = propagate
        root.removeHandler(file_handler)
        root.setLevel(saved_level)
        file_handler.close()


def _quiet_transformers() -> None:
    """Route transformers' own log handler through Python logging (to the log file)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
