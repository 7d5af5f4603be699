"""`python -m worker.drain`: the worker container's preStop hook. Asks this pod's Celery worker to stop taking
jobs from its variants' queues, so that it finishes the job it runs and takes no other before it is stopped.
Always exits 0: a failed drain must not block the pod's termination (the broker redelivers an unfinished job)."""

from __future__ import annotations

import socket
import sys

from jobs.queue import make_celery, variant_queue
from jobs.settings import get_settings


def main() -> int:
    try:
        settings = get_settings()
        app = make_celery(settings)
        node = f"celery@{socket.gethostname()}"
        for name in settings.worker_variant_names:
            app.control.cancel_consumer(variant_queue(settings, name), destination=[node], reply=True, timeout=5)
    except Exception as exc:  # the broker may be away: stopping goes on regardless
        print(f"drain: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
