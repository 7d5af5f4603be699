"""Deployment files: Kubernetes schemas, CRD shapes, the kustomization, promtool, the compose spec, every metric the
dashboard and the alert rules name is one the API or the worker exports, and compose's SUPIR variants: the API
accepts exactly the variants its workers serve."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from unittest import mock

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.paths import REPO

K8S = REPO / "deploy" / "k8s"
CRD_KINDS = {"ScaledObject", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
K8S_VERSION = "1.31.0"


def render() -> list[dict]:
    """kustomize build, for what our kustomization uses: resources, namespace, labels."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    labels = {k: v for entry in kustomization.get("labels", []) for k, v in entry["pairs"].items()}
    out = []
    for name in kustomization["resources"]:
        if (K8S / name).is_dir():  # a kustomization of its own (../grafana): test_monitoring renders it
            continue
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


def test_the_v0f_component_objects_match_their_shapes(tmp_path: Path) -> None:
    from tests.deploy.kustomize import rendered

    docs = rendered(["components/v0f"], tmp_path)
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
        elif doc["metadata"]["name"] == "supir-worker-v0f":
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert {d["kind"] for d in docs if d["metadata"]["name"] == "supir-worker-v0f"} == {"Deployment", "ScaledObject"}


def test_the_redis_component_keeps_jobs_it_cannot_hold_out_rather_than_evicting_them(tmp_path: Path) -> None:
    """components/redis: valid objects; AOF on, noeviction, maxmemory below the container's memory limit (an AOF
    rewrite forks), data on a PVC, and the Service the ConfigMap's SUPIR_REDIS_URL names."""
    from tests.deploy.kustomize import rendered

    docs = {(d["kind"], d["metadata"]["name"]): d for d in rendered(["components/redis"], tmp_path)}
    for key in [
        ("ConfigMap", "redis-config"),
        ("Service", "redis"),
        ("StatefulSet", "redis"),
        ("NetworkPolicy", "redis"),
    ]:
        assert docs[key]["metadata"]["namespace"] == "supir"
        kubernetes_validate.validate(docs[key], K8S_VERSION, strict=True)
    conf = dict(line.split(" ", 1) for line in docs[("ConfigMap", "redis-config")]["data"]["redis.conf"].splitlines())
    assert (conf["appendonly"], conf["maxmemory-policy"]) == ("yes", "noeviction")
    pod = docs[("StatefulSet", "redis")]["spec"]
    limit = pod["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    assert conf["maxmemory"].endswith("mb") and limit.endswith("Gi")
    assert int(conf["maxmemory"][:-2]) <= 0.8 * int(limit[:-2]) * 1024
    assert [c["metadata"]["name"] for c in pod["volumeClaimTemplates"]] == ["data"]
    (config,) = [d for (kind, name), d in docs.items() if kind == "ConfigMap" and name.startswith("supir-config-")]
    assert config["data"]["SUPIR_REDIS_URL"].startswith("redis://redis.supir.svc:6379/")


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
    from tests.deploy.kustomize import rendered

    config = next(d for d in rendered() if d["kind"] == "ConfigMap")["data"]  # generated: kustomization.yaml
    time_limit = int(config["SUPIR_JOB_TIME_LIMIT_S"])
    assert pod["terminationGracePeriodSeconds"] > time_limit  # the job in flight finishes
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    health_port = {e["name"]: e.get("value") for e in container["env"]}["SUPIR_WORKER_HEALTH_PORT"]
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
        def queued_count(self, variant: str | None = None) -> int:
            return 0

        def running_count(self, variant: str | None = None) -> int:
            return 0

        def oldest_queued_at(self) -> float:
            return 0.0

        def oldest_running_since(self) -> float:
            return 0.0

        def worker_beats(self) -> dict:
            return {"w:1": {"state": "ready", "job": None, "at": 0.0, "variants": ["v0Q"]}}

        def load_failures(self) -> dict:
            return {}

    collector = api.metrics.QueueCollector(Store(), variants=("v0Q", "v0F"))  # type: ignore[arg-type]
    found.update(f.name for f in collector.collect())

    class Redis:  # what INFO memory and INFO stats answer
        def info(self, section: str) -> dict:
            return {"maxmemory_policy": "noeviction", "used_memory": 1} if section == "memory" else {"evicted_keys": 0}

    for family in api.metrics.RedisMemoryCollector(Redis()).collect():  # type: ignore[arg-type]
        found.add(family.name)
        found.update(s.name for s in family.samples)
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
            assert re.search(r"^ARG BASE_IMAGE=python:", dockerfile, re.MULTILINE), f"{name}: its image has no python"
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


# --- compose: one worker per SUPIR variant, and the API accepts exactly those -------------------------------


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default} and ${VAR:?error} (defaults may hold braces), and $$."""
    out, i = [], 0
    while i < len(value):
        if value.startswith("$$", i):
            out.append("$")
            i += 2
        elif value.startswith("${", i):
            depth, j = 1, i + 2
            while depth:
                depth += {"{": 1, "}": -1}.get(value[j], 0)
                j += 1
            name, op, rest = re.match(r"(\w+)(:?[-?])?(.*)", value[i + 2 : j - 1], re.DOTALL).groups()  # type: ignore[union-attr]
            found = env.get(name)
            if op in (":-", "-") and (found is None or (op == ":-" and not found)):
                found = interpolate(rest, env)
            assert found is not None or op is None, f"compose would stop: {rest}"
            out.append(found or "")
            i = j
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def compose_up(tmp_path: Path, gpus: int, v0f_file: bool) -> dict[str, str]:
    """deploy/compose-up.sh with `docker` and `nvidia-smi` stand-ins: the environment compose would start with."""
    weights, bin_dir = tmp_path / "weights", tmp_path / "bin"
    weights.mkdir()
    bin_dir.mkdir()
    for name in ["sd_xl_base_1.0_0.9vae.safetensors", "SUPIR-v0Q.ckpt"] + ["SUPIR-v0F.ckpt"] * v0f_file:
        (weights / name).touch()
    (bin_dir / "docker").write_text(f"#!/bin/sh\nenv > {tmp_path}/env\n")
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n" + "".join(f"echo 'GPU {i}: H200'\n" for i in range(gpus)))
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SUPIR_WEIGHTS_DIR": str(weights)}
    subprocess.run(["bash", str(REPO / "deploy/compose-up.sh")], env=env, check=True, timeout=30, capture_output=True)
    return dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines() if "=" in line)


@pytest.mark.parametrize(("gpus", "v0f_file", "workers"), [
    (2, False, {"worker": ["v0Q"]}),
    (2, True, {"worker": ["v0Q"], "worker-v0f": ["v0F"]}),
    (1, True, {"worker": ["v0Q", "v0F"]}),  # one GPU: one process serves both, one SDXL base in memory
])  # fmt: skip
def test_compose_runs_a_worker_for_each_variant_it_offers(
    tmp_path: Path, gpus: int, v0f_file: bool, workers: dict[str, list[str]]
) -> None:
    from jobs.settings import Settings

    shell = compose_up(tmp_path, gpus, v0f_file)
    shell |= {k: "x" * 40 for k in ("MINIO_ROOT_PASSWORD", "SUPIR_SIGNING_SECRET", "SUPIR_WEBHOOK_SECRET")}
    shell |= {"SUPIR_API_KEYS": "[]", "GRAFANA_ADMIN_PASSWORD": "x"}
    profiles = set(filter(None, shell.get("COMPOSE_PROFILES", "").split(",")))
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    running = {n: s for n, s in services.items() if not s.get("profiles") or profiles & set(s["profiles"])}

    def settings(service: dict) -> Settings:
        env = {k: interpolate(str(v), shell) for k, v in service["environment"].items()}
        with mock.patch.dict(os.environ, env, clear=True):
            return Settings()  # production, as compose runs it: the same validation

    gpu_workers = {n: s for n, s in running.items() if "gpu" in json.dumps(s.get("deploy", {}))}
    served = {n: settings(s).worker_variant_names for n, s in gpu_workers.items()}
    assert served == workers
    for name, service in gpu_workers.items():
        assert "--queues" not in service["command"]
        files = settings(service).variant_files
        volume = next(interpolate(v, shell) for v in service["volumes"] if v.endswith(":/models:ro"))
        for variant in served[name]:  # the file it loads is on its /models volume
            path = Path(volume.removesuffix(":/models:ro")) / Path(str(files[variant])).relative_to("/models")
            assert path.is_file(), path
    accepted = set(settings(running["api"]).variant_files)
    assert accepted == {v for names in served.values() for v in names}, "the API accepts exactly what is served"
    assert set(settings(running["webhooks"]).variant_files) == accepted


def test_api_rollouts_drain_before_stopping_and_the_admin_port_stays_inside() -> None:
    """Rendered by `kubectl kustomize`: a preStop delay, a grace that covers it and the API's own shutdown, spread
    over zones and nodes, FORWARDED_ALLOW_IPS set, and /metrics + /status on an admin port that the clients'
    Service never exposes but the ServiceMonitor scrapes and the NetworkPolicy opens to Prometheus only."""
    from api.shutdown import FINISH_S
    from jobs.settings import Settings
    from tests.deploy.kustomize import rendered

    docs = rendered()
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    for key in [("Deployment", "supir-api"), ("Service", "supir-api"), ("Service", "supir-api-admin")]:
        kubernetes_validate.validate(by[key], K8S_VERSION, strict=True)
    pod = by["Deployment", "supir-api"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and int(pre_stop[1]) >= 5
    config = by["ConfigMap", "supir-config"]["data"] if ("ConfigMap", "supir-config") in by else {}
    grace = float(config.get("SUPIR_GRACEFUL_SHUTDOWN_S", Settings.model_fields["graceful_shutdown_s"].default))
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + grace + FINISH_S
    spread = {(c["topologyKey"], c["labelSelector"]["matchLabels"]["app.kubernetes.io/name"]) for c in pod[
        "topologySpreadConstraints"]}  # fmt: skip
    assert spread == {("topology.kubernetes.io/zone", "supir-api"), ("kubernetes.io/hostname", "supir-api")}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FORWARDED_ALLOW_IPS"] and "*" not in env["FORWARDED_ALLOW_IPS"]
    assert "--proxy-headers" in container["command"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["admin"] == int(env["SUPIR_API_ADMIN_PORT"]) != ports["http"]

    clients = by["Service", "supir-api"]["spec"]["ports"]
    assert [p["targetPort"] for p in clients] == ["http"]
    admin = by["Service", "supir-api-admin"]
    assert admin["spec"]["clusterIP"] == "None" and [p["targetPort"] for p in admin["spec"]["ports"]] == ["admin"]
    monitor = by["ServiceMonitor", "supir-api"]["spec"]
    selected = monitor["selector"]["matchLabels"]
    assert selected.items() <= admin["metadata"]["labels"].items()
    assert not selected.items() <= by["Service", "supir-api"]["metadata"]["labels"].items()
    assert [(e["port"], e["path"]) for e in monitor["endpoints"]] == [("admin", "/metrics")]
    assert admin["metadata"]["labels"][monitor["jobLabel"]] == "supir-api"  # the rules' job="supir-api"
    rules = by["NetworkPolicy", "supir-api"]["spec"]["ingress"]
    opened = {p["port"]: rule.get("from") for rule in rules for p in rule["ports"]}
    assert opened[ports["http"]] is None  # clients: from anywhere (the ingress)
    assert opened[ports["admin"]] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
