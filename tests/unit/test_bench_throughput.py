"""The throughput benchmark's CPU accounting by process role."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from experiments.bench_throughput import cpu_ms_per_step, cpu_seconds_by_role

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_cpu_time_is_charged_to_the_process_that_spent_it():
    before = cpu_seconds_by_role()
    _burn(0.3)  # this process: the benchmark's driver
    # A process that is no part of the benchmark, busy for a while.
    code = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
    child = subprocess.Popen([sys.executable, "-c", code + "time.sleep(5)"])
    try:
        time.sleep(1.5)
        after = cpu_seconds_by_role()
    finally:
        child.kill()
        child.wait()
    ms = cpu_ms_per_step(before, after, steps=10)  # per "step", 10 of them
    assert ms["driver (RLlib loop, learner)"] >= 0.25e3 / 10
    assert ms["other processes (not this benchmark)"] >= 0.25e3 / 10
    assert all(v >= 0 for v in ms.values())
