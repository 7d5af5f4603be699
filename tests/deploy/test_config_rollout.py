"""Config changes reach the pods without `kubectl rollout restart`, as `kubectl kustomize` renders the manifests (as
shipped and with the v0F component): the ConfigMap is generated with a hash of its values in its name and every
Deployment refers to that name, so a changed value changes the pod templates (the pods roll on apply); the API
keys Secret keeps its name (not hash-rolled) and reaches the API as a mounted file, which it re-reads
(tests/api/test_key_rotation.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.kustomize import COMPONENTS, rendered
from tests.paths import REPO

HASHED = re.compile(r"supir-config-[a-z0-9]{10}")


def config_refs(docs: list[dict]) -> dict[str, set[str]]:
    """Deployment → the ConfigMaps its containers read (envFrom and env)."""
    refs: dict[str, set[str]] = {}
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        names = refs.setdefault(d["metadata"]["name"], set())
        for c in d["spec"]["template"]["spec"]["containers"]:
            names |= {s["configMapRef"]["name"] for s in c.get("envFrom", []) if "configMapRef" in s}
            names |= {
                e["valueFrom"]["configMapKeyRef"]["name"]
                for e in c.get("env", [])
                if "configMapKeyRef" in e.get("valueFrom", {})
            }
    return refs


def config_map(docs: list[dict]) -> dict:
    (found,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("supir-config")]
    return found


def render_copy(tmp: Path, components: list[str], edit: tuple[str, str] | None = None) -> list[dict]:
    """kubectl kustomize on a copy of deploy/ with these components, config.env's `edit` (old, new) applied."""
    root = Path(shutil.copytree(REPO / "deploy", tmp / "deploy")) / "k8s"  # all of deploy/: ../grafana too
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    (root / "kustomization.yaml").write_text(yaml.safe_dump({**kustomization, "components": components}))
    if edit is not None:
        text = (root / "config.env").read_text()
        assert edit[0] in text
        (root / "config.env").write_text(text.replace(edit[0], edit[1]))
    out = subprocess.run(["kubectl", "kustomize", str(root)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.mark.parametrize("variant", sorted(COMPONENTS))
def test_every_deployment_reads_the_hashed_config_map(variant: str, tmp_path: Path) -> None:
    docs = rendered(COMPONENTS[variant], tmp_path)
    name = config_map(docs)["metadata"]["name"]
    assert HASHED.fullmatch(name), name
    refs = config_refs(docs)
    assert "supir-worker" in refs and ("supir-worker-v0f" in refs) == ("components/v0f" in COMPONENTS[variant])
    assert all(names == {name} for names in refs.values()), refs  # no Deployment left on a stale or static name
    secrets = {v["secret"]["secretName"] for d in docs if d["kind"] == "Deployment"
               for v in d["spec"]["template"]["spec"].get("volumes", []) if "secret" in v}  # fmt: skip
    assert secrets == {"supir-api-keys"}  # kept by name: the API re-reads it live, nothing rolls


def test_a_changed_value_rolls_the_pods_and_v0f_gets_its_own_config(tmp_path: Path) -> None:
    before = render_copy(tmp_path / "a", [])
    after = render_copy(tmp_path / "b", [], ("SUPIR_JOB_TIME_LIMIT_S=1800", "SUPIR_JOB_TIME_LIMIT_S=1500"))
    old, new = config_map(before), config_map(after)
    assert new["data"]["SUPIR_JOB_TIME_LIMIT_S"] == "1500" and old["metadata"]["name"] != new["metadata"]["name"]

    def templates(docs: list[dict]) -> dict[str, dict]:
        return {d["metadata"]["name"]: d["spec"]["template"] for d in docs if d["kind"] == "Deployment"}

    changed = {n for n, t in templates(after).items() if t != templates(before)[n]}
    assert changed == set(config_refs(after))  # every Deployment's pod template changed: each one rolls
    with_v0f = config_map(render_copy(tmp_path / "c", ["components/v0f"]))
    assert "SUPIR_VARIANTS" in with_v0f["data"] and "SUPIR_CHECKPOINT" not in with_v0f["data"]
    assert with_v0f["metadata"]["name"] != old["metadata"]["name"]  # enabling v0F rolls the pods too


def test_the_api_reads_its_keys_from_the_mounted_secret() -> None:
    docs = rendered()
    api = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "supir-api")
    pod = api["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    volume, mode = next(
        (v["name"], v["secret"]["defaultMode"])
        for v in pod["volumes"]
        if v.get("secret", {}).get("secretName") == "supir-api-keys"
    )
    assert mode & 0o007 == 0 and pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]  # ours alone
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume]
    assert mount["readOnly"] and "subPath" not in mount  # a subPath mount never sees the Secret's updates
    path = Path(env["SUPIR_API_KEYS_FILE"])
    assert path.parent == Path(mount["mountPath"])
    example = next(
        d for d in yaml.safe_load_all((REPO / "deploy/k8s/secret.example.yaml").read_text())
        if d["metadata"]["name"] == "supir-api-keys"
    )  # fmt: skip
    assert set(example["stringData"]) == {path.name}
    assert not any("supir-api-keys" in str(s) for s in container.get("envFrom", []))  # an env var never updates
