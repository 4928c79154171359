"""Command-line parsing for the experiment scripts: a user's mistake is one line on stderr and
exit code 2, never a traceback or a usage dump."""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from cachellm_rl.config import PLACEMENT_SLIVER


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


def suite_seeds(args: argparse.Namespace) -> tuple[int, ...] | None:
    """The seeds ``--seeds N --first-seed F`` name (``F..F+N-1``); None: the preset's.

    Raises:
        ValueError: A negative first seed, or ``--first-seed`` without ``--seeds``.

    Example:
        >>> suite_seeds(argparse.Namespace(seeds=3, first_seed=100))
        (100, 101, 102)
    """
    first = int(getattr(args, "first_seed", 0) or 0)
    if first < 0:
        raise ValueError(f"--first-seed must be >= 0, got {first}")
    if not args.seeds:
        if first:
            raise ValueError("--first-seed needs --seeds N")
        return None
    if args.seeds < 0:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    return tuple(range(first, first + args.seeds))


def add_suite_arguments(p: argparse.ArgumentParser) -> None:
    """The options every suite script shares: seeds, games, prior, logs, Ray and output."""
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (0..N-1)")
    p.add_argument(
        "--first-seed", type=int, default=0, help="seeds are FIRST..FIRST+N-1 (fresh seeds)"
    )
    p.add_argument("--num-games", type=int, default=None, help="evaluation games (0 = all)")
    p.add_argument("--games", type=Path, default=None, help="game suite (one env only)")
    p.add_argument("--prior-model", type=Path, default=None, help="HF model dir (one env only)")
    p.add_argument("--prior-temperature", type=float, default=None, help="T_prior")
    p.add_argument("-v", "--verbose", action="store_true", help="library logs on the terminal")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default 2)")
    p.add_argument("--out", type=Path, default=None, help="results folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--prior-device", default="auto", help="the prior's device: auto, cpu, cuda or cuda:N"
    )
    p.add_argument(
        "--prior-num-gpus",
        type=float,
        default=0.0,
        help="GPUs each Serve replica of the prior reserves (0.25: four replicas share one GPU)",
    )
    p.add_argument("--prior-replicas", type=int, default=1, help="Serve replicas of the prior")
    p.add_argument(
        "--prior-resource",
        default=None,
        help="custom Ray resource each Serve replica of the prior (and the cache actor) reserves "
        "a sliver (0.001) of (pins "
        "the replicas to the nodes that advertise it, e.g. the head of a CPU-only cluster)",
    )


def check_prior_deployment(p: ArgumentParser, args: argparse.Namespace) -> None:
    """Checks ``--prior-device``, ``--prior-num-gpus`` and ``--prior-replicas``."""
    try:
        prior_server_config(args, model_dir="x", prior_temperature=1.0)
    except ValueError as e:
        p.error(str(e))


def prior_server_config(args: argparse.Namespace, *, model_dir: str, prior_temperature: float):
    """The Serve deployment of the prior a suite script asks for.

    Raises:
        ValueError: A device other than auto/cpu/cuda[:N], a negative GPU share, no replica, or
            ``cuda`` without a GPU share (a replica sees a GPU only when it reserves one).

    Example:
        >>> flags = argparse.Namespace(
        ...     prior_device="cpu", prior_num_gpus=0.0, prior_replicas=2, prior_resource="prior"
        ... )
        >>> prior_server_config(flags, model_dir="m", prior_temperature=1.0).extra_actor_options
        {'resources': {'prior': 0.001}}
    """
    from cachellm_rl.prior.scoring import ScorerConfig
    from cachellm_rl.prior.server import PriorServerConfig

    device = args.prior_device
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise ValueError(f"--prior-device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if args.prior_num_gpus < 0:
        raise ValueError(f"--prior-num-gpus must be >= 0, got {args.prior_num_gpus}")
    if args.prior_replicas < 1:
        raise ValueError(f"--prior-replicas must be >= 1, got {args.prior_replicas}")
    if device.startswith("cuda") and args.prior_num_gpus <= 0:
        raise ValueError(
            "--prior-device cuda needs --prior-num-gpus > 0 (a Serve replica sees a GPU only "
            "when it reserves a share of one)"
        )
    resource = getattr(args, "prior_resource", None)
    return PriorServerConfig(
        scorer=ScorerConfig(
            model_dir=model_dir, device=device, prior_temperature=prior_temperature
        ),
        num_cpus=0,
        num_gpus=args.prior_num_gpus,
        num_replicas=args.prior_replicas,
        extra_actor_options={"resources": {resource: PLACEMENT_SLIVER}} if resource else {},
    )


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
    check_prior_deployment(p, args)


@contextlib.contextmanager
def suite_ray(*, verbose: bool, num_cpus: int | None) -> Iterator[None]:
    """Ray for a suite script: a local Ray it starts (and stops, with Serve, at the end), or a
    running Ray it joins (``RAY_ADDRESS``: a job's or a ``ray start`` cluster; or the caller's
    own, e.g. a test session), left running with only the prior's Serve application deleted."""
    import ray
    from ray import serve
    from ray.serve.exceptions import RayServeException

    from cachellm_rl.config import init_ray
    from cachellm_rl.contracts import DEFAULT_PRIOR_APP

    connects = not ray.is_initialized()
    joins = not connects or bool(os.environ.get("RAY_ADDRESS"))
    overrides: dict[str, Any] = {"log_to_driver": verbose}
    if num_cpus:
        overrides["num_cpus"] = num_cpus
    init_ray(**overrides)
    try:
        yield
    finally:
        # Finalise what the run dropped (Ray Data's batch iterators of offline learners) while
        # Ray is still up and the run's log still takes library noise: finalised after
        # ray.shutdown, at interpreter exit, they print a traceback on the terminal.
        gc.collect()
        if joins:
            with contextlib.suppress(RayServeException):  # Serve never started
                serve.delete(DEFAULT_PRIOR_APP)
        else:
            serve.shutdown()
        if connects:
            ray.shutdown()
