"""supir_client's batches against the live service: a folder uploaded directly and restored as one batch (progress,
results saved and zipped, the signed batch.completed webhook), the lower-level batch calls, the CLI and the
README's example."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image
from supir_client import Batch, BatchDeleted, Client, InvalidSignature, WaitTimeout
from supir_client.webhooks import verify

from tests.client.conftest import Hooks, Recording
from tests.paths import DATA, REPO
from tests.servers import BIN, FAST, SLOW, WEBHOOK_SECRET, Service, wait_until

PHOTOS = ("astronaut_small.jpg", "chelsea_degraded.jpg", "coffee_rgba.png")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in PHOTOS:
        shutil.copy(DATA / name, photos / name)
    (photos / "notes.txt").write_text("not a photo: left out")
    return photos


def test_a_folder_is_uploaded_restored_as_one_batch_and_saved(
    client_service: Service, folder: Path, tmp_path: Path, hooks: Hooks
) -> None:
    sent = Recording()
    seen: list[Batch] = []
    with Client(client_service.url, client_service.keys["fay"], transport=sent) as client:
        result = client.batch(
            folder, on_progress=seen.append, poll_interval=0.5, zip_to=tmp_path / "zips", webhook_url=hooks.url, **FAST
        )
        batch = result.batch
        assert batch.ended and batch.total == 3 and batch.counts.succeeded == 3 and batch.progress == 1.0
        assert seen[-1] == batch and all(not view.ended for view in seen[:-1])
        assert [view.counts.ended for view in seen] == sorted(view.counts.ended for view in seen)

        # one batch of direct uploads, the shared parameters only as given
        (body,) = sent.bodies("POST", "/v1/batches")
        assert body["params"] == FAST and set(body) == {"items", "params", "webhook_url"}
        assert all(set(item) == {"upload_id"} and item["upload_id"].startswith("upl_") for item in body["items"])
        assert [p.name for p in result.sources.values()] == sorted(PHOTOS)  # job_ids are in item order

        saved = result.save(tmp_path / "out")
        assert sorted(p.name for p in saved) == ["astronaut_small.png", "chelsea_degraded.png", "coffee_rgba.png"]
        for job in result.jobs():
            assert job.batch_id == batch.id
            path = tmp_path / "out" / (result.sources[job.id].stem + ".png")
            with Image.open(path) as image:
                assert image.size == (job.results[0].width, job.results[0].height)
        assert result.failed() == []

        assert result.zip_path == tmp_path / "zips" / f"{batch.id}.zip"
        with zipfile.ZipFile(result.zip_path) as archive:
            images = [name for name in archive.namelist() if name != "manifest.json"]
            assert len(images) == 3 and "manifest.json" in archive.namelist()
            for name in images:
                with Image.open(io.BytesIO(archive.read(name))) as image:
                    image.verify()
        assert not [p for p in (tmp_path / "zips").iterdir() if p.name.endswith(".part")]
        named = client.download_batch_zip(batch.id, tmp_path / "named.zip")
        with zipfile.ZipFile(named) as again, zipfile.ZipFile(result.zip_path) as first:  # made anew: other times
            assert {n: again.read(n) for n in again.namelist()} == {n: first.read(n) for n in first.namelist()}

    # one signed batch.completed webhook, the batch's view in it
    headers, raw = wait_until(lambda: hooks.received and hooks.received[0], 60, 0.1, "the batch's webhook")
    event = verify(raw, headers, WEBHOOK_SECRET)
    assert event.name == "batch.completed" and event.batch is not None and event.job is None
    assert event.batch.id == batch.id and event.batch.ended and event.batch.counts.succeeded == 3
    assert event.batch.job_ids == batch.job_ids
    with pytest.raises(InvalidSignature):
        verify(raw.replace(b'"succeeded":3', b'"succeeded":2'), headers, WEBHOOK_SECRET)


def test_batch_calls_replay_page_cancel_and_delete(client_service: Service) -> None:
    with Client(client_service.url, client_service.keys["gus"]) as client:
        uploads = [client.upload(DATA / name) for name in PHOTOS[:2]]
        made = client.create_batch(uploads, params=SLOW, idempotency_key="batch-once")
        assert made.id.startswith("bat_") and made.total == 2 and len(made.job_ids) == 2 and not made.ended
        again = client.create_batch(uploads, params=SLOW, idempotency_key="batch-once")
        assert again.id == made.id  # the replay: the same batch

        page = client.batch_jobs(made.id, limit=1)
        assert [j.id for j in page.jobs] == [made.job_ids[0]] and page.next_cursor == 1
        assert [j.id for j in client.iter_batch_jobs(made.id)] == list(made.job_ids)
        with pytest.raises(WaitTimeout) as running_still:
            client.wait_batch(made.id, timeout=0.5, poll_interval=0.2)
        assert running_still.value.batch is not None and running_still.value.batch.id == made.id

        client.cancel_batch(made.id)
        ended = client.wait_batch(made.id, timeout=120, poll_interval=0.5)
        assert ended.counts.canceled == 2 and ended.ended
        assert [j.status for j in client.iter_batch_jobs(made.id, status="canceled")] == ["canceled", "canceled"]

        client.delete_batch(made.id)
        client.delete_batch(made.id)  # idempotent
        with pytest.raises(BatchDeleted) as deleted:
            client.get_batch(made.id)
        assert deleted.value.status == 410 and deleted.value.code == "batch_deleted"


def test_the_cli_restores_a_folder_with_a_progress_line(client_service: Service, folder: Path, tmp_path: Path) -> None:
    env = {**os.environ, "SUPIR_URL": client_service.url, "SUPIR_API_KEY": client_service.keys["hal"]}
    params = [arg for name, value in FAST.items() for arg in ("--param", f"{name}={value}")]
    done = subprocess.run(
        [str(BIN / "supir-client"), "batch", str(folder), "-o", str(tmp_path / "out"), *params],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(Path(line).name for line in done.stdout.split()) == sorted(Path(p).stem + ".png" for p in PHOTOS)
    assert "3/3 ended (3 succeeded, 0 failed, 0 canceled) 100%" in done.stderr


def test_the_readmes_folder_example_runs_as_written(client_service: Service, folder: Path, tmp_path: Path) -> None:
    readme = (REPO / "clients" / "python" / "README.md").read_text()
    example = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)[1]
    assert "client.batch(" in example
    shutil.copytree(folder, tmp_path / "scans")
    env = {**os.environ, "SUPIR_URL": client_service.url, "SUPIR_API_KEY": client_service.keys["ida"]}
    done = subprocess.run(
        [sys.executable, "-c", "from supir_client import Client\n" + example],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "3/3 done, 100%" in done.stdout.splitlines()[-1]
    assert sorted(p.name for p in (tmp_path / "restored").iterdir()) == sorted(Path(p).stem + ".png" for p in PHOTOS)
    assert len(list((tmp_path / "out").glob("bat_*.zip"))) == 1
