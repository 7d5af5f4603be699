"""The create bodies (api.models' JobUpload, JobFromUrl, RestoreFromPreview) as api.creation reads them: a form
and its JSON twin give the same validated request, and every refusal keeps its stable code and field. Runs the
real request reading (Starlette's form parser, the JSON limits) in a small app, without Redis or a worker."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from api import errors
from api.creation import read_job_request
from api.models import JobFromUrl, JobUpload, RestoreFromPreview, body_schema
from jobs.settings import Settings

URL = "https://example.com/a.png"
HOOK = "https://example.com/hook"
PREVIEW_ID = "job_" + "0" * 32
SETTINGS = Settings(default_params={"min_size": 256, "steps": 12})


def make_app() -> FastAPI:
    app = FastAPI()
    errors.install(app)

    async def answer(request: Request, stage1_job: str | None = None) -> dict[str, Any]:
        job = await read_job_request(request, SETTINGS, stage1_job)
        return {
            "params": job.params.model_dump(mode="json"),
            "raw_params": job.raw_params,
            "preset": job.preset,
            "image": hashlib.sha256(job.image).hexdigest() if job.image is not None else None,
            "declared_type": job.declared_type,
            "image_url": job.image_url,
            "webhook_url": job.webhook_url,
            "webhook_events": list(job.webhook_events),
            "preview": job.preview,
            "stage1_job": job.stage1_job,
            "variant": job.variant,
        }

    @app.post("/v1/jobs")
    async def create(request: Request) -> dict[str, Any]:
        return await answer(request)

    @app.post("/v1/jobs/{job_id}/restore")
    async def from_preview(job_id: str, request: Request) -> dict[str, Any]:
        return await answer(request, job_id)

    return app


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(make_app())


def refusal(response: Any) -> tuple[int, str, str | None]:
    error = response.json()["error"]
    return response.status_code, error["code"], error["field"]


def test_a_form_and_its_json_twin_give_the_same_request(client: TestClient) -> None:
    params = {"steps": 3, "seed": 7}
    form = {
        "image_url": URL,
        "params": json.dumps(params),
        "preset": "lightning",
        "webhook_url": HOOK,
        "webhook_events": "completed, started",  # a comma list
        "preview": "TRUE",
        "variant": "v0Q",
    }
    body = {**form, "params": params, "webhook_events": ["completed", "started"], "preview": True}
    from_form = client.post("/v1/jobs", data=form)
    from_json = client.post("/v1/jobs", json=body)
    assert from_form.status_code == from_json.status_code == 200, from_form.text + from_json.text
    assert from_form.json() == from_json.json()
    job = from_json.json()
    assert job["webhook_events"] == ["started", "completed"]  # a fixed order
    assert job["params"]["steps"] == 3 and job["params"]["min_size"] == 256  # the deployment's default
    assert job["preview"] is True and job["image"] is None


def test_an_upload_gives_the_request_of_its_url_twin_but_the_photo(client: TestClient) -> None:
    fields = {"params": json.dumps({"seed": 1}), "webhook_url": HOOK, "webhook_events": '["progress", "progress"]'}
    upload = client.post("/v1/jobs", data=fields, files={"image": ("a.png", b"\x89PNG-bytes", "image/png")})
    twin = client.post(
        "/v1/jobs", json={**fields, "image_url": URL, "params": {"seed": 1}, "webhook_events": ["progress"]}
    )
    assert upload.status_code == twin.status_code == 200, upload.text + twin.text
    uploaded = upload.json()
    assert uploaded["image"] == hashlib.sha256(b"\x89PNG-bytes").hexdigest()
    assert uploaded["declared_type"] == "image/png" and uploaded["webhook_events"] == ["progress"]
    differs = {"image", "declared_type", "image_url"}
    assert {k: v for k, v in uploaded.items() if k not in differs} == {
        k: v for k, v in twin.json().items() if k not in differs
    }


def test_defaults_sit_below_the_preset_and_null_means_absent(client: TestClient) -> None:
    job = client.post(
        "/v1/jobs",
        json={"image_url": URL, "preset": "lightning", "webhook_url": None, "params": None, "variant": None},
    ).json()
    assert job["params"]["steps"] == 8  # the preset's, over the deployment's 12
    assert job["webhook_url"] is None and job["webhook_events"] == ["completed"]
    assert job["variant"] == SETTINGS.default_variant and job["raw_params"] == {}


def test_restore_from_a_preview_takes_the_path_s_job_and_no_photo(client: TestClient) -> None:
    job = client.post(f"/v1/jobs/{PREVIEW_ID}/restore", json={"params": {"prompt": "a cat"}}).json()
    assert job["stage1_job"] == PREVIEW_ID and job["image_url"] is None and job["variant"] is None
    assert client.post(f"/v1/jobs/{PREVIEW_ID}/restore").status_code == 200  # no body at all
    assert refusal(client.post("/v1/jobs/nope/restore", json={})) == (404, "not_found", None)


LONG_URL = "https://example.com/" + "a" * 8200
# (request, the status, code and field the API answers)
REFUSALS = [
    ({"json": {"image_url": URL, "colour": "red"}}, 400, "invalid_request", "colour"),
    ({"json": {"image_url": URL, "stage1_job": PREVIEW_ID}}, 400, "invalid_request", "stage1_job"),
    ({"data": {"image_url": URL, "stage1_job": PREVIEW_ID}}, 400, "invalid_request", "stage1_job"),
    ({"json": {}}, 400, "missing_image", "image"),
    ({"json": {"image_url": None}}, 400, "missing_image", "image"),
    ({"json": {"image_url": ""}}, 400, "missing_image", "image"),
    ({"data": {"preset": "quality"}}, 400, "missing_image", "image"),
    ({"data": {"image_url": URL}, "files": {"image": ("a.png", b"x", "image/png")}}, 400,
     "conflicting_image_sources", "image_url"),
    ({"json": {"image_url": 5}}, 400, "invalid_url", "image_url"),
    ({"json": {"image_url": "ftp://example.com/a.png"}}, 400, "invalid_url", "image_url"),
    ({"json": {"image_url": "http://["}}, 400, "invalid_url", "image_url"),
    ({"json": {"image_url": "https:///path-only"}}, 400, "invalid_url", "image_url"),
    ({"json": {"image_url": LONG_URL}}, 400, "invalid_url", "image_url"),
    ({"json": {"image_url": URL, "webhook_url": 7}}, 400, "invalid_webhook_url", "webhook_url"),
    ({"json": {"image_url": URL, "webhook_url": "mailto:ops@example.com"}}, 400, "invalid_webhook_url",
     "webhook_url"),
    ({"json": {"image_url": URL, "preset": ["quality"]}}, 422, "invalid_parameter", "preset"),
    ({"json": {"image_url": URL, "preset": "turbo"}}, 422, "invalid_parameter", "preset"),
    ({"json": {"image_url": URL, "params": [1]}}, 400, "invalid_request", "params"),
    ({"data": {"image_url": URL, "params": "[1]"}}, 400, "invalid_request", "params"),
    ({"data": {"image_url": URL, "params": "{steps: 3"}}, 400, "invalid_json", "params"),
    ({"json": {"image_url": URL, "params": {"seed": True}}}, 422, "invalid_parameter", "params.seed"),
    ({"json": {"image_url": URL, "params": {"steps": "5"}}}, 422, "invalid_parameter", "params.steps"),
    ({"json": {"image_url": URL, "params": {"strength": 2}}}, 422, "unknown_parameter", "params.strength"),
    ({"json": {"image_url": URL, "variant": 3}}, 400, "invalid_request", "variant"),
    ({"json": {"image_url": URL, "variant": "no such/name"}}, 422, "variant_unavailable", "variant"),
    ({"json": {"image_url": URL, "variant": "v0F"}}, 422, "variant_unavailable", "variant"),
    ({"json": {"image_url": URL, "preview": "true"}}, 400, "invalid_request", "preview"),
    ({"data": {"image_url": URL, "preview": "maybe"}}, 400, "invalid_request", "preview"),
    ({"json": {"image_url": URL, "webhook_events": ["started"]}}, 400, "invalid_request", "webhook_events"),
    ({"json": {"image_url": URL, "webhook_url": None, "webhook_events": ["started"]}}, 400, "invalid_request",
     "webhook_events"),
    ({"json": {"image_url": URL, "webhook_url": HOOK, "webhook_events": []}}, 400, "invalid_request",
     "webhook_events"),
    ({"json": {"image_url": URL, "webhook_url": HOOK, "webhook_events": "started"}}, 400, "invalid_request",
     "webhook_events"),
    ({"json": {"image_url": URL, "webhook_url": HOOK, "webhook_events": ["finished"]}}, 400, "invalid_request",
     "webhook_events"),
    ({"json": [URL]}, 400, "invalid_json", None),
    ({"content": b"x", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type", None),
]  # fmt: skip


@pytest.mark.parametrize(("request_args", "status", "code", "field"), REFUSALS, ids=[str(r[0])[:60] for r in REFUSALS])
def test_each_refusal_keeps_its_code_and_field(
    client: TestClient, request_args: dict, status: int, code: str, field: str | None
) -> None:
    assert refusal(client.post("/v1/jobs", **request_args)) == (status, code, field)


def test_the_messages_say_what_is_wrong(client: TestClient) -> None:
    def message(body: dict) -> str:
        return str(client.post("/v1/jobs", json={"image_url": URL, **body}).json()["error"]["message"])

    assert message({"colour": "red"}) == "unknown field 'colour'"
    assert message({"webhook_url": 7}) == "webhook_url must be a string"
    assert message({"webhook_url": "ftp://x"}) == "webhook_url must be an http or https URL"
    assert (
        message({"preset": "turbo"})
        == "preset='turbo' is unknown: choose one of quality, fidelity, lightning, portrait"
    )
    assert message({"webhook_events": ["started"]}) == "webhook_events needs a webhook_url"
    assert message({"webhook_url": HOOK, "webhook_events": ["finished"]}) == (
        "unknown webhook event 'finished'; choose from started, progress, completed"
    )
    assert "is not served here; choose one of v0Q" in message({"variant": "no such/name"})


def test_one_fault_of_several_in_the_api_s_order(client: TestClient) -> None:
    """Unknown fields first (alphabetically), then wrong JSON types, then wrong values."""
    both = {"image_url": "ftp://x", "preset": 5, "zebra": 1, "colour": 2}
    assert refusal(client.post("/v1/jobs", json=both)) == (400, "invalid_request", "colour")
    del both["zebra"], both["colour"]
    assert refusal(client.post("/v1/jobs", json=both)) == (422, "invalid_parameter", "preset")


def test_restore_from_a_preview_refuses_a_photo_of_its_own(client: TestClient) -> None:
    for name, value in (("image_url", URL), ("preview", True), ("stage1_job", PREVIEW_ID)):
        answered = client.post(f"/v1/jobs/{PREVIEW_ID}/restore", json={name: value})
        assert refusal(answered) == (400, "invalid_request", name)


def test_the_request_bodies_document_what_the_models_accept() -> None:
    upload, from_url, from_preview = (body_schema(m) for m in (JobUpload, JobFromUrl, RestoreFromPreview))
    assert (upload["title"], upload["required"], from_url["required"]) == ("JobUpload", ["image"], ["image_url"])
    assert upload["properties"]["image"] == {
        "type": "string",
        "format": "binary",
        "description": "PNG, JPEG, WebP, TIFF, BMP, GIF",
    }
    for schema in (upload, from_url, from_preview):
        assert schema["additionalProperties"] is False
        assert schema["properties"]["params"] == {"$ref": "#/components/schemas/RestoreParams"}
        assert schema["properties"]["preset"]["enum"] == ["quality", "fidelity", "lightning", "portrait"]
        assert schema["properties"]["webhook_events"]["minItems"] == 1
        assert schema["dependentSchemas"]["webhook_events"]["required"] == ["webhook_url"]
    assert upload["properties"]["webhook_url"]["type"] == "string"  # a form has no null
    assert from_url["properties"]["webhook_url"]["type"] == ["string", "null"]  # JSON null: no webhook
    assert from_url["properties"]["image_url"]["maxLength"] == 8192
    assert "image_url" not in from_preview["properties"] and "preview" not in from_preview["properties"]
