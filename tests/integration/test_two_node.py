"""A real two-node Ray cluster on one machine: ``ray start --head`` and a second ``ray start
--address=...`` with token auth, and ``experiments/text_suite.py`` joining it through
``RAY_ADDRESS``. The env runner must run on the node advertising ``rollout`` and the Serve
replica of the prior on the head (advertising ``prior``), so the priors crossed nodes.

The nodes run with ``--block`` as this test's child processes and are stopped by signalling
those processes only (never ``ray stop``, which stops every Ray on the machine)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc").is_dir(), reason="tracks its Ray processes in /proc"),
]

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")
ENV_STEPS = 100
ENV_RUNNER = "SingleAgentEnvRunner"
CACHE_ACTOR = "SharedPriorCache"
PRIOR_REPLICA = "ServeReplica:cachellm_prior:PriorServer"

# Ray's actor table (GCS) keeps dead actors with the node they ran on; the state API
# (`ray.util.state`) would need the dashboard, which these nodes run without.
PLACEMENT = """
import json, ray
from ray._private import state
ray.init(log_to_driver=False, logging_level="ERROR")
nodes = [{"id": n["NodeID"], "alive": n["Alive"], "resources": n["Resources"]} for n in ray.nodes()]
actors = [
    {"cls": a["ActorClassName"], "state": a["State"], "node": a["Address"]["NodeID"]}
    for a in state.actors().values()
]
print("RESULT " + json.dumps({"nodes": nodes, "actors": actors}))
"""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _temp_dir() -> str:
    """Ray's temp dir in the ignored artifacts/ folder, or a short /tmp one (socket paths)."""
    from cachellm_rl.config import _MAX_TEMP_DIR_CHARS

    path = str(ROOT / "artifacts" / "ray-2node")
    return path if len(path) <= _MAX_TEMP_DIR_CHARS else f"/tmp/cachellm-ray-2node-{os.getuid()}"


def _start_time(pid: int) -> str | None:
    """The process's start time (tells a live process from a reused pid), None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _descendants(root: int) -> dict[int, str]:
    """``root`` and every process below it, with their start times."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d.name))
    out, stack = {}, [root]
    while stack:
        pid = stack.pop()
        if (started := _start_time(pid)) is not None:
            out[pid] = started
        stack.extend(children.get(pid, []))
    return out


@dataclass
class Cluster:
    address: str
    env: dict[str, str]  # RAY_ADDRESS and token auth, for every process that joins it


