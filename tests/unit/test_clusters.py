"""Shipped cluster files parse and keep the Ray Jobs API closed: token auth on, dashboard on localhost."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CLUSTERS = Path(__file__).parents[2] / "clusters"


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_autoscaler_yaml_turns_on_token_auth_and_localhost_dashboard(name: str) -> None:
    cfg = yaml.safe_load((CLUSTERS / name).read_text())
    head = " ".join(cfg["head_start_ray_commands"])
    workers = " ".join(cfg["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    for cmds in (head, workers):
        assert "RAY_AUTH_MODE=token" in cmds and "RAY_AUTH_TOKEN_PATH=" in cmds
    assert "secret" in " ".join(cfg["initialization_commands"]).lower()
    assert any(t.get("max_workers", 0) > t.get("min_workers", 0) for t in cfg["available_node_types"].values())
    assert "[gpu]" in " ".join(cfg["setup_commands"])


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_use_auth_options_and_autoscaling(name: str) -> None:
    doc = yaml.safe_load((CLUSTERS / "kuberay" / name).read_text())
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert all(g["maxReplicas"] > g["minReplicas"] for g in spec["workerGroupSpecs"])
    if doc["kind"] == "RayJob":
        assert doc["spec"]["submissionMode"] == "SidecarMode"  # the submitter reaches the pod's localhost
        assert "python -m cai_ray run" in doc["spec"]["entrypoint"]


def test_kuberay_policy_service_binds_wide_only_with_a_mounted_token_and_no_public_address() -> None:
    job, service, policy = yaml.safe_load_all((CLUSTERS / "kuberay" / "serve-policy.yaml").read_text())
    entry = job["spec"]["entrypoint"]
    assert "cai_ray serve policy" in entry and "serve.host=0.0.0.0" in entry
    token_file = entry.split("serve.auth_token_file=")[1].split()[0]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    mounts = {m["name"]: m for m in head["template"]["spec"]["containers"][0]["volumeMounts"]}
    secret = next(v for v in head["template"]["spec"]["volumes"] if "secret" in v)
    assert token_file.startswith(mounts[secret["name"]]["mountPath"]) and mounts[secret["name"]]["readOnly"]
    assert job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert service["spec"]["type"] == "ClusterIP"
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
