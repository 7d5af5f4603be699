"""The `supir` command: restore photos, run conformance fixtures, check weight files."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SupirError

if TYPE_CHECKING:  # torch and tqdm load only for the commands that need them
    from tqdm import tqdm

    from .params import RestoreParams
    from .pipeline import Progress, RestorationPipeline

EXIT_OK, EXIT_FAILED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"}


def _inputs(paths: list[Path]) -> list[Path]:
    """Files as given; folders expanded to the images directly inside them, sorted."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(path)
    return found


def _output_names(inputs: list[Path], extension: str = "png", num_samples: int = 1) -> list[list[str]]:
    """Per input, a file name per sample: `<stem>.<ext>`, then `<stem>-1.<ext>`, `<stem>-2.<ext>`…; made unique
    when two inputs share a stem or one's sample names would take another's (`a.jpg` with 2 samples, `a-1.png`)."""
    names: list[list[str]] = []
    seen: set[str] = set()

    def files(base: str) -> list[str]:
        return [f"{base}.{extension}"] + [f"{base}-{i}.{extension}" for i in range(1, num_samples)]

    for path in inputs:
        base, n = path.stem, 2
        if seen.intersection(files(base)):
            base = f"{path.stem}_{path.suffix.lstrip('.') or 'img'}"
        while seen.intersection(files(base)):
            base, n = f"{path.stem}_{n}", n + 1
        seen.update(files(base))
        names.append(files(base))
    return names


def _param_values(args: argparse.Namespace) -> dict[str, object]:
    from .params import RestoreParams

    return {name: getattr(args, name) for name in RestoreParams.model_fields if getattr(args, name, None) is not None}


