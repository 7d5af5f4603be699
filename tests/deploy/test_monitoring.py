"""Monitoring and scaling, checked with the real tools: promtool's unit tests for every alert and each variant's
scaling query (two variants, two API replicas, two installs sharing a Prometheus), every PromQL expression (rules,
KEDA triggers, dashboard) parsed by promtool, `kubectl kustomize` rendered (as shipped, with the v0F component, and
as another install in another namespace with another Prometheus) and validated, `namespace` kept by every rule and
set in every KEDA and dashboard query, the selector label on exactly the Prometheus Operator objects, the dashboard
ConfigMap, the compose Prometheus and Alertmanager, and docs that agree with the manifests."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.deploy.kustomize import rendered as kustomize
from tests.paths import REPO

PROM = REPO / "deploy" / "prometheus"
K8S = REPO / "deploy" / "k8s"
K8S_VERSION = "1.31.0"
CRD_KINDS = {"ScaledObject", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
MONITOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}

RULES = yaml.safe_load((PROM / "rules.yml").read_text())
ALERTS = {r["alert"]: r for g in RULES["groups"] for r in g["rules"] if "alert" in r}
RECORDS = {r["record"]: r for g in RULES["groups"] for r in g["rules"] if "record" in r}
KEDA = yaml.safe_load((K8S / "keda.yaml").read_text())
TRIGGER = KEDA["spec"]["triggers"][0]
DASHBOARD = json.loads((REPO / "deploy/grafana/dashboards/supir.json").read_text())
OPERATIONS = (REPO / "docs/operations.md").read_text()
# the gauges with one series per SUPIR variant: max over API replicas by variant, never across variants
VARIANT_GAUGES = ("supir_jobs_waiting", "supir_jobs_running", "supir_variant_workers")
# a second install, as an operator makes it: kustomization.yaml's namespace and Prometheus settings changed
STAGING = {"namespace": "staging", "prometheus": "observability", "address": "http://prom.observability.svc:9090"}


@pytest.fixture(scope="module")
def with_v0f(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return kustomize(["components/v0f"], tmp_path_factory.mktemp("v0f"))


def as_staging(kustomization: dict) -> None:
    kustomization["namespace"] = STAGING["namespace"]
    (generator,) = [g for g in kustomization["configMapGenerator"] if g["name"] == "supir-prometheus"]
    generator["literals"] = [f"address={STAGING['address']}", f"namespace={STAGING['prometheus']}"]


@pytest.fixture(scope="module")
def staging(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The manifests with v0F, rendered for a second install sharing the Prometheus."""
    return kustomize(["components/v0f"], tmp_path_factory.mktemp("staging"), edit=as_staging)


def scaling_queries(docs: list[dict]) -> dict[str, str]:
    return {
        d["metadata"]["name"]: d["spec"]["triggers"][0]["metadata"]["query"]
        for d in docs
        if d["kind"] == "ScaledObject"
    }


def promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: `make test` installs it (scripts/ensure-tools.sh, Debian package prometheus)"
    return subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", OPERATIONS, re.MULTILINE | re.DOTALL)
    assert match, f"docs/operations.md has no section {title!r}"
    return match.group(1)


# --- alerts -------------------------------------------------------------------------------------------------


