"""A stand-in for the Kubernetes API, over HTTPS on loopback: what a GPU worker's pod marks talk to. It answers as
the real server would for the one identity it knows (a ServiceAccount token bound to a pod): 401 without that token,
403 for anything the rendered manifests' RBAC does not grant that ServiceAccount, 422 for a patch the rendered
ValidatingAdmissionPolicy refuses (its CEL evaluated by cel-python on the pod before and after the patch), and
applies the JSON merge patch to the pod otherwise. Every request is recorded, with the time it arrived."""

from __future__ import annotations

import copy
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

OTHER_POD = "supir-worker-6c9d7f8b5-q4m8z"  # another worker of the same pool
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

    def user_info(self) -> dict:
        """As the API server's token authenticator gives it to admission (a bound token names its pod)."""
        extra = {"authentication.kubernetes.io/pod-name": [self.pod]} if self.pod else {}
        return {"username": self.username, "extra": extra}


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


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: a new object, the target left as it was."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def admission_denial(docs: list[dict], request: dict, old: dict, new: dict) -> str:
    """Every ValidatingAdmissionPolicy of the rendered manifests that matches a pod UPDATE, evaluated as the API server
    does (match conditions, then variables in order, then validations): the first refusal's message, or ''."""
    import celpy
    from celpy.adapter import json_to_cel

    env = celpy.Environment()

    def evaluate(expression: str, activation: dict) -> Any:
        return env.program(env.compile(expression)).evaluate(activation)

    for policy in (d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"):
        spec = policy["spec"]
        assert {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["pods"]} in spec[
            "matchConstraints"
        ]["resourceRules"]
        activation: dict = {"object": json_to_cel(new), "oldObject": json_to_cel(old), "request": json_to_cel(request)}
        if not all(evaluate(c["expression"], activation) for c in spec.get("matchConditions", [])):
            continue
        variables: dict = {}
        for variable in spec.get("variables", []):
            activation["variables"] = json_to_cel(variables)
            variables[variable["name"]] = evaluate(variable["expression"], activation)
        activation["variables"] = json_to_cel(variables)
        for validation in spec["validations"]:
            if not evaluate(validation["expression"], activation):
                return str(validation.get("message") or validation["expression"])
    return ""


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
        for name in (self.identity.pod, OTHER_POD):
            self.pods[(self.identity.namespace, name)] = pod_object(name, self.identity.namespace)
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
        pod = self.pods.get((namespace, name))
        if pod is None:
            return 404, status_body(404, f'pods "{name}" not found')
        patched = merge_patch(pod, body)
        request = {"namespace": namespace, "userInfo": self.identity.user_info()}
        denial = self._admission(request, pod, patched)
        if denial:
            return 422, status_body(422, denial)
        self.pods[(namespace, name)] = patched
        return 200, patched

    def _admission(self, request: dict, old: dict, new: dict) -> str:
        """The rendered ValidatingAdmissionPolicy, evaluated by a CEL interpreter: its refusal message, or ''."""
        return admission_denial(self.docs, request, old, new)

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


def pod_object(name: str, namespace: str) -> dict:
    """A worker pod as the ReplicaSet made it (what admission compares a patch's result with)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "supir-worker", "pod-template-hash": "6c9d7f8b5"},
            "annotations": {"kubectl.kubernetes.io/default-container": "worker"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "supir-worker-6c9d7f8b5",
                                 "uid": "0d5c2f7e-1b1e-4c55-9f53-3c2d7c1f4a10", "controller": True}],
        },
        "spec": {"serviceAccountName": "supir-worker", "containers": [{"name": "worker", "image": "worker:0.1.0"}]},
    }  # fmt: skip


def status_body(code: int, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": code}
