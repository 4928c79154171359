"""Serve replicas of the prior share one (logical) GPU by fractions: 4 at 0.25 are placed and a
5th waits. Runs in its own Ray (the test session's Ray has no GPU); CUDA itself is tested in
the `gpu`-marked tests."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPT = textwrap.dedent(
    """
    import argparse, json, sys, time
    import ray
    from ray import serve
    from cachellm_rl.argparsing import prior_server_config
    from cachellm_rl.prior.server import prior_application

    model_dir, tmp = sys.argv[1], sys.argv[2]
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, _temp_dir=tmp, log_to_driver=False)
    serve.start(proxy_location="Disabled")
    flags = argparse.Namespace(prior_device="cpu", prior_num_gpus=0.25, prior_replicas=5)
    cfg = prior_server_config(flags, model_dir=model_dir, prior_temperature=1.0)
    serve._run(prior_application(cfg), name="placement", route_prefix=None, _blocking=False)
    states, deadline = {}, time.time() + 240
    while time.time() < deadline:
        app = serve.status().applications.get("placement")
        if app:
            dep = next(iter(app.deployments.values()))
            states = {str(k): v for k, v in dep.replica_states.items()}
            if states.get("RUNNING", 0) >= 4:
                time.sleep(5)  # time for a 5th to be placed, were there room
                dep = next(iter(serve.status().applications["placement"].deployments.values()))
                states = {str(k): v for k, v in dep.replica_states.items()}
                break
        time.sleep(1)
    gpu = ray.available_resources().get("GPU", 0.0)
    print("RESULT " + json.dumps({"states": states, "gpu": gpu}))
    serve.shutdown()
    ray.shutdown()
    """
)


def test_four_quarter_gpu_replicas_are_placed_and_a_fifth_waits(tiny_model_dir):
    from cachellm_rl.config import default_temp_dir

    temp_dir = default_temp_dir() + "-gpu"  # its own Ray, short socket paths
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_model_dir), temp_dir],
        capture_output=True,
        text=True,
        timeout=420,
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, out.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT ") :])
    assert res["states"].get("RUNNING") == 4, res
    assert sum(res["states"].values()) == 5 and res["gpu"] == pytest.approx(0.0), res
