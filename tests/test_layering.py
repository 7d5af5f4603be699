"""Import rules: the torch-free corner of supir_core imports without torch."""

from __future__ import annotations

import subprocess
import sys

from tests.paths import REDIS_URL


def test_errors_import_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None; sys.modules['transformers'] = None\n"
        "import supir_core, supir_core.errors\n"
        "assert issubclass(supir_core.errors.WeightsError, supir_core.errors.SupirError)\n"
        "assert supir_core.errors.InvalidInput('x').code == 'invalid_input'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_the_api_never_imports_torch() -> None:
    """The API image needs no torch: import the app with torch, diffusers and transformers made unimportable."""
    code = (
        "import sys\n"
        "for name in ('torch', 'diffusers', 'transformers', 'worker'): sys.modules[name] = None\n"
        "import api.app, api.main\n"
        "heavy = ('torch', 'diffusers', 'transformers')\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in heavy and sys.modules[m]]\n"
    )
    env = {**__import__("os").environ, "SUPIR_REDIS_URL": REDIS_URL}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr


def test_supir_core_knows_nothing_of_the_service() -> None:
    from pathlib import Path

    core = Path(__file__).resolve().parents[1] / "supir_core"
    forbidden = ("fastapi", "celery", "redis", "boto3", "jobs", "api", "worker", "starlette", "httpx")
    for path in core.rglob("*.py"):
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:1] in (["import"], ["from"]) and len(words) > 1:
                assert words[1].split(".")[0] not in forbidden, f"{path.name}: {line}"


def test_the_repository_needs_nothing_beside_it() -> None:
    """A plain clone has no shared folder beside it: no tracked file may read one (fixtures: tests/data/conformance)."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True).stdout
    needles = ("../" + "shared", "SUPIR_" + "SHARED")  # spelt in two parts, so this file is not a reader
    readers = []
    for name in tracked.decode().split("\0"):
        path = repo / name
        if not name or not path.is_file() or path.suffix in {".safetensors", ".png", ".jpg"}:
            continue
        text = path.read_text(errors="replace")
        if any(needle in text for needle in needles):
            readers.append(name)
    assert not readers, f"these files read the folder beside the checkout, which a clone lacks: {readers}"
    assert (repo / "tests" / "data" / "conformance" / "A" / "sdxl.safetensors").is_file()
