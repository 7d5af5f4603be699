"""The manifests as `kubectl kustomize` renders them."""

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import yaml

from tests.paths import REPO

# what `kubectl apply -k` renders, with v0F enabled, and with node-local weights too
COMPONENTS = {"base": [], "v0f": ["components/v0f"], "node-cache": ["components/v0f", "components/node-cache"]}


def rendered(
    components: list[str] | None = None, tmp: Path | None = None, edit: Callable[[dict], None] | None = None
) -> list[dict]:
    """`kubectl kustomize deploy/k8s`; with components, of a copy whose kustomization lists them (the documented
    way to enable one: a component listed there gets the namespace, labels and images too); `edit` changes that
    copy's kustomization as an operator would (its namespace, the Prometheus settings)."""
    root = REPO / "deploy/k8s"
    if components or edit:
        assert tmp is not None
        root = Path(shutil.copytree(REPO / "deploy", tmp / "deploy")) / "k8s"  # all of deploy/: ../grafana too
        kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
        kustomization["components"] = components or []
        if edit:
            edit(kustomization)
        (root / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    out = subprocess.run(["kubectl", "kustomize", str(root)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]
