"""`supir-client`: restore a photo or a folder from the command line.

    supir-client restore old.jpg -o restored/ --preset quality --param upscale=2
    supir-client batch scans/ -o restored/ --param seed=7

The service and key come from --url / --key or SUPIR_URL / SUPIR_API_KEY."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from .client import Client
from .errors import SupirError
from .models import Batch


def parse_param(text: str) -> tuple[str, Any]:
    """`k=v`, the value read as JSON where it is JSON (`steps=8`, `keep_metadata=false`), else as a string
    (`prompt=a cat`)."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--param takes name=value, not {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return name.strip(), value


def progress_line(batch: Batch) -> str:
    counts = batch.counts
    line = f"{counts.ended}/{batch.total} ended ({counts.succeeded} succeeded, {counts.failed} failed"
    line += f", {counts.canceled} canceled) {batch.progress:.0%}"
    return line + (f", eta {batch.eta}" if batch.eta and not batch.ended else "")


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    out, err = stdout or sys.stdout, stderr or sys.stderr
    parser = argparse.ArgumentParser(prog="supir-client", description="Restore photos with a supir-serve service.")
    parser.add_argument("--url", help="the service (default: $SUPIR_URL, else http://127.0.0.1:8000)")
    parser.add_argument("--key", help="the API key (default: $SUPIR_API_KEY)")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(command: argparse.ArgumentParser) -> None:
        command.add_argument("--preset", help="named settings: quality, fidelity, lightning, portrait")
        command.add_argument("--variant", help="the SUPIR checkpoint, as the service serves them (v0Q, v0F)")
        command.add_argument(
            "--param", action="append", type=parse_param, default=[], metavar="NAME=VALUE", help="a restoration "
            "parameter (repeatable), e.g. --param upscale=2 --param seed=7; only these are sent"
        )  # fmt: skip
        command.add_argument("--timeout", type=float, help="seconds to wait for the end (default: no limit)")

    restore = commands.add_parser("restore", help="restore one photo")
    restore.add_argument("file", help="the photo: PNG, JPEG, WebP, TIFF, BMP or GIF")
    restore.add_argument("-o", "--output", default=".", help="directory for the result(s) (default: here)")
    common(restore)
    batch = commands.add_parser("batch", help="restore every photo of a folder as one batch")
    batch.add_argument("folder")
    batch.add_argument("-o", "--output", required=True, help="directory for the results")
    batch.add_argument("--zip", action="store_true", help="save the batch's results.zip there instead of images")
    common(batch)
    args = parser.parse_args(argv)

    params = dict(args.param)
    try:
        with Client(args.url, args.key) as client:
            if args.command == "restore":
                restoration = client.restore(
                    args.file, params=params, preset=args.preset, variant=args.variant, timeout=args.timeout
                )
                for path in restoration.save(args.output):
                    print(path, file=out)
                return 0

            def show(view: Batch) -> None:
                print("\r" + progress_line(view), end="\n" if view.ended else "", file=err, flush=True)

            result = client.batch(
                args.folder,
                params=params,
                preset=args.preset,
                variant=args.variant,
                on_progress=show,
                timeout=args.timeout,
            )
            if args.zip:
                print(result.download_zip(args.output), file=out)
            else:
                for path in result.save(args.output):
                    print(path, file=out)
            failed = result.failed()
            for job in failed:
                source = result.sources.get(job.id)
                reason = f"{job.error.code}: {job.error.message}" if job.error else job.status
                print(f"{source or job.id}: {reason}", file=err)
            return 1 if failed else 0
    except (SupirError, OSError, ValueError) as exc:
        print(f"supir-client: {exc}", file=err)
        return 1
