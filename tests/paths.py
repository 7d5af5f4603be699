"""Where the tests' files and servers are: one place, so a test file can move between folders without its paths
breaking, and two suites can run side by side on different Redis servers."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"  # photos the tests send
CONFORMANCE = DATA / "conformance"
FIXTURE_A = CONFORMANCE / "A"
MANIFEST = CONFORMANCE / "manifest_full.json"
BENCH = REPO / "bench"
DOCS = REPO / "docs"

# The Redis server every test service uses (each with its own key prefix and queues): TEST_REDIS_URL, else this
# machine's on REDIS_PORT, the port `make test` makes sure a server answers on (scripts/ensure-redis.sh).
REDIS_URL = os.environ.get("TEST_REDIS_URL") or f"redis://127.0.0.1:{os.environ.get('REDIS_PORT') or 6379}/0"


def redis_url(db: int) -> str:
    """The tests' Redis server, another database of it."""
    return REDIS_URL.rsplit("/", 1)[0] + f"/{db}"
