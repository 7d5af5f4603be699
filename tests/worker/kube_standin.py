"""A stand-in for the Kubernetes API, over HTTPS on loopback: what a GPU worker's pod marks talk to. It answers as
the real server would for the one identity it knows (a ServiceAccount token bound to a pod): 401 without that token,
403 for anything the rendered manifests' RBAC does not grant that ServiceAccount, 422 for a patch the admission
policy would deny (another pod; anything but the three marks), and applies a JSON merge patch to the pod otherwise.
Every request is recorded, with the time it arrived."""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

VERBS = {"GET": "get", "PATCH": "patch", "PUT": "update", "POST": "create", "DELETE": "delete"}


@dataclass
class Request:
    method: str
    path: str  # with the query
    content_type: str
    body: Any  # parsed JSON, or the raw text
    status: int
    at: float


@dataclass
class Identity:
    """Who a bound ServiceAccount token says it is: the user name and the pod it is bound to."""

    namespace: str
    service_account: str
    pod: str

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA, as a cluster's ca.crt is) and its key."""
    cert, key = folder / "server.crt", folder / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=kube-apiserver-stand-in",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def rbac_rules(docs: list[dict], identity: Identity, namespace: str) -> list[dict]:
    """The rules the rendered Roles (and ClusterRoles) grant the identity's ServiceAccount in `namespace`."""
    subject = {"kind": "ServiceAccount", "name": identity.service_account, "namespace": identity.namespace}
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in docs}
    rules: list[dict] = []
    for binding in docs:
        if binding["kind"] != "RoleBinding" or binding["metadata"].get("namespace") != namespace:
            continue
        if subject not in binding.get("subjects", []):
            continue
        ref = binding["roleRef"]
        role = roles.get((ref["kind"], namespace if ref["kind"] == "Role" else None, ref["name"]))
        rules += role.get("rules", []) if role else []
    return rules


def granted(rules: list[dict], verb: str, group: str, resource: str, name: str) -> bool:
    def has(values: list[str], value: str) -> bool:
        return value in values or "*" in values

    return any(
        has(rule.get("verbs", []), verb)
        and has(rule.get("apiGroups", []), group)
        and has(rule.get("resources", []), resource)
        and (not rule.get("resourceNames") or name in rule["resourceNames"])
        for rule in rules
    )


def attributes(method: str, path: str) -> tuple[str, str, str, str, str]:
    """verb, API group, namespace, resource (with its subresource), name: what RBAC decides on."""
    parts = urlsplit(path).path.strip("/").split("/")
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    namespace = ""
    if rest[:1] == ["namespaces"] and len(rest) > 2:
        namespace, rest = rest[1], rest[2:]
    resource, name = rest[0], rest[1] if len(rest) > 1 else ""
    if len(rest) > 2:
        resource = f"{resource}/{rest[2]}"
    verb = VERBS.get(method, method.lower())
    return ("list" if verb == "get" and not name else verb), group, namespace, resource, name


def policy_marks(docs: list[dict]) -> set[str]:
    """The annotations the rendered ValidatingAdmissionPolicy lets the worker change (its `marks` variable)."""
    policy = next(d for d in docs if d["kind"] == "ValidatingAdmissionPolicy")
    expression = next(v["expression"] for v in policy["spec"]["variables"] if v["name"] == "marks")
    return set(re.findall(r"'([^']+)'", expression))


@dataclass
class KubeStandIn:
    docs: list[dict]  # the rendered manifests: RBAC and the admission policy come from them
    identity: Identity
    token: str
    folder: Path
    requests: list[Request] = field(default_factory=list)
    pods: dict[tuple[str, str], dict] = field(default_factory=dict)
    fail_with: int | None = None  # answer every request with this status (a broken API server)

    def start(self) -> KubeStandIn:
        cert, key = make_certificate(self.folder)
        self.ca_file = cert
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        ns = self.identity.namespace
        self.pods[(ns, self.identity.pod)] = {"metadata": {"name": self.identity.pod, "namespace": ns}}
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def annotations(self, pod: str | None = None) -> dict[str, str]:
        return dict(self.pods[(self.identity.namespace, pod or self.identity.pod)]["metadata"].get("annotations", {}))

    def answer(self, method: str, path: str, headers: Any, body: Any) -> tuple[int, dict]:
        if self.fail_with is not None:
            return self.fail_with, status_body(self.fail_with, "stand-in failure")
        if headers.get("Authorization") != f"Bearer {self.token}":
            return 401, status_body(401, "Unauthorized")
        verb, group, namespace, resource, name = attributes(method, path)
        if not granted(rbac_rules(self.docs, self.identity, namespace), verb, group, resource, name):
            return 403, status_body(403, f"cannot {verb} resource {resource!r} in namespace {namespace!r}")
        if (verb, group, resource) != ("patch", "", "pods"):
            return 404, status_body(404, "the stand-in serves pod patches only")
        if headers.get("Content-Type") != "application/merge-patch+json":
            return 415, status_body(415, "the stand-in takes JSON merge patches only")
        denial = self._admission(namespace, name, body)
        if denial:
            return 422, status_body(422, denial)
        pod = self.pods.get((namespace, name))
        if pod is None:
            return 404, status_body(404, f'pods "{name}" not found')
        annotations = pod["metadata"].setdefault("annotations", {})
        for key, value in body["metadata"]["annotations"].items():
            if value is None:
                annotations.pop(key, None)
            else:
                annotations[key] = value
        return 200, pod

    def _admission(self, namespace: str, name: str, body: Any) -> str:
        """What the rendered ValidatingAdmissionPolicy checks, for a merge patch: its own pod, its marks only."""
        if (namespace, name) != (self.identity.namespace, self.identity.pod):
            return "a GPU worker may change its own pod only"
        changed = body.get("metadata", {}).get("annotations", {}) if isinstance(body, dict) else None
        if not isinstance(changed, dict) or body != {"metadata": {"annotations": changed}}:
            return "a GPU worker may change nothing of its pod but those annotations"
        if not set(changed) <= policy_marks(self.docs):
            return "a GPU worker may change only its pod's deletion-cost, safe-to-evict and do-not-disrupt annotations"
        return ""

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body: Any = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                status, answer = standin.answer(self.command, self.path, self.headers, body)
                standin.requests.append(
                    Request(self.command, self.path, self.headers.get("Content-Type", ""), body, status, time.time())
                )
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PATCH = do_PUT = do_POST = do_DELETE = _any

            def log_message(self, *args: object) -> None:
                pass

        return Handler


def status_body(code: int, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": code}
