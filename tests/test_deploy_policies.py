"""What an operator checks before a first rollout, on the rendered manifests (`kubectl kustomize`), the compose
file and the images: pinned versions, autoscaled counts left to the autoscalers, one identity per component,
egress closed to the metadata endpoint and private networks, a weights volume that can be shared, and the same
commands wherever a process is started."""

from __future__ import annotations

import ipaddress
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def rendered() -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(REPO / "deploy/k8s")], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return rendered()


def pods(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "Job")}


def test_images_are_pinned_in_one_place(docs: list[dict]) -> None:
    images = [c["image"] for spec in pods(docs).values() for c in spec["containers"]]
    assert images and all(re.fullmatch(r"supir-serve-(api|worker):\d+\.\d+\.\d+", i) for i in images), images
    compose = (REPO / "docker-compose.yml").read_text()
    assert ":latest" not in compose and ":latest" not in "".join(images)


def test_autoscaled_deployments_leave_the_count_to_the_autoscaler(docs: list[dict]) -> None:
    targets = {
        d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")
    }
    assert targets == {"supir-api", "supir-worker"}
    for d in docs:
        if d["kind"] == "Deployment" and d["metadata"]["name"] in targets:
            assert "replicas" not in d["spec"], d["metadata"]["name"]


def test_each_component_has_its_own_service_account(docs: list[dict]) -> None:
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    deployments = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"}
    assert {spec["serviceAccountName"] for spec in deployments.values()} == accounts
    assert len(accounts) == len(deployments) == 3
    api_secrets = {
        s["secretRef"]["name"] for c in deployments["supir-api"]["containers"] for s in c["envFrom"] if "secretRef" in s
    }
    worker_secrets = {
        s["secretRef"]["name"]
        for c in deployments["supir-worker"]["containers"]
        for s in c["envFrom"]
        if "secretRef" in s
    }
    assert "supir-api-keys" in api_secrets and "supir-api-keys" not in worker_secrets  # keys only where used


def test_egress_never_reaches_the_metadata_endpoint_or_private_networks_over_http(docs: list[dict]) -> None:
    policies = [d for d in docs if d["kind"] == "NetworkPolicy" and "Egress" in d["spec"]["policyTypes"]]
    assert len(policies) == 1 and policies[0]["spec"]["podSelector"] == {}  # every pod of the namespace
    metadata = ipaddress.ip_address("169.254.169.254")
    for rule in policies[0]["spec"]["egress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        assert ports, "every egress rule names its ports"
        for peer in rule["to"]:
            if "ipBlock" not in peer:
                continue
            excepted = [ipaddress.ip_network(n) for n in peer["ipBlock"].get("except", [])]
            assert any(metadata in n for n in excepted), rule
            if ports & {80, 443}:
                for private in ("10.1.2.3", "172.20.0.1", "192.168.1.1"):
                    assert any(ipaddress.ip_address(private) in n for n in excepted), rule


def test_the_weights_volume_can_be_shared_by_workers_on_several_nodes(docs: list[dict]) -> None:
    claim = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["storageClassName"]


def test_processes_start_the_same_way_in_compose_and_kubernetes(docs: list[dict]) -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    k8s = {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["command"]
        for d in docs
        if d["kind"] == "Deployment"
    }
    assert services["api"]["command"] == k8s["supir-api"]
    assert services["worker"]["command"] == k8s["supir-worker"]
    assert services["webhooks"]["command"] == k8s["supir-webhooks"]


def test_the_worker_image_runs_the_tested_python_and_torch() -> None:
    dockerfile = (REPO / "docker/worker.Dockerfile").read_text()
    base = re.search(r"^FROM python:(\d+\.\d+)", dockerfile, re.MULTILINE)
    torch = re.search(r"^ARG TORCH_VERSION=(\S+)", dockerfile, re.MULTILINE)
    assert base and base.group(1) == f"{sys.version_info.major}.{sys.version_info.minor}"
    pinned = re.search(r"^torch==(\S+)", (REPO / "constraints/cpu.txt").read_text(), re.MULTILINE)
    assert torch and pinned and torch.group(1) == pinned.group(1)
    assert "-c constraints/cpu.txt" in dockerfile  # the other packages at the tested versions too
    api = (REPO / "docker/api.Dockerfile").read_text()
    assert re.search(r"^FROM python:(\d+\.\d+)", api, re.MULTILINE).group(1) == base.group(1)  # type: ignore[union-attr]
