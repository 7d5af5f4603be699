"""What an operator checks before a first rollout, on the rendered manifests (`kubectl kustomize`, as shipped and
with the v0F component), the compose file and the images: pinned versions, autoscaled counts left to the
autoscalers, one identity per component, egress closed to the metadata endpoint and private networks, a weights
volume that can be shared, the same commands wherever a process is started, and one worker pool per SUPIR variant."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
from unittest import mock

import pytest
import yaml

from jobs.settings import Settings
from tests.deploy.kustomize import COMPONENTS, rendered
from tests.paths import REPO


@pytest.fixture(scope="module", params=sorted(COMPONENTS))
def docs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return rendered(COMPONENTS[request.param], tmp_path_factory.mktemp(request.param))


def gpu_workers(docs: list[dict]) -> dict[str, dict]:
    """The GPU worker Deployments by name: the pods that ask for a GPU."""
    return {
        d["metadata"]["name"]: d
        for d in docs
        if d["kind"] == "Deployment"
        and any(
            "nvidia.com/gpu" in c["resources"].get("limits", {}) for c in d["spec"]["template"]["spec"]["containers"]
        )
    }


def pods(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "Job")}


def test_images_are_pinned_in_one_place(docs: list[dict]) -> None:
    images = [c["image"] for spec in pods(docs).values() for c in spec["containers"]]
    # a release tag, or the digest the publishing workflow pins (.github/workflows/images.yml)
    digest = r"@sha256:[0-9a-f]{64}"
    pinned = rf"supir-serve-(api|worker)(:\d+\.\d+\.\d+|{digest})|[\w.:/-]+/supir-serve-(api|worker){digest}"
    assert images and all(re.fullmatch(pinned, i) for i in images), images
    compose = (REPO / "docker-compose.yml").read_text()
    assert ":latest" not in compose and ":latest" not in "".join(images)


def test_autoscaled_deployments_leave_the_count_to_the_autoscaler(docs: list[dict]) -> None:
    targets = {
        d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")
    }
    assert targets == {"supir-api", *gpu_workers(docs)} and "supir-worker" in targets
    for d in docs:
        if d["kind"] == "Deployment" and d["metadata"]["name"] in targets:
            assert "replicas" not in d["spec"], d["metadata"]["name"]


def test_each_component_has_its_own_service_account(docs: list[dict]) -> None:
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    deployments = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"}
    assert {spec["serviceAccountName"] for spec in deployments.values()} == accounts
    assert len(accounts) == 3  # api, webhooks, GPU workers: every variant's pool is the one component
    assert {deployments[name]["serviceAccountName"] for name in gpu_workers(docs)} == {"supir-worker"}
    api_secrets = {
        s["secretRef"]["name"] for c in deployments["supir-api"]["containers"] for s in c["envFrom"] if "secretRef" in s
    } | {v["secret"]["secretName"] for v in deployments["supir-api"]["volumes"] if "secret" in v}  # the keys: a file
    worker_secrets = {
        s["secretRef"]["name"]
        for c in deployments["supir-worker"]["containers"]
        for s in c["envFrom"]
        if "secretRef" in s
    }
    assert "supir-api-keys" in api_secrets and "supir-api-keys" not in worker_secrets  # keys only where used


def test_egress_never_reaches_the_metadata_endpoint_or_private_networks_over_http(docs: list[dict]) -> None:
    policies = [d for d in docs if d["kind"] == "NetworkPolicy" and "Egress" in d["spec"]["policyTypes"]]
    metadata = ipaddress.ip_address("169.254.169.254")
    # besides: the GPU workers reach the Kubernetes API (their pod marks), on its ports only, never the metadata
    kube_api = next(d for d in policies if d["metadata"]["name"] == "supir-worker-kube-api")
    policies.remove(kube_api)
    assert kube_api["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/component": "gpu-worker"}}
    for rule in kube_api["spec"]["egress"]:
        assert {p["port"] for p in rule["ports"]} == {443, 6443}
        assert all(metadata not in ipaddress.ip_network(peer["ipBlock"]["cidr"]) for peer in rule["to"])
    assert len(policies) == 1 and policies[0]["spec"]["podSelector"] == {}  # every pod of the namespace
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
    if "supir-worker-v0f" in k8s:
        assert services["worker-v0f"]["command"] == k8s["supir-worker-v0f"]
    image = re.search(r"^CMD (\[.*\])$", (REPO / "docker/worker.Dockerfile").read_text(), re.MULTILINE)
    assert image and json.loads(image.group(1)) == k8s["supir-worker"]  # the image run bare: the same worker


def test_the_worker_image_runs_the_tested_python_and_torch() -> None:
    """One base for both images, the tests' Python, pinned by digest; torch at the tested version in both locks."""
    pinned = re.search(r"^torch==(\S+)", (REPO / "constraints/cpu.txt").read_text(), re.MULTILINE)
    assert pinned
    bases = set()
    for name in ("api", "worker"):
        dockerfile = (REPO / f"docker/{name}.Dockerfile").read_text()
        pattern = r"^ARG BASE_IMAGE=python:(\d+\.\d+)-slim-bookworm@sha256:[0-9a-f]{64}$"
        base = re.search(pattern, dockerfile, re.MULTILINE)
        assert base and base.group(1) == f"{sys.version_info.major}.{sys.version_info.minor}", name
        assert re.search(r"^FROM \$\{BASE_IMAGE\}", dockerfile, re.MULTILINE) and "--require-hashes" in dockerfile
        bases.add(base.group(0))
    assert len(bases) == 1
    torch = re.search(r"^ARG TORCH_VERSION=(\S+)", (REPO / "docker/worker.Dockerfile").read_text(), re.MULTILINE)
    assert torch and torch.group(1) == pinned.group(1)
    for flavour, local in (("cpu", "+cpu"), ("cuda", "")):
        lock = (REPO / f"constraints/worker-{flavour}.lock").read_text()
        assert re.search(rf"^torch=={re.escape(pinned.group(1) + local)} \\$", lock, re.MULTILINE), flavour


