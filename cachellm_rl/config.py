"""Process-level settings shared by entry points: how Ray is started on small machines."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

# Unix socket paths are limited to ~107 bytes; Ray appends ~60 characters to its temp dir.
PLACEMENT_SLIVER = 0.001
"""Units of a custom resource an actor reserves to be placed on the nodes advertising it (a
label, not a quota: any number of such actors fit on a node that advertises one unit)."""

_MAX_TEMP_DIR_CHARS = 45


@dataclass(frozen=True, kw_only=True)
class RayInitConfig:
    """How :func:`init_ray` starts a local Ray (ignored when connecting to a cluster).

    Attributes:
        num_cpus: CPUs Ray may schedule on (size it explicitly on small machines).
        temp_dir: Ray's session folder; None puts it under ``<cwd>/artifacts/ray`` (ignored by
            git), or a short folder under /tmp when that path is too long for Ray's sockets.
        include_dashboard: Start the dashboard (loopback only).
        namespace: Ray namespace of the driver.
        address: Cluster address (e.g. ``"auto"``); None starts a local Ray.
        log_to_driver: Forward worker processes' output to the driver's terminal (quiet runs
            turn it off; the output stays in Ray's session logs under ``temp_dir``).
    """

    num_cpus: int | None = 2
    temp_dir: str | None = None
    include_dashboard: bool = False
    namespace: str = "cachellm_rl"
    address: str | None = None
    log_to_driver: bool = True


def default_temp_dir() -> str:
    """A Ray temp dir inside the project's ignored ``artifacts/`` folder when short enough."""
    candidate = Path.cwd() / "artifacts" / "ray"
    if len(str(candidate)) <= _MAX_TEMP_DIR_CHARS:
        return str(candidate)
    return f"/tmp/cachellm-ray-{os.getuid()}"


def init_ray(config: RayInitConfig | None = None, **overrides):
    """Start (or connect to) Ray with settings that suit a laptop or a 2-core CI box.

    Args:
        config: Settings; keyword overrides replace its fields.
        **overrides: Field overrides, e.g. ``num_cpus=4``.

    Returns:
        The ``ray.init`` context.
    """
    import ray

    cfg = config or RayInitConfig()
    if overrides:
        cfg = RayInitConfig(**{**cfg.__dict__, **overrides})
    if ray.is_initialized():
        return ray.get_runtime_context()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if cfg.address is not None or os.environ.get("RAY_ADDRESS"):
        return ray.init(
            address=cfg.address, namespace=cfg.namespace, log_to_driver=cfg.log_to_driver
        )
    temp_dir = cfg.temp_dir or default_temp_dir()
    Path(temp_dir).mkdir(parents=True, exist_ok=True)
    return ray.init(
        address="local",  # a new instance, never a `ray start` cluster found on the machine
        num_cpus=cfg.num_cpus,
        include_dashboard=cfg.include_dashboard,
        namespace=cfg.namespace,
        _temp_dir=temp_dir,
        log_to_driver=cfg.log_to_driver,
        configure_logging=True,
        logging_level=logging.WARNING,
    )
