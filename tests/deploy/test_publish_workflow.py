"""The release workflow (.github/workflows/images.yml): linted (zizmor, offline, and GitHub's workflow schema through
check-jsonschema), third-party actions pinned by commit, build arguments that the Dockerfiles declare, OCI labels;
its digest step run here against a copy of deploy/k8s; and the kustomization accepting images pinned by digest."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.paths import REPO

WORKFLOW = REPO / ".github/workflows/images.yml"
BIN = Path(sys.executable).parent
API_DIGEST = "sha256:" + "a1" * 32
WORKER_DIGEST = "sha256:" + "b2" * 32


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "zizmor"), "--offline", "--persona=auditor", "--no-progress", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_workflow_passes_the_linters() -> None:
    proc = lint(WORKFLOW)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    schema = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert schema.returncode == 0, schema.stdout + schema.stderr


def test_the_linter_catches_what_it_should(tmp_path: Path) -> None:
    """A control: the same workflow with a tag-pinned action and the tag name expanded inside a script fails."""
    text = WORKFLOW.read_text()
    bad = re.sub(r"actions/checkout@[0-9a-f]{40}", "actions/checkout@v4", text, count=1)
    bad = bad.replace('echo "version=${TAG}"', 'echo "version=${{ github.ref_name }}"')
    assert bad != text
    (tmp_path / "images.yml").write_text(bad)
    proc = lint(tmp_path / "images.yml")
    assert proc.returncode != 0 and "unpinned-uses" in proc.stdout and "template-injection" in proc.stdout


def steps() -> list[tuple[str, dict]]:
    return [(name, step) for name, job in workflow()["jobs"].items() for step in job["steps"]]


def test_tags_trigger_it_and_actions_are_pinned_by_commit() -> None:
    flow = workflow()
    assert flow[True] == {"push": {"tags": ["v*"]}}  # YAML 1.1 reads the key `on` as True
    assert flow["permissions"] == {"contents": "read"}
    uses = [step["uses"] for _, step in steps() if "uses" in step]
    assert uses and all(re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", u) for u in uses), uses
    assert "vars.IMAGE_REGISTRY" in WORKFLOW.read_text()


def dockerfile_args(path: Path) -> set[str]:
    return set(re.findall(r"^ARG (\w+)", path.read_text(), re.MULTILINE))


def test_both_images_are_built_with_declared_args_and_oci_labels() -> None:
    builds = {step["with"]["file"]: step["with"] for _, step in steps() if "build-push-action" in step.get("uses", "")}
    assert set(builds) == {"docker/api.Dockerfile", "docker/worker.Dockerfile"}
    for file, build in builds.items():
        args = dict(line.split("=", 1) for line in build["build-args"].strip().splitlines())
        assert set(args) <= dockerfile_args(REPO / file), (
            f"{file} does not declare {set(args) - dockerfile_args(REPO / file)}"
        )
        assert build["push"] is True
        labels = dict(line.split("=", 1) for line in build["labels"].strip().splitlines())
        assert labels["org.opencontainers.image.version"] == "${{ needs.check.outputs.version }}"
        assert labels["org.opencontainers.image.revision"] == "${{ github.sha }}"
        assert labels["org.opencontainers.image.source"] == "${{ github.server_url }}/${{ github.repository }}"
    flavour = dict(line.split("=", 1) for line in builds["docker/worker.Dockerfile"]["build-args"].strip().splitlines())
    assert flavour["TORCH_FLAVOUR"] == "cuda" and (REPO / "constraints/worker-cuda.lock").is_file()
    assert "constraints/worker-${TORCH_FLAVOUR}.lock" in (REPO / "docker/worker.Dockerfile").read_text()


# --------------------------------------------------------------------------------------------
# digests into the kustomization


def digest_step() -> dict:
    return next(step for name, step in steps() if name == "kustomization" and "run" in step)


def test_the_digest_step_pins_every_image_and_writes_the_release(tmp_path: Path) -> None:
    """The workflow's own script, run as it is with bash, sed and kubectl in a copy of deploy/k8s."""
    shutil.copytree(REPO / "deploy", tmp_path / "deploy")  # all of it: k8s reads ../grafana
    summary = tmp_path / "summary.md"
    step = digest_step()
    env = {**os.environ, "GITHUB_STEP_SUMMARY": str(summary)}
    env |= {"REGISTRY": "example.registry/team", "VERSION": "v0.1.0", "REVISION": "c0ffee" * 6 + "c0ff"}
    env |= {"API_DIGEST": API_DIGEST, "WORKER_DIGEST": WORKER_DIGEST}
    proc = subprocess.run(["bash", "-c", step["run"]], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    release = json.loads((tmp_path / "release/digests.json").read_text())
    assert release["images"] == {
        "supir-serve-api": f"example.registry/team/supir-serve-api@{API_DIGEST}",
        "supir-serve-worker": f"example.registry/team/supir-serve-worker@{WORKER_DIGEST}",
    }
    assert release["version"] == "v0.1.0" and API_DIGEST in summary.read_text()
    pinned = yaml.safe_load((tmp_path / "release/kustomization.yaml").read_text())["images"]
    assert {i["name"]: i["digest"] for i in pinned} == {
        "supir-serve-api": API_DIGEST,
        "supir-serve-worker": WORKER_DIGEST,
    }

    env["WORKER_DIGEST"] = ""  # a build that reported no digest stops the job
    shutil.rmtree(tmp_path / "release")
    failed = subprocess.run(["bash", "-c", step["run"]], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and "no digest" in failed.stdout


@pytest.mark.parametrize("components", [[], ["components/v0f"]], ids=["base", "v0f"])
def test_the_kustomization_accepts_images_pinned_by_digest(tmp_path: Path, components: list[str]) -> None:
    root = Path(shutil.copytree(REPO / "deploy", tmp_path / "deploy")) / "k8s"  # with ../grafana
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    digests = {"supir-serve-api": API_DIGEST, "supir-serve-worker": WORKER_DIGEST}
    short = {"supir-serve-api": "supir-api", "supir-serve-worker": "supir-worker"}
    names = {entry["name"] for entry in kustomization["images"]}
    assert names == set(digests)
    kustomization["images"] = [
        {"name": name, "newName": f"example.registry/{short[name]}", "digest": digests[name]} for name in sorted(names)
    ]
    kustomization["components"] = components
    (root / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    out = subprocess.run(["kubectl", "kustomize", str(root)], capture_output=True, text=True, check=True, timeout=120)
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    workloads = {
        d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "Job")
    }
    expected = {"supir-api", "supir-worker", "supir-webhooks", "supir-weights"} | (
        {"supir-worker-v0f"} if components else set()
    )
    assert set(workloads) == expected
    for name, pod in workloads.items():
        for container in pod["containers"] + pod.get("initContainers", []):
            image = container["image"]
            assert re.fullmatch(r"example\.registry/supir-(api|worker)@sha256:[0-9a-f]{64}", image), (name, image)
    assert workloads["supir-api"]["containers"][0]["image"] == f"example.registry/supir-api@{API_DIGEST}"
    assert workloads["supir-worker"]["containers"][0]["image"] == f"example.registry/supir-worker@{WORKER_DIGEST}"
    assert workloads["supir-weights"]["containers"][0]["image"] == f"example.registry/supir-worker@{WORKER_DIGEST}"
