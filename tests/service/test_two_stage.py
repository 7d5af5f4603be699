"""The official demo's two-stage loop through the API: a preview job (stage 1 and its caption), the caption
corrected by a person, then a job from that preview's stage 1 with the corrected text: stage 1 is not run again,
and the image is exactly what a single job with that text and seed gives."""

from __future__ import annotations

import json
from pathlib import Path

from tests.paths import DATA
from tests.servers import running, wait_for_status

PHOTO = ("cat.jpg", (DATA / "chelsea_degraded.jpg").read_bytes(), "image/jpeg")


def test_preview_correct_the_caption_then_restore(tmp_path: Path, fixture_a: Path, tiny_llava: Path) -> None:
    settings = {"llava_model": tiny_llava, "llava_max_new_tokens": 8}
    with running(tmp_path, fixture_a, {"alice": {}, "bob": {}}, **settings) as svc, svc.client("alice") as client:
        params = {"min_size": 64, "upscale": 2, "steps": 3, "caption": "auto"}
        fields = {"params": json.dumps(params), "preview": "true"}
        preview = client.post("/v1/jobs", files={"image": PHOTO}, data=fields)
        assert preview.status_code == 202, preview.text
        shown = wait_for_status(client, preview.json()["id"], {"succeeded", "failed"}, timeout=120)
        assert shown["status"] == "succeeded", shown["error"]
        assert shown["kind"] == "preview" and shown["caption"]  # what the captioner said
        assert set(shown["seconds"]) >= {"stage1", "caption"} and "sampling" not in shown["seconds"]
        # the stage-1 image, at the processing size: 2 × 150×113, sides rounded to multiples of 64
        assert (shown["result"]["width"], shown["result"]["height"]) == (320, 256)
        assert client.get(f"/v1/jobs/{shown['id']}/result").content[:8] == b"\x89PNG\r\n\x1a\n"

        corrected = {"steps": 3, "seed": 7, "caption": "none", "prompt": "my grandmother's cat on a rug"}
        second = client.post(f"/v1/jobs/{shown['id']}/restore", json={"params": corrected})
        assert second.status_code == 202, second.text
        restored = wait_for_status(client, second.json()["id"], {"succeeded", "failed"}, timeout=120)
        assert restored["status"] == "succeeded", restored["error"]
        assert restored["stage1_job"] == shown["id"] and "stage1" not in restored["seconds"]
        assert restored["params"]["upscale"] == 2 and restored["params"]["min_size"] == 64  # the preview's size
        assert restored["positive_prompt"].startswith("my grandmother's cat on a rug")

        single = client.post(
            "/v1/jobs", files={"image": PHOTO}, data={"params": json.dumps({**corrected, "min_size": 64, "upscale": 2})}
        )
        once = wait_for_status(client, single.json()["id"], {"succeeded", "failed"}, timeout=120)
        assert "stage1" in once["seconds"]
        two_steps = client.get(f"/v1/jobs/{restored['id']}/result").content
        assert two_steps == client.get(f"/v1/jobs/{once['id']}/result").content

        # mistakes are named: another size, a job that is no preview, someone else's preview, another photo
        other_size = client.post(f"/v1/jobs/{shown['id']}/restore", json={"params": {"upscale": 1}})
        assert other_size.status_code == 422 and other_size.json()["error"]["field"] == "params.upscale"
        not_preview = client.post(f"/v1/jobs/{once['id']}/restore")
        assert not_preview.status_code == 409 and not_preview.json()["error"]["code"] == "stage1_unavailable"
        with svc.client("bob") as bob:
            assert bob.post(f"/v1/jobs/{shown['id']}/restore").status_code == 404
        photo = client.post(f"/v1/jobs/{shown['id']}/restore", json={"image_url": "https://example.com/a.png"})
        assert photo.status_code == 400 and photo.json()["error"]["field"] == "image_url"