# --- SUPIR variants: one worker pool per variant -----------------------------------------------------------


def pod_env(docs: list[dict], container: dict) -> dict[str, str]:
    """A container's environment as the pod gets it: the ConfigMaps it names, then its own env."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(maps[source["configMapRef"]["name"]])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def settings_of(env: dict[str, str]) -> Settings:
    """The real settings model on that environment alone (dev: the Secret's values are not here)."""
    with mock.patch.dict(os.environ, env, clear=True):
        return Settings(environment="dev")


def local_copies(pod: dict, shared: set[str]) -> set[str]:
    """Volumes an init container fills from the shared weights volume (components/node-cache's node-local copy)."""
    return {
        mount["name"]
        for init in pod.get("initContainers", [])
        if any(m["name"] in shared for m in init["volumeMounts"])
        for mount in init["volumeMounts"]
        if mount["name"] not in shared and not mount.get("readOnly")
    }


def test_each_variant_has_one_worker_pool_that_loads_its_file(docs: list[dict]) -> None:
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("supir-config-"))
    config = config["data"]  # generated: supir-config-<hash>
    served = settings_of(config).variant_files  # what the API accepts: SUPIR_VARIANTS, or the one default
    assert "SUPIR_VARIANTS" in config or set(served) == {"v0Q"}
    assert not ("SUPIR_VARIANTS" in config and "SUPIR_CHECKPOINT" in config)  # one source of truth
    pools: dict[str, str] = {}
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for name, deployment in gpu_workers(docs).items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = pod_env(docs, container)
        (variant,) = env["SUPIR_WORKER_VARIANTS"].split(",")  # one variant per pool: it scales on that one's jobs
        assert variant not in pools, f"{name} and {pools[variant]} both serve {variant}"
        pools[variant] = name
        settings = settings_of(env)  # the worker's own validation: its variants are among SUPIR_VARIANTS
        assert settings.worker_variant_names == [variant]
        path = str(settings.variant_files[variant])
        shared = {v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") in claims}
        shared |= local_copies(pod, shared)
        mounts = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in shared]
        assert any(path.startswith(m.rstrip("/") + "/") for m in mounts), f"{name}: {path} is on no weights volume"
        assert deployment["metadata"]["labels"]["supir-serve/variant"] == variant
        assert "--queues" not in container["command"]  # the worker derives its queues from its variants
        assert container["lifecycle"]["preStop"]["exec"]["command"] == ["python", "-m", "worker.drain"]
    assert set(pools) == set(served), "a Deployment per variant the API accepts, and none for others"
    job = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == "supir-weights")
    script = " ".join(job["spec"]["template"]["spec"]["containers"][0]["args"])
    for file in served.values():  # the Job fills and checks every file a worker loads
        assert f"supir weights check {config['SUPIR_SDXL_CHECKPOINT']} {file}" in script


def test_each_pool_scales_on_its_own_variant(docs: list[dict]) -> None:
    workers = gpu_workers(docs)
    variants = {name: d["metadata"]["labels"]["supir-serve/variant"] for name, d in workers.items()}
    scalers = [d for d in docs if d["kind"] == "ScaledObject"]
    assert sorted(s["spec"]["scaleTargetRef"]["name"] for s in scalers) == sorted(workers)  # exactly one each
    base = next(s for s in scalers if s["metadata"]["name"] == "supir-worker")
    for scaler in scalers:
        variant = variants[scaler["spec"]["scaleTargetRef"]["name"]]
        (trigger,) = scaler["spec"]["triggers"]
        query = trigger["metadata"]["query"]
        assert set(re.findall(r'variant="([^"]+)"', query)) == {variant}, query
        # the base pool's policy and trigger, only aimed elsewhere
        assert query == base["spec"]["triggers"][0]["metadata"]["query"].replace('"v0Q"', f'"{variant}"')
        same = {k: v for k, v in scaler["spec"].items() if k not in ("scaleTargetRef", "triggers")}
        assert same == {k: v for k, v in base["spec"].items() if k not in ("scaleTargetRef", "triggers")}


def test_worker_pools_are_disjoint_and_all_monitored(docs: list[dict]) -> None:
    workers = gpu_workers(docs)
    pod_labels = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in workers.items()}

    def selects(selector: dict, labels: dict) -> bool:
        return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())

    for name, deployment in workers.items():  # a Deployment's selector matches its own pods only
        matched = {other for other, labels in pod_labels.items() if selects(deployment["spec"]["selector"], labels)}
        assert matched == {name}
    monitor = next(d for d in docs if d["kind"] == "PodMonitor" and d["metadata"]["name"] == "supir-worker")
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "supir-worker")
    for labels in pod_labels.values():
        assert selects(monitor["spec"]["selector"], labels) and selects(policy["spec"]["podSelector"], labels)
