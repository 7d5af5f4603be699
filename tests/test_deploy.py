"""Deployment files: Kubernetes schemas, CRD shapes, the kustomization, promtool, the compose spec, and every
metric the dashboard and the alert rules name is one the API or the worker exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
CRD_KINDS = {"ScaledObject", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
K8S_VERSION = "1.31.0"


def render() -> list[dict]:
    """kustomize build, for what our kustomization uses: resources, namespace, labels."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    labels = {k: v for entry in kustomization.get("labels", []) for k, v in entry["pairs"].items()}
    out = []
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            if doc is None:
                continue
            if doc["kind"] != "Namespace":
                doc["metadata"]["namespace"] = kustomization["namespace"]
            doc["metadata"].setdefault("labels", {}).update(labels)
            out.append(doc)
    return out


RENDERED = render()


def names(kind: str) -> set[str]:
    return {d["metadata"]["name"] for d in RENDERED if d["kind"] == kind}


@pytest.mark.parametrize(
    "doc", [d for d in RENDERED if d["kind"] not in CRD_KINDS], ids=lambda d: f"{d['kind']}/{d['metadata']['name']}"
)
def test_kubernetes_objects_match_the_schemas(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# The parts of the CRD schemas (keda.sh/v1alpha1, monitoring.coreos.com/v1) our objects use, with their types
# and required fields; additionalProperties false catches misspelt keys.
CRD_SCHEMAS = {
    "ScaledObject": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "additionalProperties": False,
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {"name": {"type": "string"}},
                    },
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "pollingInterval": {"type": "integer"},
                    "cooldownPeriod": {"type": "integer"},
                    "idleReplicaCount": {"type": "integer"},
                    "advanced": {"type": "object"},
                    "fallback": {"type": "object"},
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["type", "metadata"],
                            "properties": {
                                "type": {"type": "string"},
                                "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                            },
                        },
                    },
                },
            },
        },
    },
    "ServiceMonitor": {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "properties": {
                    "selector": {"type": "object"},
                    "endpoints": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            },
                        },
                    },
                },
            },
        },
    },
    "PodMonitor": {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "spec": {
                "type": "object",
                "required": ["selector", "podMetricsEndpoints"],
                "properties": {"podMetricsEndpoints": {"type": "array", "items": {"type": "object"}}},
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "spec": {
                "type": "object",
                "required": ["groups"],
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "properties": {
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                        "properties": {
                                            "expr": {"type": ["string", "integer"]},
                                            "for": {"type": "string"},
                                            "labels": {"type": "object"},
                                            "annotations": {"type": "object"},
                                        },
                                    },
                                }
                            },
                        },
                    }
                },
            },
        },
    },
}


@pytest.mark.parametrize("doc", [d for d in RENDERED if d["kind"] in CRD_KINDS], ids=lambda d: d["kind"])
def test_crd_objects_match_their_shapes(doc: dict) -> None:
    jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])


