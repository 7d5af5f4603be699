"""The job as the API shows it (api.models.Job.from_record through Services.view): the record's fields by name,
the derived ones, never the record's private ones, and the document's Job naming each key the view sends."""

from __future__ import annotations

from typing import Any

from api.models import Job
from api.services import Services
from jobs.record import Face, Faces, JobError, JobProgress, JobRecord, JobResult, Tiling, WebhookState
from jobs.settings import Settings
from supir_core.params import validate_params

PARAMS = validate_params({"seed": 5}).model_dump()
FIRST = JobResult(key="results/a.png", width=10, height=20, bytes=300, seed=5)
SECOND = JobResult(key="results/a-1.webp", width=10, height=20, bytes=300, content_type="image/webp", seed=6)


class Redis:
    def get(self, key: str) -> None:
        return None  # no rates measured yet


class Store:
    r, p = Redis(), "test"

    def queue_position(self, job_id: str, variant: str | None, owner: str | None = None) -> int:
        return 3

    def running_count(self, variant: str | None) -> int:
        return 1

    def worker_beats(self) -> dict:
        return {}  # no worker ready: a queued job has no expected start

    def cancel_requested(self, job_id: str) -> bool:
        return True


class Objects:
    def url(self, key: str, ttl: int) -> str:
        return f"https://signed.example/{key}"


def view(record: JobRecord) -> dict[str, Any]:
    services = Services(Settings(), Store(), Objects(), lambda job_id, variant: None)  # type: ignore[arg-type]
    return services.view(record)


def test_a_finished_job_shows_its_record_and_links_to_its_results() -> None:
    record = JobRecord(
        owner="alice",
        worker="host:1",
        params=PARAMS,
        status="succeeded",
        result=FIRST,
        results=[FIRST, SECOND],
        input_key="inputs/x",
        input_width=4,
        input_height=5,
        input_content_type="image/jpeg",
        webhook=WebhookState(url="https://h.example", events=["started", "completed"], state="delivered"),
        seconds={"stage1": 1.5},
        caption="a cat",
        model_sha256="ab",
        gpu_seconds=2.5,
    )
    shown = view(record)
    assert set(shown) == set(Job.model_fields)  # every key the document names, and only those
    assert not {"owner", "worker", "input_key", "request_hash", "lost", "model_id"} & set(shown)
    assert shown["input"] == {"width": 4, "height": 5, "content_type": "image/jpeg"}
    assert [r["url"] for r in shown["results"]] == [
        "https://signed.example/results/a.png",
        "https://signed.example/results/a-1.webp",
    ]
    assert shown["result"] == shown["results"][0] and "key" not in shown["result"]
    assert shown["results"][1] == {
        "width": 10, "height": 20, "bytes": 300, "content_type": "image/webp", "seed": 6,
        "url": "https://signed.example/results/a-1.webp",
    }  # fmt: skip
    assert (shown["caption"], shown["model_sha256"], shown["gpu_seconds"]) == ("a cat", "ab", 2.5)
    assert shown["webhook"] == {
        "url": "https://h.example", "events": ["started", "completed"], "state": "delivered", "attempts": 0,
        "last_status": None, "last_error": None,
    }  # fmt: skip
    assert shown["queue_position"] is None and shown["cancel_requested"] is False
    assert shown["variant"] is None  # "" in a record from before variants
    Job.model_validate(shown)


def test_an_active_job_shows_its_queue_position_and_cancel_and_no_results() -> None:
    queued = view(JobRecord(owner="alice", params=PARAMS, variant="v0Q", result=FIRST))
    assert (queued["queue_position"], queued["cancel_requested"], queued["variant"]) == (3, True, "v0Q")
    assert queued["result"] is None and queued["results"] == []  # a result appears only once it has succeeded
    running = view(JobRecord(owner="a", params=PARAMS, status="running", progress=JobProgress(stage="sampling")))
    assert running["progress"] == {"stage": "sampling", "step": 0, "steps": 0} and running["queue_position"] is None


def test_a_failed_job_shows_its_error_and_an_older_record_its_params_as_stored() -> None:
    record = JobRecord(owner="a", params={"steps": 3}, status="failed", error=JobError(code="time_limit", message="m"))
    shown = view(record)
    assert shown["error"] == {"code": "time_limit", "message": "m"} and shown["params"] == {"steps": 3}


def test_a_field_the_record_and_the_job_share_needs_no_mapping() -> None:
    """Job.from_record copies every field declared on both by name: the view lists none of them by hand."""
    shared = set(Job.model_fields) & set(JobRecord.model_fields)
    assert {"caption", "cached_from", "gpu_seconds", "stage1_job", "kind"} <= shared
    record = JobRecord(owner="a", params=PARAMS, cached=True, cached_from="job_1", kind="preview", stage1_job="job_0")
    job = Job.from_record(record, queue_position=None, cancel_requested=False, results=[], retention_s=60)
    assert (job.cached, job.cached_from, job.kind, job.stage1_job) == (True, "job_1", "preview", "job_0")


def test_the_document_marks_every_key_the_view_sends_required() -> None:
    """The view sends every key (null where it has none): a generated client may rely on each one."""
    schema = Job.model_json_schema(mode="serialization")
    shown = {"Job": schema, **{k: v for k, v in schema["$defs"].items() if k != "RestoreParams"}}
    assert set(shown) == {
        "Job", "Progress", "InputImage", "JobErrorInfo", "JobResultInfo", "Webhook", "TilingInfo", "FacesInfo", "Face",
    }  # fmt: skip
    for name, model in shown.items():
        assert set(model["required"]) == set(model["properties"]), name


TILING = Tiling(
    policy="auto",
    sampling="untiled",
    vae="tiled",
    reason="planned 3.10 GB of activations (decode) exceeds 2.00 GB (total RAM less the loaded models)",
    planned_gb={"stage1": 3.1, "sampling": 1.2, "decode": 3.1},
    budget_gb=2.0,
    budget_inputs={"total_gb": 8.0, "models_gb": 5.0, "margin_gb": 1.0},
)
FACES = Faces(
    policy="auto",
    detector="haar",
    face_size=512,
    restored_size=512,
    faces=[Face(box=[10, 12, 46, 48], region=[20, 24, 92, 96], restored=True, seconds=1.25)],
    seconds={"detect": 0.1, "restore": 1.25, "blend": 0.02},
)


def test_a_restoration_shows_how_it_was_tiled_and_the_faces_it_restored() -> None:
    record = JobRecord(owner="a", params=PARAMS, status="succeeded", tiling=TILING, faces=FACES)
    shown = view(record)
    assert shown["tiling"] == TILING.model_dump() and shown["tiling"]["vae"] == "tiled"
    assert shown["faces"]["faces"] == [{"box": [10, 12, 46, 48], "region": [20, 24, 92, 96], "restored": True,
                                        "seconds": 1.25}]  # fmt: skip
    Job.model_validate(shown)
    stored = JobRecord.model_validate_json(record.model_dump_json())  # as Redis keeps it
    assert stored.tiling == TILING and stored.faces == FACES


def test_a_preview_or_an_older_record_shows_no_tiling_and_no_faces() -> None:
    older = {"owner": "a", "params": PARAMS, "status": "succeeded"}  # written before either was kept
    shown = view(JobRecord.model_validate(older))
    assert shown["tiling"] is None and shown["faces"] is None
    schema = Job.model_json_schema(mode="serialization")
    for name in ("tiling", "faces"):
        assert "description" in schema["properties"][name], name
    described = schema["$defs"]["TilingInfo"]["properties"]
    assert all(field.get("description") for field in described.values()), described
