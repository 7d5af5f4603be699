"""Import rules: the torch-free corner of supir_core imports without torch."""

from __future__ import annotations

import subprocess
import sys


def test_errors_import_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None; sys.modules['transformers'] = None\n"
        "import supir_core, supir_core.errors\n"
        "assert issubclass(supir_core.errors.WeightsError, supir_core.errors.SupirError)\n"
        "assert supir_core.errors.InvalidInput('x').code == 'invalid_input'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