def test_the_kustomization_renders_and_its_references_resolve() -> None:
    kinds = [(d["kind"], d["metadata"]["name"]) for d in RENDERED]
    assert len(kinds) == len(set(kinds))
    assert all(d["metadata"].get("namespace") == "supir" for d in RENDERED if d["kind"] != "Namespace")
    deployments = names("Deployment")
    assert {"supir-api", "supir-worker"} <= deployments
    for doc in RENDERED:
        if doc["kind"] in ("ScaledObject", "HorizontalPodAutoscaler"):
            assert doc["spec"]["scaleTargetRef"]["name"] in deployments
    worker = next(d for d in RENDERED if d["metadata"]["name"] == "supir-worker" and d["kind"] == "Deployment")
    pod = worker["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims <= names("PersistentVolumeClaim")
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    config = next(d for d in RENDERED if d["kind"] == "ConfigMap")["data"]
    time_limit = int(config["SUPIR_JOB_TIME_LIMIT_S"])
    assert pod["terminationGracePeriodSeconds"] > time_limit  # the job in flight finishes
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    health_port = {e["name"]: e["value"] for e in container["env"]}["SUPIR_WORKER_HEALTH_PORT"]
    assert ports["health"] == int(health_port)
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        assert container[probe]["httpGet"] == {"path": path, "port": "health"}
    for example in yaml.safe_load_all((K8S / "secret.example.yaml").read_text()):
        kubernetes_validate.validate(example, K8S_VERSION, strict=True)


def test_prometheus_config_and_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make test` installs the Debian package prometheus"
    for args in (
        ["check", "config", "deploy/prometheus/prometheus.yml"],
        ["check", "rules", "deploy/prometheus/rules.yml"],
    ):
        proc = subprocess.run([promtool, *args], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    rule = next(d for d in RENDERED if d["kind"] == "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((REPO / "deploy/prometheus/rules.yml").read_text())


def exported_metrics() -> set[str]:
    """Every metric family the API and the worker register, read from their real registries."""
    from prometheus_client import REGISTRY

    import api.metrics
    import worker.metrics  # noqa: F401 - registers the worker's metrics

    found = set()
    for family in REGISTRY.collect():
        found.add(family.name)
        found.update(s.name for s in family.samples)

    class Store:
        def queued_count(self) -> int:
            return 0

        def running_count(self) -> int:
            return 0

        def oldest_queued_at(self) -> float:
            return 0.0

        def oldest_running_since(self) -> float:
            return 0.0

        def worker_beats(self) -> dict:
            return {"w:1": {"state": "ready", "job": None, "at": 0.0}}

    found.update(f.name for f in api.metrics.QueueCollector(Store()).collect())  # type: ignore[arg-type]
    return found


def used_metrics(text: str) -> set[str]:
    return set(re.findall(r"\bsupir_[a-z_]+[a-z]\b", text)) - {"supir_jobs_outstanding"}


def test_every_metric_in_the_dashboard_and_rules_is_exported() -> None:
    exported = exported_metrics()
    dashboard = json.loads((REPO / "deploy/grafana/dashboards/supir.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    rules = (REPO / "deploy/prometheus/rules.yml").read_text() + (K8S / "keda.yaml").read_text()
    rules += "".join(p.read_text() for p in (REPO / "deploy/prometheus/tests").glob("*.yml"))  # promtool tests
    used = used_metrics(exprs) | used_metrics(rules)
    assert len(used) >= 10
    suffixes = ("", "_total", "_bucket", "_count", "_sum")

    def is_exported(name: str) -> bool:  # a family (counters drop _total from it) or one of its series
        return any(name.endswith(x) and name.removesuffix(x) in exported for x in suffixes if x or name in exported)

    missing = sorted(m for m in used if not is_exported(m))
    assert not missing, f"named but not exported: {missing}"


def test_compose_file_matches_the_compose_spec() -> None:
    cli = Path(sys.executable).parent / "check-jsonschema"
    proc = subprocess.run([str(cli), "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_commands_exist_in_their_images() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    checked = 0
    for name, service in compose["services"].items():
        build = service.get("build")
        if not build:
            continue
        dockerfile = (REPO / build["dockerfile"]).read_text()
        extras = re.search(r'pip install (?:-c \S+ )?"\.\[([\w,]+)\]"', dockerfile).group(1).split(",")  # type: ignore[union-attr]
        copied = set(re.findall(r"^COPY (\w+) ", dockerfile, re.MULTILINE))
        command = service.get("command") or json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.MULTILINE).group(1))  # type: ignore[union-attr]
        program = command[0]
        module = next(arg for arg in command[1:] if re.match(r"^(api|worker)\.", arg))
        assert module.split(".")[0] in copied, f"{name}: {module} is not copied into the image"
        if command[:2] == ["python", "-m"]:  # one of our modules, run by the Python of a python base image
            assert re.search(r"^FROM python:", dockerfile, re.MULTILINE), f"{name}: its image has no python"
            assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"{name}: no module {module}"
            checked += 1
            continue
        providers = {
            ep.dist.name.lower().replace("_", "-")
            for ep in metadata.entry_points(group="console_scripts", name=program)
            if ep.dist is not None
        }
        wanted = {
            re.split(r"[<>=\[ ;]", req)[0].lower()
            for req in metadata.requires("supir-serve") or []
            if any(f'extra == "{extra}"' in req for extra in extras)
        }
        if "supir-serve" in wanted:  # an extra that includes another (worker → model)
            wanted |= {
                re.split(r"[<>=\[ ;]", r)[0].lower()
                for r in metadata.requires("supir-serve") or []
                if 'extra == "model"' in r
            }
        assert providers & wanted, f"{name}: {program!r} is not installed by the image's {extras} extras"
        checked += 1
    assert checked >= 3  # api, worker, worker-cpu