def _start_node(
    args: list[str], env: dict[str, str], log: Path, procs: list[subprocess.Popen]
) -> None:
    """``ray start --block ARGS`` as a child process (added to ``procs`` at once, so that it is
    stopped whatever happens next); returns when the node is up."""
    with log.open("w") as f:
        proc = subprocess.Popen(
            [str(RAY), "start", "--block", *args],
            # On SIGTERM a node first drains, for up to 30 s while the head holds Serve.
            env=env | {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    procs.append(proc)
    deadline = time.time() + 120
    while "Ray runtime started." not in log.read_text():
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"ray start {args[0]} failed:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _stop_nodes(procs: list[subprocess.Popen]) -> dict[int, str]:
    """SIGTERM the ``ray start --block`` processes (each stops its node's processes), then kill
    whatever of theirs is left. Returns what was still alive after that (empty when clean)."""
    ours: dict[int, str] = {}
    for proc in procs:
        ours.update(_descendants(proc.pid))
    for proc in reversed(procs):  # the worker node first
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)

    def alive() -> dict[int, str]:
        return {p: t for p, t in ours.items() if _start_time(p) == t}

    deadline = time.time() + 30
    while alive() and time.time() < deadline:
        time.sleep(0.5)
    for pid in alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(1)
    return alive()


@contextlib.contextmanager
def two_node_cluster(logs: Path) -> Iterator[Cluster]:
    """A head (1 CPU, resource ``prior``) and a worker node (1 CPU, ``rollout``: 4), with a
    fresh token given through the environment (the user's ~/.ray/auth_token is not used)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    temp_dir = _temp_dir()
    Path(temp_dir).mkdir(parents=True, exist_ok=True)
    # Ports with fixed defaults get free ones, so this cluster runs beside any other Ray;
    # the rest (and the workers', 0) Ray picks at random.
    gcs, dashboard, client, head_agent, worker_agent = _free_ports(5)
    common = ["--min-worker-port=0", "--max-worker-port=0", f"--temp-dir={temp_dir}"]
    head = [
        "--head",
        f"--port={gcs}",
        "--num-cpus=1",
        '--resources={"prior": 1}',
        "--include-dashboard=false",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={head_agent}",
        "--disable-usage-stats",
    ]
    address = f"127.0.0.1:{gcs}"
    worker = [
        f"--address={address}",
        "--num-cpus=1",
        '--resources={"rollout": 4}',
        f"--dashboard-agent-listen-port={worker_agent}",
        "--disable-usage-stats",
    ]
    procs: list[subprocess.Popen] = []
    try:
        _start_node([*head, *common], env, logs / "head.log", procs)
        _start_node([*worker, *common], env, logs / "worker.log", procs)
        yield Cluster(address=address, env=env | {"RAY_ADDRESS": address})
    finally:
        left = _stop_nodes(procs)
    assert not left, f"processes of the two-node cluster still running: {left}"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", gcs)) != 0, "the head's GCS still listens"


def _placement(cluster: Cluster) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PLACEMENT],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, out.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_env_runners_on_the_rollout_node_reach_cache_and_serve_on_the_head(
    tw_suite, tiny_model_dir, tmp_path
):
    out = tmp_path / "results"
    with two_node_cluster(tmp_path) as cluster:
        run = subprocess.run(
            [
                sys.executable,
                str(ROOT / "experiments" / "text_suite.py"),
                *("--preset", "quick", "--envs", "textworld", "--methods", "adaptive"),
                *("--num-games", "2", "--env-steps", str(ENV_STEPS), "--max-episode-steps", "10"),
                *("--num-env-runners", "1", "--env-runner-resource", "rollout"),
                *("--games", str(tw_suite), "--prior-model", str(tiny_model_dir)),
                *("--prior-device", "cpu", "--prior-resource", "prior"),
                *("--out", str(out), "--no-progress"),
            ],
            cwd=ROOT,
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        placement = _placement(cluster)

    nodes = [n for n in placement["nodes"] if n["alive"]]
    assert len(nodes) == 2, placement["nodes"]
    (head,) = [n["id"] for n in nodes if "prior" in n["resources"]]
    (worker,) = [n["id"] for n in nodes if "rollout" in n["resources"]]
    where: dict[str, list[str]] = {}
    for a in placement["actors"]:
        where.setdefault(a["cls"], []).append(a["node"])
    assert where.get(ENV_RUNNER) and set(where[ENV_RUNNER]) == {worker}, (head, worker, where)
    assert where.get(PRIOR_REPLICA) == [head], (head, worker, where)
    # The driver (on the head) created the cache actor, and it stays on its creator's node:
    # every prior the env runner gets crossed nodes.
    assert where.get(CACHE_ACTOR) == [head], (head, worker, where)
    # The suite joined the cluster: it deleted its Serve app, not the cluster's Serve.
    controllers = [a["state"] for a in placement["actors"] if a["cls"] == "ServeController"]
    assert controllers == ["ALIVE"], placement["actors"]

    # The run finished; every decision got its prior through the cache actor (none fell back
    # to the uniform prior), whose misses Serve on the head answered.
    (row,) = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert row["method"] == "adaptive" and row["train_env_steps"] >= ENV_STEPS, row
    assert row["decisions"] >= row["train_env_steps"], row
    assert row["train_lm_queries"] > 0 and row["lm_fallbacks"] == 0, row
    assert row["actor_unavailable_decisions"] == 0, row
    suite = json.loads((out / "config.json").read_text())["suite"]
    assert suite["settings"]["env_runner_resource"] == "rollout", suite