def _restore(args: argparse.Namespace) -> int:
    import time

    from .errors import InvalidInput
    from .params import validate_params

    sdxl, supir = _weight_files(args)
    params = validate_params(_param_values(args), preset=args.preset)  # fail on bad flags before loading weights
    inputs = _inputs(args.inputs)
    if not inputs:
        raise InvalidInput("no input images found")
    started = time.perf_counter()
    pipeline = _load_pipeline(args, sdxl, supir, params)
    loaded_in = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    with _Interrupt() as interrupt:
        done, failures = _restore_files(pipeline, inputs, params, args, interrupt)
    seconds = time.perf_counter() - started
    print(f"restored {done} of {len(inputs)} images into {args.out} in {seconds:.1f} s (weights: {loaded_in:.1f} s)")
    for failure in failures:
        print(f"  failed: {failure}", file=sys.stderr)
    if interrupt.seen:
        print("interrupted: stopped before the next sampler step", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_FAILED if failures else EXIT_OK


def _weight_files(args: argparse.Namespace) -> tuple[str, str]:
    """The SDXL and SUPIR files: the flags, else the service's environment variables."""
    from .errors import InvalidInput

    sdxl = args.sdxl or os.environ.get("SUPIR_SDXL_CHECKPOINT")
    supir = args.supir or os.environ.get("SUPIR_CHECKPOINT")
    if not sdxl or not supir:
        raise InvalidInput(
            "weights not given: pass --sdxl and --supir, or set SUPIR_SDXL_CHECKPOINT and SUPIR_CHECKPOINT"
        )
    return sdxl, supir


def _load_pipeline(args: argparse.Namespace, sdxl: str, supir: str, params: RestoreParams) -> RestorationPipeline:
    """The pipeline the flags (else the environment) describe, with LLaVA when the params ask for captions."""
    from .checkpoints import ModelOptions, load_model_options
    from .params import dtype_name as dtype_name_of

    env = os.environ
    dtype_name = args.dtype or env.get("SUPIR_DTYPE")
    torch_dtype_name = dtype_name_of(dtype_name) if dtype_name else None  # a bad name fails before torch loads
    config = args.model_config or env.get("SUPIR_MODEL_CONFIG")
    options = load_model_options(config) if config else ModelOptions()

    import torch

    from .pipeline import RestorationPipeline
    from .speed import SpeedSettings

    pipeline = RestorationPipeline.from_checkpoints(
        sdxl,
        supir,
        device=args.device or env.get("SUPIR_DEVICE") or None,
        dtype=getattr(torch, torch_dtype_name) if torch_dtype_name else None,
        options=options,
        speed=SpeedSettings.from_attributes(args),
    )
    llava = args.llava or env.get("SUPIR_LLAVA_MODEL")
    if llava and params.caption == "auto":
        from .captioning import LlavaCaptioner

        quantization = args.llava_quantization or env.get("SUPIR_LLAVA_QUANTIZATION") or None
        device = args.llava_device or env.get("SUPIR_LLAVA_DEVICE") or str(pipeline.device)
        captioner = LlavaCaptioner(llava, device=device, quantization=quantization)  # type: ignore[arg-type]
        captioner.load()  # before the first image: it stays loaded, and the tiling budget counts it from the first
        pipeline.captioner = captioner
    return pipeline


class _Interrupt:
    """Ctrl-C during a batch, remembered instead of raised: the sampler stops before its next step and no further
    input starts. The previous handler is back on exit."""

    def __init__(self) -> None:
        self.seen = False

    def __enter__(self) -> _Interrupt:
        self._previous = signal.signal(signal.SIGINT, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.seen = True


def _restore_files(
    pipeline: RestorationPipeline,
    inputs: list[Path],
    params: RestoreParams,
    args: argparse.Namespace,
    interrupt: _Interrupt,
) -> tuple[int, list[str]]:
    """Restore each input into args.out; a failed input is listed and the batch goes on. (done, failures)"""
    from tqdm import tqdm

    from .errors import Canceled, InvalidInput
    from .formats import OUTPUT_FORMATS

    failures: list[str] = []
    done = 0
    names = _output_names(inputs, OUTPUT_FORMATS[params.output_format].extension, params.num_samples)
    for path, files in tqdm(list(zip(inputs, names, strict=True)), desc="images", unit="img", disable=args.quiet):
        bar = tqdm(total=params.steps, desc=path.name, unit="step", leave=False, disable=args.quiet)
        try:
            _restore_file(pipeline, path, files, params, args, _step_bar(bar), lambda: interrupt.seen)
            done += 1
        except Canceled:
            break
        except InvalidInput as exc:
            failures.append(f"{path}: {exc.message}")
        except Exception as exc:  # any other exception (a decoder's NotImplementedError…) fails this input only
            failures.append(f"{path}: {_one_line(exc)}")
        finally:
            bar.close()
    return done, failures


def _restore_file(
    pipeline: RestorationPipeline,
    path: Path,
    names: list[str],
    params: RestoreParams,
    args: argparse.Namespace,
    on_progress: Callable[[Progress], None],
    should_stop: Callable[[], bool],
) -> None:
    """One input: a file per sample under `names`, and with --metadata the run's record as <first name>.json."""
    from .imageio import encode_results, load_image

    loaded = load_image(path)  # decoded here so the result files can carry its EXIF and profile
    result = pipeline(loaded, params, on_progress=on_progress, should_stop=should_stop)
    kept = loaded.result_metadata() if params.keep_metadata else None
    files = encode_results(result.images, params.output_format, params.output_quality, kept)
    for file, name in zip(files, names, strict=True):
        (args.out / name).write_bytes(file.data)
    if args.metadata:
        (args.out / names[0]).with_suffix(".json").write_text(json.dumps(result.to_dict(), indent=1))


def _step_bar(bar: tqdm) -> Callable[[Progress], None]:
    """A progress callback that moves `bar` with the sampler's steps."""

    def progress(p: Progress) -> None:
        if p.stage == "sampling":
            bar.total = p.steps
            bar.n = p.step
            bar.refresh()

    return progress


def _one_line(exc: Exception) -> str:
    """An unexpected failure of one input, for the batch summary: its kind and the first line of its text."""
    text = (exc.message if isinstance(exc, SupirError) else str(exc)).strip()
    return f"cannot process it ({type(exc).__name__}{': ' + text.splitlines()[0] if text else ''})"


def _add_param_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RestoreParams field, so the CLI can set exactly what the API can."""
    from typing import get_args

    from .params import RestoreParams

    group = parser.add_argument_group("restoration parameters (default: the preset, else the official test.py)")
    for name, field in RestoreParams.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind = field.annotation
        choices = [c for c in get_args(kind) if isinstance(c, str)] or None
        if kind is bool:
            group.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=field.description
            )
        elif choices:
            group.add_argument(flag, dest=name, choices=choices, default=None, help=field.description)
        else:
            number = int if kind in (int, int | None) else float if kind is float else str
            group.add_argument(flag, dest=name, type=number, default=None, help=field.description)


def _conformance(args: argparse.Namespace) -> int:
    import torch

    from .conformance import Fixture, compare, format_table, run_fixture, save_outputs, tolerance_for
    from .errors import WeightsError

    fixture = Fixture.open(args.fixture)
    if args.check and fixture.expected is None:  # say so before minutes of running cases
        raise WeightsError(f"{fixture.root}: no expected.safetensors to check against")
    dtype = getattr(torch, args.dtype)
    tolerance = tolerance_for(fixture, dtype)  # an unsupported dtype fails before the weights load
    supir_file = fixture.root / args.supir_file if args.supir_file else None
    model = fixture.load_model(supir_file, dtype=dtype)
    result = run_fixture(fixture, model, only=args.case or None)
    save_outputs(result, args.out)
    print(f"wrote {len(result.outputs)} tensors of {len(result.ran)} cases to {args.out} ({args.dtype})")
    if result.skipped:
        print("skipped (not supported yet): " + ", ".join(f"{name} ({kind})" for name, kind in result.skipped))
    if not args.check:
        return EXIT_OK
    rows = compare(fixture, result, tolerance)
    print(format_table(rows))
    failed = [r for r in rows if not r.passed]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    # a check that silently left cases out would pass on less than the fixture asks
    skip_failed = bool(result.skipped) and not args.allow_skip
    if skip_failed:
        names = ", ".join(name for name, _ in result.skipped)
        print(f"check failed: {len(result.skipped)} case(s) skipped ({names}); --allow-skip for a partial run")
    return EXIT_FAILED if failed or skip_failed else EXIT_OK


def _check_keys(args: argparse.Namespace) -> int:
    from .checkpoints import check_manifest

    report = check_manifest(args.manifest)
    print(json.dumps(report, indent=1))
    accounted = report["loaded"] + len(report["ignored"])  # every file key either fills a tensor or is a known leftover
    complete = accounted == report["expected"] and not (report["missing"] or report["unused"] or report["mismatched"])
    return EXIT_OK if complete else EXIT_FAILED


def _check_files(args: argparse.Namespace) -> int:
    """Open both files, check what they are and plan the strict load (names and shapes, no tensor data)."""
    from .checkpoints import (
        ModelOptions,
        build_empty,
        identify,
        load_model_options,
        open_checkpoint,
        plan_loading,
        spec_from_checkpoint,
    )

    sdxl, supir = open_checkpoint(args.sdxl), open_checkpoint(args.supir)
    kinds = {"sdxl": identify(sdxl.keys()), "supir": identify(supir.keys())}
    if kinds != {"sdxl": "sdxl", "supir": "supir"}:
        print(json.dumps({"ok": False, "kinds": kinds}))
        return EXIT_FAILED
    options = load_model_options(args.model_config) if args.model_config else ModelOptions()
    plan = plan_loading(build_empty(spec_from_checkpoint(sdxl, options)), sdxl, supir)
    report = {"ok": plan.ok, "tensors": len(plan.used), "missing": plan.missing[:20], "unused": plan.unused[:20],
              "mismatched": plan.mismatched[:20], "ignored": plan.ignored}  # fmt: skip
    print(json.dumps(report, indent=1))
    return EXIT_OK if plan.ok else EXIT_FAILED


def _licence_line(entry: object) -> str:
    licence = entry.licence  # type: ignore[attr-defined]
    use = "commercial use allowed" if licence.get("commercial") else "NON-COMMERCIAL use only"
    return f"{licence['name']} ({use}): {licence.get('url', '')}"


def _weights_list(args: argparse.Namespace) -> int:
    from .weights import load_table

    for entry in load_table(args.table):
        source = f"{entry.hub}@{entry.revision or 'UNPINNED'}" if entry.hub else "-"
        print(f"{entry.name:<16} {entry.slot:<6} {entry.filename:<38} {source}")
        print(f"{'':<16} licence: {_licence_line(entry)}")
        pins = [f"sha256 {entry.sha256}" if entry.sha256 else "sha256 not pinned"]
        pins.append(f"{entry.size} bytes" if entry.size is not None else "size not pinned")
        if entry.hub and not entry.revision:
            pins.append("revision NOT PINNED: pass --revision or set SUPIR_WEIGHTS_REVISIONS to download")
        print(f"{'':<16} pins: {'; '.join(pins)}")
        if entry.provenance:
            print(f"{'':<16} provenance: {entry.provenance}")
    return EXIT_OK


def _print_problems(report: dict) -> None:
    for problem in report.get("problems", []):
        print(f"supir: {report['file']}: {problem}", file=sys.stderr)


def _weights_download(args: argparse.Namespace) -> int:
    from .weights import download, find, load_table

    entry = find(load_table(args.table), args.name)
    print(f"{entry.filename}: {_licence_line(entry)}", file=sys.stderr)
    args.dir.mkdir(parents=True, exist_ok=True)
    report = download(entry, args.dir, url=args.url, revision=args.revision, endpoint=args.endpoint)
    print(json.dumps(report, indent=1))
    _print_problems(report)
    return EXIT_OK if report["ok"] else EXIT_FAILED


def _weights_verify(args: argparse.Namespace) -> int:
    from .errors import WeightsError
    from .weights import MANIFEST_NAME, find, load_table, read_manifest, verify, verify_directory

    table = load_table(args.table)
    if args.dir:
        if args.file:
            raise WeightsError("give a FILE or --dir, not both")
        reports = verify_directory(args.dir, table)
        print(json.dumps(reports, indent=1))
        for report in reports:
            _print_problems(report)
        return EXIT_OK if all(r["ok"] for r in reports) else EXIT_FAILED
    if not args.file:
        raise WeightsError("give a FILE to verify, or --dir DIR for every file of DIR's manifest")
    by_file = next((e for e in table if e.filename == args.file.name), None)
    entry = find(table, args.name) if args.name else by_file
    if args.manifest and not args.manifest.is_file():
        raise WeightsError(f"{args.manifest}: no such manifest")
    manifest = args.manifest or args.file.parent / MANIFEST_NAME
    record = read_manifest(manifest)["files"].get(args.file.name) if manifest.is_file() else None
    report = verify(args.file, entry, sha256=args.sha256, record=record)
    print(json.dumps(report, indent=1))
    _print_problems(report)
    return EXIT_OK if report["ok"] else EXIT_FAILED


def _weights_cache(args: argparse.Namespace) -> int:
    from .weight_cache import fill_cache

    reports = fill_cache(args.source, args.to, rehash=not args.no_rehash, say=lambda line: print(line, file=sys.stderr))
    print(json.dumps(reports, indent=1))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="supir", description="SUPIR photo restoration (supir-serve).")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_conformance_command(commands)
    _add_restore_command(commands)
    _add_weights_commands(commands)
    return parser


Commands = argparse._SubParsersAction  # what add_subparsers returns


def _add_conformance_command(commands: Commands) -> None:
    conf = commands.add_parser("conformance", help="run a conformance fixture's cases through the production code")
    conf.add_argument("fixture", type=Path, help="fixture folder (config.json, sdxl.safetensors, supir.ckpt, inputs)")
    conf.add_argument("--out", type=Path, required=True, help="where to write the outputs (.safetensors)")
    conf.add_argument("--check", action="store_true", help="compare with the folder's expected.safetensors")
    conf.add_argument("--case", action="append", help="run only this case (repeatable)")
    conf.add_argument("--supir-file", help="SUPIR weights file inside the folder (default supir.ckpt)")
    conf.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="model dtype; bfloat16 is checked against measured bounds (docs/performance.md), not FORMAT.md's",
    )
    conf.add_argument(
        "--allow-skip", action="store_true", help="with --check: cases of kinds this code lacks do not fail the run"
    )
    conf.set_defaults(run=_conformance)


def _add_restore_command(commands: Commands) -> None:
    restore = commands.add_parser("restore", help="restore image files or folders of images")
    restore.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files or folders")
    restore.add_argument("-o", "--out", type=Path, required=True, help="output folder (--output-format files)")
    from .params import PRESETS

    restore.add_argument("--preset", choices=list(PRESETS), help="named settings")
    restore.add_argument("--sdxl", help="SDXL single file (default $SUPIR_SDXL_CHECKPOINT)")
    restore.add_argument("--supir", help="SUPIR-v0Q/F file (default $SUPIR_CHECKPOINT)")
    restore.add_argument("--device", help="cpu, cuda, cuda:1 … (default $SUPIR_DEVICE, else cuda if present)")
    restore.add_argument("--dtype", help="float32, bfloat16 or float16 (default $SUPIR_DTYPE, else bf16 on GPU)")
    restore.add_argument("--model-config", help="JSON of head widths for non-SDXL-sized weights ($SUPIR_MODEL_CONFIG)")
    restore.add_argument("--llava", help="LLaVA-1.5 directory (HF format) or hub id for captions ($SUPIR_LLAVA_MODEL)")
    restore.add_argument("--llava-device", help="device for LLaVA (default: the same as SUPIR)")
    restore.add_argument("--llava-quantization", choices=["8bit", "4bit"], help="bitsandbytes quantization (CUDA)")
    _add_speed_flags(restore)
    restore.add_argument(
        "--metadata", action="store_true", help="write <name>.json (seed, prompts, timings) beside each"
    )
    restore.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_param_flags(restore)
    restore.set_defaults(run=_restore)


def _add_speed_flags(parser: argparse.ArgumentParser) -> None:
    """The SpeedSettings a run loads with (read back by SpeedSettings.from_attributes)."""
    speed = parser.add_argument_group("speed and memory (docs/performance.md)")
    speed.add_argument("--channels-last", action="store_true", help="NHWC convolutions")
    speed.add_argument("--fuse-qkv", action="store_true", help="fused attention projections")
    speed.add_argument("--compile", choices=["none", "regional", "full"], default="none", help="torch.compile")
    speed.add_argument("--cuda-graphs", action="store_true", help="replay compiled graphs as CUDA graphs")
    speed.add_argument(
        "--fp8", choices=["none", "weights", "compute"], default="none", help="float8 Linear layers (not exact)"
    )
    speed.add_argument("--offload-text", action="store_true", help="text encoders wait in CPU memory")
    speed.add_argument(
        "--memory-budget-gb",
        type=float,
        default=None,
        help="activation memory a run may use before --tiling auto tiles it (default: free device memory less 10%%)",
    )
    speed.add_argument(
        "--plan-cache-dir",
        type=Path,
        default=default_plan_cache_dir(),
        help="where the traced memory plan of --tiling auto is kept, so later runs of the same model skip the trace "
        "(default: %(default)s)",
    )


def default_plan_cache_dir() -> Path:
    """Where runs outside the service keep traced memory plans: the user's cache folder (XDG_CACHE_HOME, else
    ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "supir" / "memory-plans"


def _add_weights_commands(commands: Commands) -> None:
    weights = commands.add_parser("weights", help="inspect checkpoint files").add_subparsers(
        dest="action", required=True
    )
    keys = weights.add_parser("check-keys", help="map a manifest of the real files onto the full-size model (meta)")
    keys.add_argument("manifest", type=Path)
    keys.set_defaults(run=_check_keys)
    check = weights.add_parser("check", help="check an SDXL file and a SUPIR file fit the model (no data read)")
    check.add_argument("sdxl", type=Path)
    check.add_argument("supir", type=Path)
    check.add_argument("--model-config", type=Path, help="JSON of head widths for non-SDXL-sized weights")
    check.set_defaults(run=_check_files)
    table_help = "a JSON table of your own instead of the official one (same fields as `supir weights list`)"
    listing = weights.add_parser("list", help="the official files, their pinned revisions and hashes, licences")
    listing.add_argument("--table", type=Path, help=table_help)
    listing.set_defaults(run=_weights_list)
    get = weights.add_parser(
        "download",
        help="fetch an official file at its pinned revision (resumable), verify it, record it in DIR's manifest",
    )
    get.add_argument("name", help="a name from `supir weights list`")
    get.add_argument("--dir", type=Path, default=Path("models"), help="where to put it (default ./models)")
    get.add_argument("--revision", help="the hub commit (40 hex digits) to fetch, over the table's pin")
    get.add_argument("--endpoint", help="hub or mirror base URL (default $HF_ENDPOINT, else https://huggingface.co)")
    get.add_argument("--url", help="download from this plain URL instead (no revision; pinned hashes still apply)")
    get.add_argument("--table", type=Path, help=table_help)
    get.set_defaults(run=_weights_download)
    ver = weights.add_parser(
        "verify", help="hash, manifest record, pinned revision and structure of a file, or of every file of --dir"
    )
    ver.add_argument("file", type=Path, nargs="?")
    ver.add_argument("--dir", type=Path, help="verify every file listed in DIR's supir-weights.json")
    ver.add_argument("--name", help="which table entry it should be (default: by file name)")
    ver.add_argument("--sha256", help="the hash it must have")
    ver.add_argument("--manifest", type=Path, help="the download manifest (default: supir-weights.json beside it)")
    ver.add_argument("--table", type=Path, help=table_help)
    ver.set_defaults(run=_weights_verify)
    cache = weights.add_parser(
        "cache", help="copy the files of a weights directory's manifest to local disk once, checked (node-local cache)"
    )
    cache.add_argument("--from", dest="source", type=Path, required=True, help="the filled weights directory")
    cache.add_argument("--to", type=Path, required=True, help="the node-local cache directory")
    cache.add_argument("--no-rehash", action="store_true", help="trust cached files' records without hashing them")
    cache.set_defaults(run=_weights_cache)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except SupirError as exc:
        print(f"supir: error: {exc.message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
