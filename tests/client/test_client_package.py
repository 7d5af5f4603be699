"""The client package stands alone: httpx and the standard library only, no torch, nothing of the service's code,
and it builds as its own wheel from clients/python."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from supir_client.errors import RateLimited, ServerError, error_from_response

from tests.paths import REPO

PACKAGE = REPO / "clients" / "python"
SERVICE_AND_HEAVY = ("api", "jobs", "worker", "supir_core", "tests", "torch", "numpy", "PIL", "pydantic", "fastapi")


def test_it_imports_without_the_service_or_torch(tmp_path: Path) -> None:
    """In a process that sees clients/python but not the repository, with the service's packages and the heavy
    libraries made unimportable."""
    code = (
        "import sys\n"
        f"blocked = {SERVICE_AND_HEAVY!r}\n"
        "for name in blocked: sys.modules[name] = None\n"
        f"assert {str(REPO)!r} not in sys.path\n"
        "import supir_client, supir_client.cli, supir_client.webhooks, supir_client.models, supir_client.errors\n"
        "from supir_client import Client\n"
        "Client('http://127.0.0.1:9', 'sk_x').close()\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in blocked and sys.modules[m] is not None]\n"
        "assert not loaded, loaded\n"
        "assert supir_client.__file__.startswith(sys.argv[1]), supir_client.__file__\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PACKAGE)}
    done = subprocess.run(
        [sys.executable, "-P", "-c", code, str(PACKAGE)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_its_modules_import_only_the_standard_library_and_httpx() -> None:
    allowed = set(sys.stdlib_module_names) | {"httpx", "supir_client"}
    for path in (PACKAGE / "supir_client").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_it_is_its_own_distribution(tmp_path: Path) -> None:
    project = tomllib.loads((PACKAGE / "pyproject.toml").read_text())["project"]
    assert project["name"] == "supir-client" and project["dependencies"] == ["httpx>=0.27"]
    assert project["scripts"] == {"supir-client": "supir_client.cli:main"}
    source = tmp_path / "source"  # a copy: a build writes build/ beside its pyproject.toml
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
         str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("supir_client-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "supir_client/py.typed" in names and "supir_client/client.py" in names
    assert {name.split("/")[0] for name in names} == {"supir_client", wheel.name.split("-py3")[0] + ".dist-info"}


def test_error_answers_that_are_not_the_services_envelope_are_still_typed() -> None:
    """A proxy's 502 page or a body-less 429 in front of the service."""
    bad_gateway = error_from_response(502, None, {})
    assert isinstance(bad_gateway, ServerError) and bad_gateway.code == "server_error" and bad_gateway.status == 502
    limited = error_from_response(429, None, {"RateLimit": '"write";r=0;t=17'})
    assert isinstance(limited, RateLimited) and limited.retry_after == 17
