"""The `supir` command: conformance runs and weight checks (restoration lands with the pipeline)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import SupirError

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2


def _conformance(args: argparse.Namespace) -> int:
    from .conformance import Fixture, compare, format_table, run_fixture, save_outputs

    fixture = Fixture.open(args.fixture)
    supir_file = fixture.root / args.supir_file if args.supir_file else None
    model = fixture.load_model(supir_file)
    result = run_fixture(fixture, model, only=args.case or None)
    save_outputs(result, args.out)
    print(f"wrote {len(result.outputs)} tensors of {len(result.ran)} cases to {args.out}")
    if result.skipped:
        print("skipped (not supported yet): " + ", ".join(f"{name} ({kind})" for name, kind in result.skipped))
    if not args.check:
        return EXIT_OK
    rows = compare(fixture, result)
    print(format_table(rows))
    failed = [r for r in rows if not r.passed]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return EXIT_FAILED if failed else EXIT_OK


def _check_keys(args: argparse.Namespace) -> int:
    from .checkpoints import check_manifest

    report = check_manifest(args.manifest)
    print(json.dumps(report, indent=1))
    complete = report["mapped"] == report["expected"] and not (
        report["missing"] or report["unused"] or report["mismatched"]
    )
    return EXIT_OK if complete else EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="supir", description="SUPIR photo restoration (supir-serve).")
    commands = parser.add_subparsers(dest="command", required=True)

    conf = commands.add_parser("conformance", help="run a conformance fixture's cases through the production code")
    conf.add_argument("fixture", type=Path, help="fixture folder (config.json, sdxl.safetensors, supir.ckpt, inputs)")
    conf.add_argument("--out", type=Path, required=True, help="where to write the outputs (.safetensors)")
    conf.add_argument("--check", action="store_true", help="compare with the folder's expected.safetensors")
    conf.add_argument("--case", action="append", help="run only this case (repeatable)")
    conf.add_argument("--supir-file", help="SUPIR weights file inside the folder (default supir.ckpt)")
    conf.set_defaults(run=_conformance)

    weights = commands.add_parser("weights", help="inspect checkpoint files").add_subparsers(
        dest="action", required=True
    )
    keys = weights.add_parser("check-keys", help="map a manifest of the real files onto the full-size model (meta)")
    keys.add_argument("manifest", type=Path)
    keys.set_defaults(run=_check_keys)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except SupirError as exc:
        print(f"supir: error: {exc.message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
