"""Pod marks (worker/podmarks.py): a real Celery worker on the tiny model keeps its own pod's annotations current,
idle → busy → idle, against a Kubernetes API stand-in (tests/worker/kube_standin.py) that grants exactly what the
rendered manifests grant; a broken or silent API never fails a job."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobs.settings import Settings
from tests.deploy.kustomize import rendered
from tests.paths import DOCS
from tests.servers import FAST, Service, free_port, submit, wait_for_status, wait_until
from tests.worker.kube_standin import OTHER_POD, Identity, KubeStandIn, Request, policy_marks

POD = "supir-worker-6c9d7f8b5-x7k2p"
PATH = f"/api/v1/namespaces/supir/pods/{POD}?fieldManager=supir-worker"
BUSY = {
    "metadata": {
        "annotations": {
            "controller.kubernetes.io/pod-deletion-cost": "1000",
            "cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
            "karpenter.sh/do-not-disrupt": "true",
        }
    }
}
IDLE = {
    "metadata": {
        "annotations": {
            "controller.kubernetes.io/pod-deletion-cost": "-1000",
            "cluster-autoscaler.kubernetes.io/safe-to-evict": "true",
            "karpenter.sh/do-not-disrupt": None,
        }
    }
}


def sent(requests: list[Request]) -> list[tuple[str, str, str, Any, int]]:
    return [(r.method, r.path, r.content_type, r.body, r.status) for r in requests]


def patch(body: dict, status: int = 200) -> tuple[str, str, str, Any, int]:
    return ("PATCH", PATH, "application/merge-patch+json", body, status)


def worker_deployment(docs: list[dict]) -> dict:
    return next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "supir-worker")


def downward_env(docs: list[dict], pod: str, namespace: str) -> dict[str, str]:
    """The worker container's downward-API variables, with the values the kubelet would give them."""
    (container,) = worker_deployment(docs)["spec"]["template"]["spec"]["containers"]
    fields = {"metadata.name": pod, "metadata.namespace": namespace}
    return {e["name"]: fields[e["valueFrom"]["fieldRef"]["fieldPath"]] for e in container["env"] if "valueFrom" in e}


def write_credentials(folder: Path, standin: KubeStandIn, token: str) -> Path:
    """What the kubelet mounts at /var/run/secrets/kubernetes.io/serviceaccount."""
    folder.mkdir(exist_ok=True)
    (folder / "token").write_text(token)
    (folder / "ca.crt").write_bytes(standin.ca_file.read_bytes())
    (folder / "namespace").write_text(standin.identity.namespace)
    return folder


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return rendered()


