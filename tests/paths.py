"""Where the tests' files are: one place, so a test file can move between folders without its paths breaking."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"  # photos the tests send
CONFORMANCE = DATA / "conformance"
FIXTURE_A = CONFORMANCE / "A"
MANIFEST = CONFORMANCE / "manifest_full.json"
BENCH = REPO / "bench"
DOCS = REPO / "docs"
