"""What a restoration says of how it ran, through the real service (uvicorn, Celery, Redis, the tiny model): the
faces it restored again (params.faces=auto) with their boxes and the `faces` stage, and its tiling decision."""

from __future__ import annotations

import httpx

from tests.servers import Service, submit, wait_for_status
from tests.service.test_service import sse_events

PORTRAIT = "astronaut_small.jpg"  # 200×200, one face about 36 px across
FACES = {"faces": "auto", "steps": 2, "min_size": 256, "face_size": 256, "seed": 3}


def test_faces_auto_lists_the_face_found_and_reports_its_stage(service: Service) -> None:
    with service.client("alice") as client:
        created = submit(client, FACES, PORTRAIT)
        assert created.status_code == 202, created.text
        events = sse_events(client, created.json()["id"])
        job = client.get(f"/v1/jobs/{created.json()['id']}").json()
    assert job["status"] == "succeeded", job["error"]
    stages = [e["progress"]["stage"] for e in events]
    assert "faces" in stages and stages.index("faces") > stages.index("sampling"), stages
    face_progress = [e["progress"] for e in events if e["progress"]["stage"] == "faces"]
    assert all(p["step"] <= p["steps"] for p in face_progress), face_progress
    faces = job["faces"]
    assert faces["policy"] == "auto" and faces["face_size"] == 256 and faces["detector"]
    assert len(faces["faces"]) == 1, faces  # the astronaut's
    face = faces["faces"][0]
    x0, y0, x1, y1 = face["box"]
    assert 0 <= x0 < x1 <= job["input"]["width"] and 0 <= y0 < y1 <= job["input"]["height"], face
    rx0, ry0, rx1, ry1 = face["region"]
    assert 0 <= rx0 < rx1 <= job["result"]["width"] and 0 <= ry0 < ry1 <= job["result"]["height"], face
    assert face["restored"] and face["seconds"] >= 0
    assert set(faces["seconds"]) == {"detect", "restore", "blend"}
    assert "faces" in job["seconds"]


def test_a_restoration_says_how_it_was_tiled_and_why(service: Service) -> None:
    """Defaults but a tile smaller than the latent, so tiling=auto plans the run against the memory budget."""
    params = {"min_size": 320, "steps": 2, "tile_size": 32, "tile_stride": 16, "seed": 4}
    with service.client("alice") as client:
        created = submit(client, params)
        assert created.status_code == 202, created.text
        job = wait_for_status(client, created.json()["id"], {"succeeded", "failed"}, timeout=180)
    assert job["status"] == "succeeded", job["error"]
    tiling = job["tiling"]
    assert tiling["policy"] == "auto" and {tiling["sampling"], tiling["vae"]} <= {"tiled", "untiled"}
    assert "GB" in tiling["reason"] and tiling["budget_gb"] > 0, tiling
    assert set(tiling["budget_inputs"]) == {"total_gb", "models_gb", "margin_gb"}, tiling
    assert set(tiling["planned_gb"]) == {"stage1", "sampling", "decode"}, tiling
    assert job["faces"] is None  # faces is off by default


def test_a_preview_has_no_tiling_and_no_faces(service: Service) -> None:
    with service.client("alice") as client:
        created = submit(client, FACES, PORTRAIT, preview="true")
        assert created.status_code == 202, created.text
        job = wait_for_status(client, created.json()["id"], {"succeeded", "failed"}, timeout=120)
    assert job["status"] == "succeeded" and job["kind"] == "preview", job["error"]
    assert job["tiling"] is None and job["faces"] is None


def test_the_document_describes_tiling_and_faces(service: Service) -> None:
    schemas = httpx.get(f"{service.url}/openapi.json").json()["components"]["schemas"]
    job = schemas["Job"]["properties"]
    assert job["tiling"]["description"] and job["faces"]["description"]
    assert "portrait" in schemas["RestoreParams"]["x-presets"]
    face = schemas["Face"]["properties"]
    assert "input" in face["box"]["description"] and "output" in face["region"]["description"]
