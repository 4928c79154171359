"""Command-line parsing for the experiment scripts: a user's mistake is one line on stderr and
exit code 2, never a traceback or a usage dump."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors print ``prog: error: message`` only.

    Example:
        >>> p = ArgumentParser(prog="x")
        >>> _ = p.add_argument("--n", type=int)
        >>> try:
        ...     p.parse_args(["--n", "two"])
        ... except SystemExit as e:
        ...     e.code
        2
    """

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def user_error(prog: str, message: str) -> int:
    """Print a one-line error for ``prog`` and return exit code 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def add_suite_arguments(p: argparse.ArgumentParser) -> None:
    """The options every suite script shares: seeds, games, prior, logs, Ray and output."""
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (0..N-1)")
    p.add_argument("--num-games", type=int, default=None, help="evaluation games (0 = all)")
    p.add_argument("--games", type=Path, default=None, help="game suite (one env only)")
    p.add_argument("--prior-model", type=Path, default=None, help="HF model dir (one env only)")
    p.add_argument("--prior-temperature", type=float, default=None, help="T_prior")
    p.add_argument("-v", "--verbose", action="store_true", help="library logs on the terminal")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default 2)")
    p.add_argument("--out", type=Path, default=None, help="results folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_suite_envs(p: ArgumentParser, args: argparse.Namespace) -> None:
    """Splits ``args.envs`` into a list and checks it (errors go through ``p.error``)."""
    from cachellm_rl.envs.registry import check_env_id

    args.envs = [e.strip() for e in args.envs.split(",") if e.strip()]
    try:
        for env in args.envs:
            check_env_id(env)
    except ValueError as e:
        p.error(str(e))
    if not args.envs:
        p.error("--envs is empty")
    if len(set(args.envs)) != len(args.envs):
        p.error(f"--envs lists an env twice: {args.envs}")
    if len(args.envs) > 1 and (args.games or args.prior_model):
        p.error("--games and --prior-model apply to one env; each env uses its defaults")


@contextlib.contextmanager
def suite_ray(*, verbose: bool, num_cpus: int | None) -> Iterator[None]:
    """Ray for a suite script: a local Ray it starts (and stops, with Serve, at the end), or a
    caller's running Ray (e.g. a job's cluster or a test session), left running with only the
    prior's Serve application deleted."""
    import ray
    from ray import serve

    from cachellm_rl.config import init_ray
    from cachellm_rl.contracts import DEFAULT_PRIOR_APP

    owns_ray = not ray.is_initialized()
    overrides: dict[str, Any] = {"log_to_driver": verbose}
    if num_cpus:
        overrides["num_cpus"] = num_cpus
    init_ray(**overrides)
    try:
        yield
    finally:
        if owns_ray:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(DEFAULT_PRIOR_APP)
