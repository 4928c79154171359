"""cluster.yaml: valid for Ray's cluster launcher, and the layout docs/cluster.md describes."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_ray_validates_the_cluster_config(cluster):
    validate_config(prepare_config(copy.deepcopy(cluster)))
    broken = copy.deepcopy(cluster)
    broken["max_worker"] = 4  # a typo: Ray's schema allows no unknown key
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_gpu_head_cpu_rollout_workers_and_the_readme_install(cluster):
    assert cluster["provider"]["type"] == "aws"
    nodes = cluster["available_node_types"]
    head = nodes[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) >= 1
    assert head["resources"].get("prior", 0) >= 1  # --prior-resource prior: Serve + cache here
    workers = [n for k, n in nodes.items() if k != cluster["head_node_type"]]
    assert workers and all(w["resources"].get("rollout", 0) > 0 for w in workers)
    assert all(w["resources"].get("GPU", 0) == 0 for w in workers)
    setup = cluster["setup_commands"]
    assert setup[0] == "pip install torch==2.13.0"  # torch first, as the README says
    assert "pip install -e" in setup[1]


def test_nothing_is_exposed_beyond_the_cluster(cluster):
    rules = cluster["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]
    for rule in rules:
        for ip_range in rule["IpRanges"]:
            assert not ip_range["CidrIp"].endswith("/0"), ip_range
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    for cmds in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in " ".join(cmds)
    assert "/home/ray/.ray/auth_token" in cluster["file_mounts"]