def test_promtool_unit_tests_pass() -> None:
    tests = sorted(str(p.relative_to(REPO)) for p in (PROM / "tests").glob("*.yml"))
    assert tests
    proc = promtool("test", "rules", *tests)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test(with_v0f: list[dict], staging: list[dict]) -> None:
    fired, quiet, exprs = set(), set(), set()
    for path in (PROM / "tests").glob("*.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
            exprs.update(check["expr"] for check in case.get("promql_expr_test", []))
    assert set(ALERTS) == fired, f"alerts without a test where they fire: {set(ALERTS) - fired}"
    assert set(ALERTS) == quiet, f"alerts without a test where they stay quiet: {set(ALERTS) - quiet}"
    assert {"supir:jobs_outstanding", "supir:jobs_per_worker_per_minute", "supir:gpu_seconds_per_image"} <= exprs
    queries = scaling_queries(with_v0f)
    assert len(queries) == 2 and TRIGGER["metadata"]["query"] in queries.values()
    assert set(queries.values()) <= exprs, "every variant's rendered KEDA query has its promtool test"
    # and as a second install renders them: the case where both share a Prometheus (each scales on its own jobs)
    assert set(scaling_queries(staging).values()) <= exprs


def test_every_alert_says_how_bad_what_and_where_to_look() -> None:
    assert {"SupirHighErrorRatio", "SupirApiErrors"} <= set(ALERTS)
    for name, rule in ALERTS.items():
        # `none`: the heartbeat, routed to a dead man's switch, never to people
        assert rule["labels"]["severity"] in ("critical", "warning") or name == "SupirHeartbeat", name
        assert {"summary", "description"} <= set(rule["annotations"]), name
        # runbook_url: the annotation Alertmanager templates and Grafana link, so an absolute URL, not a path
        runbook = rule["annotations"]["runbook_url"]
        assert runbook.startswith("https://") and runbook.endswith("/docs/operations.md#alerts"), name
    assert re.search(r"^## Alerts$", OPERATIONS, re.MULTILINE)  # the anchor the runbooks point at


def test_the_docs_say_how_to_act_on_every_alert() -> None:
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(Supir\w+)` \|.*$", section("Alerts"), re.MULTILINE)}
    assert set(rows) == set(ALERTS), f"docs and rules.yml differ: {set(rows) ^ set(ALERTS)}"
    for name, row in rows.items():
        assert row.count("|") >= 4 and len(row) > 80, f"{name}: say what it means and what to do first"


def test_time_limit_alerts_follow_the_exported_limit() -> None:
    for name in ("SupirJobsNearTimeLimit", "SupirJobsStuckRunning"):
        assert "max by (namespace) (supir_job_time_limit_seconds)" in ALERTS[name]["expr"], name
        assert "1800" not in ALERTS[name]["expr"], name


def test_queue_gauges_are_never_summed_over_api_replicas(with_v0f: list[dict]) -> None:
    """Every API replica reports the same queue gauges: a sum counts each job once per replica."""
    gauges = r"supir_(jobs_waiting|jobs_running|variant_workers|oldest_\w+|workers|redis_up|job_time_limit_seconds)\b"
    for expr in all_expressions(with_v0f).values():
        assert not re.search(r"\bsum\s*(?:(?:by|without)\s*\([^)]*\)\s*)?\(\s*" + gauges, expr), expr


def test_variant_gauges_are_never_maxed_across_variants(with_v0f: list[dict]) -> None:
    """max(supir_jobs_waiting) would be the longest variant's queue, not the total: each use keeps the variant,
    by `max by (variant)` or a `variant="…"` matcher."""
    uses = 0
    for name, expr in all_expressions(with_v0f).items():
        for gauge in VARIANT_GAUGES:
            for match in re.finditer(rf"\b{gauge}\b(\{{[^}}]*\}})?", expr):
                before = expr[: match.start()]
                by_variant = re.search(r"max by \((namespace, )?variant\) \($", before)
                kept = by_variant or 'variant="' in (match.group(1) or "")
                assert kept, f"{name}: {expr}"
                uses += 1
    assert uses >= 10


# --- every PromQL expression parses -------------------------------------------------------------------------


def all_expressions(docs: list[dict]) -> dict[str, str]:
    """Every PromQL expression: rules, every rendered ScaledObject's query (docs), dashboard targets as Grafana
    sends them (variables substituted)."""
    exprs = {f"rules_{name}": rule["expr"] for name, rule in {**ALERTS, **RECORDS}.items()}
    exprs |= {f"keda_{name}": query for name, query in scaling_queries(docs).items()}
    for panel in DASHBOARD["panels"]:
        for target in panel["targets"]:
            exprs[f"dashboard_panel{panel['id']}_{target['refId']}"] = target["expr"].replace("$namespace", "supir")
    return exprs


# --- installs sharing a Prometheus stay apart ---------------------------------------------------------------

AGGREGATION = re.compile(r"\b(sum|min|max|avg|count|stddev|topk|bottomk|quantile|group)\s*(by\s*\(([^)]*)\))?\s*\(")


def test_every_rule_keeps_the_namespace() -> None:
    """Each aggregation keeps `namespace` and each vector match is on it: one install's series never answer for
    another's, and every alert names its install. absent() alone cannot (it fires only when no install has any)."""
    for name, rule in {**ALERTS, **RECORDS}.items():
        expr = rule["expr"]
        aggregations = list(AGGREGATION.finditer(expr))
        assert aggregations, name
        for match in aggregations:
            assert "namespace" in (match.group(3) or ""), f"{name}: {match.group(0)!r} drops the namespace"
        for on in re.findall(r"\b(?:on|ignoring)\s*\(([^)]*)\)", expr):
            assert "namespace" in on, f"{name}: on ({on})"
        assert "without" not in expr and "group_left" not in expr, name


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric, its label matchers) for every metric the expression reads."""
    found = re.finditer(r"\b((?:supir|DCGM|keda|kube)_\w+)\b(\{[^}]*\})?", expr)
    return [(m.group(1), m.group(2) or "") for m in found]


def test_every_scaling_query_reads_its_own_install_only(with_v0f: list[dict], staging: list[dict]) -> None:
    """kustomize writes the install's namespace into every ScaledObject's query (it never edits text inside a
    query by itself): rendered for another namespace, every selector of every query changes with it."""
    for docs, namespace in ((with_v0f, "supir"), (staging, STAGING["namespace"])):
        queries = scaling_queries(docs)
        assert len(queries) == 2
        for name, query in queries.items():
            found = selectors(query)
            assert len(found) == 2, query  # waiting + running
            for _, matchers in found:
                assert re.findall(r'namespace="([^"]*)"', matchers) == [namespace], f"{name}: {query}"
    assert set(scaling_queries(with_v0f).values()).isdisjoint(scaling_queries(staging).values())


def test_the_prometheus_is_set_in_one_place(with_v0f: list[dict], staging: list[dict]) -> None:
    """kustomization.yaml's supir-prometheus (local config, never applied) reaches KEDA and the NetworkPolicies:
    no other `monitoring` is left (the Prometheus Operator's API group aside)."""
    for docs, address, namespace in (
        (with_v0f, "http://prometheus-operated.monitoring.svc:9090", "monitoring"),
        (staging, STAGING["address"], STAGING["prometheus"]),
    ):
        assert not [d for d in docs if d["metadata"]["name"] == "supir-prometheus"], "local config is applied"
        for doc in (d for d in docs if d["kind"] == "ScaledObject"):
            assert doc["spec"]["triggers"][0]["metadata"]["serverAddress"] == address
        scraped = {
            d["metadata"]["name"]: peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            for d in docs
            if d["kind"] == "NetworkPolicy"
            for rule in d["spec"].get("ingress", [])
            for peer in rule.get("from", [])
            if "namespaceSelector" in peer
        }
        assert set(scraped) >= {"supir-worker", "supir-webhooks"} and set(scraped.values()) == {namespace}
    text = yaml.safe_dump_all(staging)
    assert not re.findall(r"monitoring(?!\.coreos\.com)", text)
    assert STAGING["namespace"] in {d["metadata"].get("namespace") for d in staging}


def test_the_dashboard_picks_a_datasource_and_a_namespace() -> None:
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    namespace = variables["namespace"]
    assert namespace["type"] == "query" and re.fullmatch(r"label_values\(supir_\w+, namespace\)", namespace["query"])
    assert namespace["datasource"]["uid"] == "${datasource}"
    metrics = 0
    for panel in DASHBOARD["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            for metric, matchers in selectors(target["expr"]):
                assert 'namespace="$namespace"' in matchers, f"{panel['title']}: {metric} in {target['expr']}"
                if metric.startswith("DCGM_"):  # the GPUs of this service's workers only
                    assert 'pod=~".*supir-worker.*"' in matchers, target["expr"]
                metrics += 1
    assert metrics >= 40
    exprs = [t["expr"] for p in DASHBOARD["panels"] for t in p["targets"]]
    dcgm = {metric for expr in exprs for metric, _ in selectors(expr) if metric.startswith("DCGM_")}
    assert {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE"} <= dcgm


def test_the_dashboard_ships_as_a_configmap_for_grafanas_sidecar(rendered: list[dict], staging: list[dict]) -> None:
    """One source: the ConfigMap is made from the JSON compose provisions."""
    source = (REPO / "deploy/grafana/dashboards/supir.json").read_text()
    for docs in (rendered, staging):
        (config,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "supir-dashboard"]
        assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config["data"] == {"supir.json": source}
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["grafana"]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in compose["volumes"]


def test_dcgm_alerts_watch_the_worker_pods_gpus() -> None:
    names = {"SupirGpuXidError": "DCGM_FI_DEV_XID_ERRORS", "SupirGpuMemoryErrors": "DCGM_FI_DEV_ROW_REMAP_FAILURE"}
    for alert, metric in names.items():
        found = selectors(ALERTS[alert]["expr"])
        assert metric in {m for m, _ in found}
        assert all('pod=~".*supir-worker.*"' in matchers for _, matchers in found), alert
    assert "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL" in ALERTS["SupirGpuMemoryErrors"]["expr"]


def check_parse(exprs: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """promtool 2.42 has no `promql` command: each expression becomes a recording rule for `check rules`."""
    rules = [{"record": f"check:{re.sub(r'[^a-zA-Z0-9_]', '_', name)}", "expr": expr} for name, expr in exprs.items()]
    path = tmp_path / "parse.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "parse", "rules": rules}]}))
    return promtool("check", "rules", str(path))


def test_every_promql_expression_parses(tmp_path: Path, with_v0f: list[dict]) -> None:
    exprs = all_expressions(with_v0f)
    assert len([e for e in exprs if e.startswith("dashboard_")]) >= 35
    assert len([e for e in exprs if e.startswith("keda_")]) == 2
    proc = check_parse(exprs, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_parse_check_catches_a_broken_query(tmp_path: Path) -> None:
    broken = 'histogram_quantile(0.5, sum by (le) (rate(supir_stage_duration_seconds_bucket{{stage="total"}}[5m])))'
    proc = check_parse({"broken": broken}, tmp_path)
    assert proc.returncode != 0 and "check:broken" in proc.stdout + proc.stderr


# --- scaling ------------------------------------------------------------------------------------------------


def test_keda_scales_on_each_job_once_with_a_fallback() -> None:
    spec = KEDA["spec"]
    # the recording rule's expression, for this install's v0Q alone (unit-tested: 4, not 8, and not v0F's jobs)
    record = RECORDS["supir:jobs_outstanding"]["expr"]
    matchers = r'max(\1{namespace="supir", variant="v0Q"})'
    assert TRIGGER["metadata"]["query"] == re.sub(r"max by \(namespace, variant\) \((\w+)\)", matchers, record)
    assert TRIGGER.get("metricType", "AverageValue") == "AverageValue"  # fallback works for AverageValue only
    assert TRIGGER["metadata"]["ignoreNullValues"] == "false"  # no gauges → fallback, not zero jobs
    assert spec["fallback"]["failureThreshold"] >= 1 and spec["fallback"]["replicas"] >= 1
    assert spec["minReplicaCount"] == 0
    assert float(TRIGGER["metadata"]["threshold"]) == 10
    down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] <= 300
    assert {"type": "Percent", "value": 50, "periodSeconds": 60} in down["policies"]


def test_the_docs_agree_with_the_scaling_manifest() -> None:
    scaling = section("Scaling")
    spec = KEDA["spec"]
    assert f"`{TRIGGER['metadata']['query']}`" in scaling
    assert f"`minReplicaCount: {spec['minReplicaCount']}`" in scaling and "`minReplicaCount: 1`" in scaling
    assert "supir_model_load_seconds" in scaling and "supir:jobs_per_worker_per_minute" in scaling
    assert f"threshold {TRIGGER['metadata']['threshold']}" in scaling.lower()
    assert f"replicas {spec['fallback']['replicas']}" in scaling or f"{spec['fallback']['replicas']} workers" in scaling
    assert "preStop" in scaling and "terminationGracePeriodSeconds" in scaling
    worker = yaml.safe_load((K8S / "worker.yaml").read_text())
    pod = worker["spec"]["template"]["spec"]
    assert pod["containers"][0]["lifecycle"]["preStop"]  # what makes fast scale-in safe
    comment = (K8S / "keda.yaml").read_text().split("apiVersion")[0]
    assert re.search(rf"minReplicaCount:? {spec['minReplicaCount']} scales to zero", comment)  # the comment agrees


def test_the_docs_say_how_to_run_variants(with_v0f: list[dict]) -> None:
    variants = section("Variants")
    for setting in ("SUPIR_VARIANTS", "SUPIR_DEFAULT_VARIANT", "SUPIR_WORKER_VARIANTS"):
        assert f"`{setting}`" in variants
    assert "`components: [components/v0f]`" in variants and (K8S / "components/v0f/kustomization.yaml").is_file()
    assert "variant_unavailable" in variants and "python -m worker.drain" in variants
    assert "deploy/compose-up.sh" in variants and (REPO / "deploy/compose-up.sh").is_file()
    for name in scaling_queries(with_v0f):
        assert f"`{name}`" in variants or name == "supir-worker"
    assert "supir_variant_workers" in variants and "SDXL base" in variants  # who serves; shared memory


# --- Kubernetes rendering -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing"
    proc = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_the_kustomize_rendering_validates(rendered: list[dict], with_v0f: list[dict]) -> None:
    for docs in (rendered, with_v0f):
        standard = [d for d in docs if d["kind"] not in CRD_KINDS]
        assert {"Deployment", "Service", "ConfigMap"} <= {d["kind"] for d in standard}
        for doc in standard:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert {d["kind"] for d in docs} >= CRD_KINDS  # their shapes: tests/deploy/test_deploy.py

    def ids(docs: list[dict]) -> set[tuple[str, str]]:  # a generated ConfigMap's hash suffix differs with v0F
        return {(d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] != "ConfigMap"}

    assert ids(with_v0f) - ids(rendered) == {("Deployment", "supir-worker-v0f"), ("ScaledObject", "supir-worker-v0f")}


def test_only_the_operator_objects_get_the_selector_label(rendered: list[dict]) -> None:
    kustomization = (K8S / "kustomization.yaml").read_text()
    settings = re.findall(r"^\s+release: (\S+)", kustomization, re.MULTILINE)
    assert len(settings) == 1  # one place to set it
    value = settings[0]
    labelled = {(d["kind"], d["metadata"]["name"]) for d in rendered if "release" in d["metadata"].get("labels", {})}
    expected = {(d["kind"], d["metadata"]["name"]) for d in rendered if d["kind"] in MONITOR_KINDS}
    assert labelled == expected and len(expected) >= 4
    assert all(d["metadata"]["labels"]["release"] == value for d in rendered if d["kind"] in MONITOR_KINDS)
    assert "release:" in section("Alertmanager")  # documented


# --- compose: Prometheus sends to an Alertmanager -----------------------------------------------------------


def test_compose_prometheus_sends_alerts_to_its_alertmanager() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    manager = compose["alertmanager"]
    assert manager["image"] == "prom/alertmanager:v0.27.0"
    assert "./deploy/prometheus/alertmanager.yml:/etc/alertmanager/alertmanager.yml:ro" in manager["volumes"]
    assert "alertmanager" in compose["prometheus"]["depends_on"]
    prometheus = yaml.safe_load((PROM / "prometheus.yml").read_text())
    targets = [t for am in prometheus["alerting"]["alertmanagers"] for s in am["static_configs"] for t in s["targets"]]
    assert targets == ["alertmanager:9093"]
    for job in prometheus["scrape_configs"]:  # the label every rule and dashboard query keeps
        assert {"target_label": "namespace", "replacement": "supir"} in job["relabel_configs"], job["job_name"]
    proc = promtool("check", "config", "deploy/prometheus/prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alertmanager_config_routes_to_a_defined_receiver() -> None:
    """No amtool here: the shape Alertmanager refuses to start without (a root route to a declared receiver)."""
    config = yaml.safe_load((PROM / "alertmanager.yml").read_text())
    receivers = [r["name"] for r in config["receivers"]]
    assert len(receivers) == len(set(receivers))
    routes = [config["route"]]
    while routes:
        route = routes.pop()
        assert route.get("receiver", receivers[0]) in receivers
        routes.extend(route.get("routes", []))
    assert set(config) <= {"global", "route", "receivers", "inhibit_rules", "templates", "time_intervals"}
    # the heartbeat goes, first and often, to its own receiver (a dead man's switch), never down a paging route
    first = config["route"]["routes"][0]
    assert first["matchers"] == ['alertname="SupirHeartbeat"'] and first["receiver"] != config["route"]["receiver"]
    assert first.get("continue", False) is False and first["repeat_interval"] == "1m"
