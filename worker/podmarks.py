"""The worker's own pod marks: while a job runs, its pod says "remove me last, do not move me"; while idle, the
opposite. Kubernetes picks the pod to remove without knowing which workers are busy; these annotations tell it:

  controller.kubernetes.io/pod-deletion-cost   the ReplicaSet (KEDA/HPA scale-in, a rollout) removes the lowest first
  cluster-autoscaler.kubernetes.io/safe-to-evict  Cluster Autoscaler scales a node down only if all its pods may go
  karpenter.sh/do-not-disrupt                  Karpenter leaves the pod's node alone for voluntary disruption

The pool process that runs jobs calls `busy()` before a job and `idle()` after it (and once after loading);
each sends one JSON merge patch of this pod's annotations to the Kubernetes API, only when the state changes.
A patch that fails is logged and counted (supir_pod_marks_total{outcome="failed"}) and never fails a job, nor
holds it for longer than `SUPIR_POD_MARKS_TIMEOUT_S` (per connect and per answer); for
`SUPIR_POD_MARKS_RETRY_S` after it no mark waits on the API, then a thread sends the latest state. The marks
order removals; the preStop drain still protects a job in flight. RBAC lets the worker's ServiceAccount patch
pods only; a ValidatingAdmissionPolicy (deploy/k8s/podmarks.yaml) limits that to its own pod and these three
annotations."""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Literal

import httpx

from jobs.settings import Settings

from . import metrics

log = logging.getLogger("supir.worker")
MarkState = Literal["busy", "idle"]
FIELD_MANAGER = "supir-worker"  # names these annotations' owner in the pod's managedFields

# Deletion cost: only the order matters. Idle (-1000) is below a pod never marked (0: one still loading, which
# goes first anyway as not ready, or one whose patches fail and that may be busy), so a known idle worker goes
# first; busy (1000) is above both. Round values leave room for an operator's own costs in between.
# safe-to-evict "true" when idle: the worker's emptyDir (/tmp) would otherwise keep Cluster Autoscaler from ever
# scaling its node down (skip-nodes-with-local-storage). do-not-disrupt is removed (null), not set "false":
# Karpenter reads only its presence with "true".
ANNOTATIONS: dict[MarkState, dict[str, str | None]] = {
    "busy": {
        "controller.kubernetes.io/pod-deletion-cost": "1000",
        "cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
        "karpenter.sh/do-not-disrupt": "true",
    },
    "idle": {
        "controller.kubernetes.io/pod-deletion-cost": "-1000",
        "cluster-autoscaler.kubernetes.io/safe-to-evict": "true",
        "karpenter.sh/do-not-disrupt": None,
    },
}


class PodMarkFailed(Exception):
    """The Kubernetes API refused or could not take a patch."""


class PodMarks:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pod = settings.pod_name or socket.gethostname()  # a pod's host name is its name unless set otherwise
        self._wanted: MarkState | None = None  # what the pod should say
        self._applied: MarkState | None = None  # what the pod is known to say; None: unknown (start, a failure)
        self._retry_at = 0.0  # after a failure, marks wait for this (monotonic) time; the retry thread sends then
        self._retrying = False
        self._lock = threading.Lock()

    def busy(self) -> None:
        self.mark("busy")

    def idle(self) -> None:
        self.mark("idle")

    def mark(self, state: MarkState) -> None:
        """Patch the pod if it does not already say `state`; never raises. After a failure no mark waits on the
        API until SUPIR_POD_MARKS_RETRY_S has passed: a thread then sends the latest state, so a broken API costs
        jobs one timeout per retry period, and an idle pod is marked idle once the API is back, job or not."""
        with self._lock:
            self._wanted = state
            if state != self._applied and time.monotonic() >= self._retry_at:
                self._send(state)

    def _send(self, state: MarkState) -> None:
        """One patch, under the lock."""
        try:
            self._patch({"metadata": {"annotations": ANNOTATIONS[state]}})
        except Exception as exc:  # whatever goes wrong (API, token, TLS, a bad address), the job goes on
            self._applied = None  # the pod may say either: the next try patches whatever is wanted then
            self._retry_at = time.monotonic() + self.settings.pod_marks_retry_s
            metrics.POD_MARKS.labels(state, "failed").inc()
            retry = self.settings.pod_marks_retry_s
            log.warning("pod %s: marking it %s failed (tried again in %.0f s): %s", self.pod, state, retry, exc)
            if not self._retrying:
                self._retrying = True
                threading.Thread(target=self._retry, name="supir-pod-marks", daemon=True).start()
            return
        self._applied = state
        metrics.POD_MARKS.labels(state, "ok").inc()

    def _retry(self) -> None:
        """Until the pod says what is wanted: wait out the retry period, then send the latest wanted state."""
        while True:
            time.sleep(max(0.0, self._retry_at - time.monotonic()))
            with self._lock:
                if self._wanted is None or self._wanted == self._applied:
                    self._retrying = False
                    return
                if time.monotonic() >= self._retry_at:
                    self._send(self._wanted)

    def _patch(self, body: dict[str, Any]) -> None:
        s = self.settings
        credentials = s.kube_credentials_dir
        token = (credentials / "token").read_text().strip()  # read each time: kubelet rotates bound tokens
        namespace = s.pod_namespace or (credentials / "namespace").read_text().strip()
        context = ssl.create_default_context(cafile=str(credentials / "ca.crt"))
        response = httpx.patch(
            f"{api_url(s)}/api/v1/namespaces/{namespace}/pods/{self.pod}",
            params={"fieldManager": FIELD_MANAGER},
            content=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/merge-patch+json"},
            verify=context,
            timeout=s.pod_marks_timeout_s,
        )
        if response.status_code != 200:
            raise PodMarkFailed(f"HTTP {response.status_code}: {_status_message(response)}")


def api_url(settings: Settings) -> str:
    if settings.kube_api_url:
        return settings.kube_api_url.rstrip("/")
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise ValueError("no Kubernetes API: KUBERNETES_SERVICE_HOST is unset (set SUPIR_KUBE_API_URL)")
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def _status_message(response: httpx.Response) -> str:
    """The API server's Status message (an RBAC or admission refusal says why), short."""
    try:
        body = response.json()
    except ValueError:
        body = None
    return str(body.get("message", "") if isinstance(body, dict) else response.text)[:300]


def in_a_pod(settings: Settings) -> bool:
    """auto: the manifests give the pod its name (downward API) and a token; elsewhere (compose, tests, a CI runner
    that is itself a pod) nothing is marked."""
    return bool(settings.pod_name) and Path(settings.kube_credentials_dir, "token").is_file()


def from_settings(settings: Settings) -> PodMarks | None:
    if settings.pod_marks == "off" or (settings.pod_marks == "auto" and not in_a_pod(settings)):
        return None
    return PodMarks(settings)
