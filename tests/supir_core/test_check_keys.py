"""`supir weights check-keys`: the real files' key list against the full-size model built on meta."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.paths import MANIFEST


def check_keys(manifest: Path) -> tuple[int, dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "supir_core.cli", "weights", "check-keys", str(manifest)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {"stderr": proc.stderr}


IGNORED_IN_MANIFEST = {
    "denoiser.sigmas",
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
    "conditioner.embedders.1.model.logit_scale",
}


def test_real_manifest_maps_completely() -> None:
    code, report = check_keys(MANIFEST)
    assert code == 0, report
    assert "mapped" not in report
    expected = len(json.loads(MANIFEST.read_text())["keys"])
    assert report["expected"] == expected
    assert set(report["ignored"]) == IGNORED_IN_MANIFEST
    assert report["loaded"] == expected - len(IGNORED_IN_MANIFEST)  # ignored keys fill nothing: not "loaded"
    assert report["missing"] == [] and report["unused"] == [] and report["mismatched"] == []


def test_ignored_keys_are_optional_and_not_loaded(tmp_path: Path) -> None:
    """Without the skipped leftovers the files still fit: "loaded" does not change, "ignored" shrinks."""

    def drop_ignored(keys: dict) -> None:
        for key in IGNORED_IN_MANIFEST:
            del keys[key]

    code, report = check_keys(_edited_manifest(tmp_path, drop_ignored))
    assert code == 0, report
    assert report["ignored"] == []
    assert report["loaded"] == report["expected"] == len(json.loads(MANIFEST.read_text())["keys"]) - 3


def _edited_manifest(tmp_path: Path, edit) -> Path:
    manifest = json.loads(MANIFEST.read_text())
    edit(manifest["keys"])
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"keys": manifest["keys"]}))
    return path


def test_a_missing_key_is_named(tmp_path: Path) -> None:
    gone = "model.control_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    code, report = check_keys(_edited_manifest(tmp_path, lambda keys: keys.pop(gone)))
    assert code == 1
    assert report["missing"] == ["adaptor.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"]


def test_an_extra_key_is_named(tmp_path: Path) -> None:
    extra = "model.diffusion_model.project_modules.12.zero_conv.weight"
    code, report = check_keys(_edited_manifest(tmp_path, lambda keys: keys.update({extra: [1280, 1280, 1, 1]})))
    assert code == 1
    assert report["unused"] == [extra]


def test_a_wrong_shape_is_named(tmp_path: Path) -> None:
    key = "model.diffusion_model.project_modules.7.attn.to_k.weight"
    code, report = check_keys(_edited_manifest(tmp_path, lambda keys: keys.update({key: [1280, 320]})))
    assert code == 1
    assert len(report["mismatched"]) == 1 and report["mismatched"][0].startswith(key)


def test_full_size_parameter_counts_match_the_spec() -> None:
    """Spec §1.1/§1.7 counts, from the model built on meta with sizes read from the manifest."""
    from supir_core.checkpoints import TensorSource, build_empty, spec_from_checkpoint

    keys = json.loads(MANIFEST.read_text())["keys"]
    model = build_empty(spec_from_checkpoint(TensorSource.from_shapes("manifest", keys)))

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert count(model.unet.base) == 2_567_463_684
    assert count(model.unet.project_modules) == 54_797_440
    assert count(model.adaptor) == 1_243_378_880
    assert count(model.vae.robust_encoder) == 34_163_592
    per_connector = [count(m) for m in model.unet.project_modules]
    assert per_connector == [
        1_948_608, 1_948_608, 2_687_168, 1_231_360, 2_687_168, 4_101_888,
        5_579_008, 4_920_320, 5_579_008, 9_022_848, 9_022_848, 6_068_608,
    ]  # fmt: skip