@pytest.fixture(scope="module")
def identity(docs: list[dict]) -> Identity:
    """The identity the rendered worker pod runs as: its ServiceAccount, in the install's namespace, bound to POD."""
    deployment = worker_deployment(docs)
    spec = deployment["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is True  # the kubelet mounts a token bound to the pod
    return Identity(deployment["metadata"]["namespace"], spec["serviceAccountName"], POD)


@pytest.fixture
def standin(tmp_path: Path, docs: list[dict], identity: Identity) -> Iterator[KubeStandIn]:
    server = KubeStandIn(docs, dataclasses.replace(identity), "token-1", tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, fixture_a: Path, docs: list[dict], identity: Identity):  # type: ignore[no-untyped-def]
    """The API and one GPU worker, the worker in a 'pod': its downward-API variables, a token, the stand-in."""
    tmp = tmp_path_factory.mktemp("podmarks")
    standin = KubeStandIn(docs, identity, "token-1", tmp).start()
    credentials = write_credentials(tmp / "serviceaccount", standin, "token-1")
    metrics_port = free_port()
    env = {
        **downward_env(docs, POD, identity.namespace),
        "SUPIR_KUBE_API_URL": standin.url,
        "SUPIR_KUBE_CREDENTIALS_DIR": str(credentials),
        "SUPIR_POD_MARKS_TIMEOUT_S": "2",
        "SUPIR_POD_MARKS_RETRY_S": "3",
        "SUPIR_WORKER_METRICS_PORT": str(metrics_port),
    }
    assert set(env) >= {"SUPIR_POD_NAME", "SUPIR_POD_NAMESPACE"}
    service = Service(tmp, fixture_a, {"alice": {"max_active_jobs": 100}}, rate_limit_per_minute=100_000)
    try:
        service.start(with_workers=False)
        service.start_worker(env)  # SUPIR_POD_MARKS is left at its default, auto: on in a pod
        wait_until(lambda: service.ready_workers() >= 1, 120, 0.25, "a ready GPU worker")
        wait_until(lambda: standin.requests, 60, 0.1, "the pod marked idle after loading")
        yield service, standin, credentials, metrics_port
    finally:
        service.stop()
        with contextlib.suppress(OSError):
            standin.stop()


def run_job(service: Service) -> dict:
    with service.client("alice") as client:
        job = submit(client, FAST).json()
        return wait_for_status(client, job["id"], {"succeeded", "failed", "canceled"}, timeout=120)


def test_a_worker_marks_its_pod_idle_busy_idle_with_no_more_than_the_manifests_grant(worker) -> None:  # type: ignore[no-untyped-def]
    service, standin, credentials, _ = worker
    assert sent(standin.requests) == [patch(IDLE)]  # after loading
    job = run_job(service)
    assert job["status"] == "succeeded", service.logs()
    wait_until(lambda: len(standin.requests) >= 3, 30, 0.1, "the pod marked idle after the job")
    # exactly these, in this order, each allowed by the Role and the admission policy (200), nothing else
    assert sent(standin.requests) == [patch(IDLE), patch(BUSY), patch(IDLE)], service.logs()
    busy, idle = standin.requests[1:]
    assert busy.at < job["started_at"] and idle.at > job["finished_at"]  # busy for the whole run
    assert standin.annotations() == {
        "kubectl.kubernetes.io/default-container": "worker",  # another's annotation, kept
        "controller.kubernetes.io/pod-deletion-cost": "-1000",
        "cluster-autoscaler.kubernetes.io/safe-to-evict": "true",
    }
    # the kubelet rotates the bound token: the worker reads the file again at every patch
    standin.token = "token-2"
    (credentials / "token").write_text("token-2\n")
    assert run_job(service)["status"] == "succeeded"
    wait_until(lambda: len(standin.requests) >= 5, 30, 0.1, "two more patches")
    assert sent(standin.requests[3:]) == [patch(BUSY), patch(IDLE)]


def test_a_failing_or_silent_api_server_never_fails_a_job(worker) -> None:  # type: ignore[no-untyped-def]
    service, standin, _, metrics_port = worker
    before = len(standin.requests)
    standin.fail_with = 500
    try:
        assert run_job(service)["status"] == "succeeded", service.logs()
    finally:
        standin.fail_with = None
    # the API back: within SUPIR_POD_MARKS_RETRY_S the retry thread marks the pod idle, with no job to prompt it
    wait_until(lambda: standin.requests[-1].status == 200, 30, 0.1, "the pod marked again once the API is back")
    tried = sent(standin.requests[before:])
    assert tried[0] == patch(BUSY, 500) and tried[-1] == patch(IDLE)
    assert all(status == 500 for *_, status in tried[1:-1]), tried  # retries, each one of the latest state
    assert standin.annotations()["controller.kubernetes.io/pod-deletion-cost"] == "-1000"
    port = int(standin.url.rsplit(":", 1)[1])
    standin.stop()  # unreachable: refused at once
    assert run_job(service)["status"] == "succeeded", service.logs()
    with socket.create_server(("127.0.0.1", port)) as silent:  # accepts connections, never answers
        silent.listen(16)
        job = run_job(service)
    assert job["status"] == "succeeded", service.logs()
    # a mark waits SUPIR_POD_MARKS_TIMEOUT_S (2 s here) at most, per connect and per answer, and then no mark
    # waits for SUPIR_POD_MARKS_RETRY_S
    assert job["finished_at"] - job["created_at"] < 2 * 2 * 2 + 30
    assert failures(metrics_port)["busy"] >= 2
    assert "marking it busy failed" in service.logs()


def failures(port: int) -> dict[str, float]:
    """supir_pod_marks_total{outcome="failed"} by state, read from the worker's metrics port."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    samples = [s for f in text_string_to_metric_families(text) if f.name == "supir_pod_marks" for s in f.samples]
    failed = [s for s in samples if s.name.endswith("_total") and s.labels["outcome"] == "failed"]
    return {s.labels["state"]: s.value for s in failed}


# --- the module's state changes, in this process ----------------------------------------------------------------


def marks_for(standin: KubeStandIn, credentials: Path, **overrides: Any) -> Any:
    from worker import podmarks

    settings = Settings(
        pod_name=POD,
        pod_namespace="supir",
        kube_api_url=standin.url,
        kube_credentials_dir=credentials,
        **overrides,
    )
    return podmarks.from_settings(settings)


def test_marks_patch_on_a_change_only_and_retry_the_latest_after_a_failure(
    tmp_path: Path, standin: KubeStandIn
) -> None:
    marks = marks_for(standin, write_credentials(tmp_path / "sa", standin, "token-1"), pod_marks_retry_s=2)
    for state in ("idle", "idle", "busy", "busy", "idle"):
        marks.mark(state)
    assert sent(standin.requests) == [patch(IDLE), patch(BUSY), patch(IDLE)]
    standin.fail_with = 500
    marks.busy()  # fails: counted, not raised
    standin.fail_with = None
    marks.idle()  # within the retry period: not sent now, but by the retry thread, as the latest state
    marks.busy()
    assert len(standin.requests) == 4
    wait_until(lambda: len(standin.requests) == 5, 30, 0.05, "the retry")
    assert sent(standin.requests[3:]) == [patch(BUSY, 500), patch(BUSY)]
    standin.token = "token-0"  # a token the API no longer takes: 401, retried until it does again
    marks.idle()
    standin.token = "token-1"
    wait_until(lambda: standin.requests[-1].status == 200, 30, 0.05, "the retry")
    assert sent(standin.requests[5:]) == [patch(IDLE, 401), patch(IDLE)]


def test_auto_marks_only_in_a_pod_with_a_token(tmp_path: Path, standin: KubeStandIn) -> None:
    from worker import podmarks

    credentials = write_credentials(tmp_path / "sa", standin, "token-1")
    assert podmarks.from_settings(Settings(pod_name=POD, kube_credentials_dir=credentials)) is not None
    assert podmarks.from_settings(Settings(kube_credentials_dir=credentials)) is None  # no downward-API name
    assert podmarks.from_settings(Settings(pod_name=POD, kube_credentials_dir=tmp_path / "none")) is None
    assert podmarks.from_settings(Settings(pod_name=POD, kube_credentials_dir=credentials, pod_marks="off")) is None
    nowhere = Settings(pod_marks="on", kube_credentials_dir=tmp_path / "none", pod_marks_retry_s=3600)
    on = podmarks.from_settings(nowhere)
    on.idle()  # no token, no API address: a logged, counted failure, never an exception
    assert standin.requests == []


def test_the_stand_in_refuses_what_the_manifests_do_not_grant(standin: KubeStandIn) -> None:
    """So the checks above can fail: outside the Role is 403, a wrong token 401, and the admission policy (its CEL,
    evaluated) refuses another pod, any other annotation, labels, the spec, and a token bound to no pod."""
    ca = ssl.create_default_context(cafile=str(standin.ca_file))

    def call(method: str, path: str, body: dict | None = None, token: str = "token-1") -> int:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/merge-patch+json"}
        content = json.dumps(body).encode() if body is not None else None
        return httpx.request(method, standin.url + path, content=content, headers=headers, verify=ca).status_code

    own = f"/api/v1/namespaces/supir/pods/{POD}"
    assert call("PATCH", own, IDLE) == 200
    assert call("PATCH", own, BUSY, token="token-0") == 401
    assert [call("GET", own), call("DELETE", own), call("PATCH", own + "/status", BUSY)] == [403, 403, 403]
    assert call("PATCH", f"/api/v1/namespaces/default/pods/{POD}", BUSY) == 403
    assert call("PATCH", f"/api/v1/namespaces/supir/pods/{OTHER_POD}", BUSY) == 422
    for body in (
        {"metadata": {"annotations": {"example.com/owner": "me"}}},
        {"metadata": {"annotations": {"kubectl.kubernetes.io/default-container": None}}},
        {"metadata": {"labels": {"app.kubernetes.io/name": "supir-api"}}},
        {"spec": {"containers": [{"name": "worker", "image": "another"}]}},
    ):
        assert call("PATCH", own, body) == 422, body
    standin.identity.pod = ""  # a token bound to no pod (a legacy Secret's)
    assert call("PATCH", own, BUSY) == 422
    assert standin.annotations(POD)["controller.kubernetes.io/pod-deletion-cost"] == "-1000"


# --- the manifests and the docs --------------------------------------------------------------------------------


def test_every_gpu_worker_pool_gets_a_token_its_name_and_only_patch_on_pods(tmp_path: Path) -> None:
    with_v0f = rendered(["components/v0f"], tmp_path)
    pools = [d for d in with_v0f if d["kind"] == "Deployment" and d["metadata"]["name"].startswith("supir-worker")]
    assert {d["metadata"]["name"] for d in pools} == {"supir-worker", "supir-worker-v0f"}
    config = next(d for d in with_v0f if d["kind"] == "ConfigMap")["data"]
    for deployment in pools:
        spec = deployment["spec"]["template"]["spec"]
        assert spec["serviceAccountName"] == "supir-worker" and spec["automountServiceAccountToken"] is True
        (container,) = spec["containers"]
        fields = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"] if "valueFrom" in e}
        assert fields == {"SUPIR_POD_NAME": "metadata.name", "SUPIR_POD_NAMESPACE": "metadata.namespace"}
        # a job at Celery's hard limit (time limit + 60 s), then its idle mark, end within the grace period
        limit = int(config["SUPIR_JOB_TIME_LIMIT_S"]) + 60 + 2 * Settings().pod_marks_timeout_s
        assert spec["terminationGracePeriodSeconds"] > limit
    (role,) = [d for d in with_v0f if d["kind"] == "Role"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}]
    (binding,) = [d for d in with_v0f if d["kind"] == "ValidatingAdmissionPolicyBinding"]
    (policy,) = [d for d in with_v0f if d["kind"] == "ValidatingAdmissionPolicy"]
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    assert policy["spec"]["failurePolicy"] == "Fail"
    assert policy_marks(with_v0f) == set(BUSY["metadata"]["annotations"]) == set(IDLE["metadata"]["annotations"])
    rules = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rules == [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["pods"]}]


def test_the_scaling_docs_name_the_marks_and_what_reads_them() -> None:
    text = (DOCS / "operations.md").read_text()
    scaling = text.split("\n## Scaling\n", 1)[1].split("\n## ", 1)[0]
    for key, value in BUSY["metadata"]["annotations"].items():
        assert f'`{key}: "{value}"`' in scaling, key
    assert '`"-1000"`, `"true"` and no `do-not-disrupt`' in scaling  # idle
    for words in ("KEDA", "Cluster Autoscaler", "Karpenter", "kubectl drain", "SUPIR_POD_MARKS", "podmarks.yaml"):
        assert words in scaling, words
