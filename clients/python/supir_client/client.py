"""The client: typed calls for each route, and `restore()` / `batch()`, which do a whole round trip (direct upload,
create, wait, download)."""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import IO, Any

import httpx

from . import _sse
from ._http import Http
from .errors import ApiError, JobCanceled, JobFailed, SupirError, WaitTimeout
from .models import Batch, Estimate, Job, JobList, UploadTarget, Usage

__version__ = "0.1.0"
DEFAULT_URL = "http://127.0.0.1:8000"  # `make serve`
MAX_PREFER_WAIT_S = 60  # the service's cap on `Prefer: wait` (SUPIR_MAX_PREFER_WAIT_S, default 60)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"})
ImageSource = str | os.PathLike[str] | bytes | IO[bytes]


def sniff_content_type(data: bytes) -> str:
    """The photo's media type from its first bytes (what the service checks too): one it accepts, or ValueError."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    if data.startswith(b"BM"):
        return "image/bmp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    raise ValueError("not a PNG, JPEG, WebP, TIFF, BMP or GIF image (the types the service accepts)")


def _read_image(image: ImageSource) -> tuple[bytes, str | None]:
    """The bytes and, for a file, its name."""
    if isinstance(image, bytes | bytearray):
        return bytes(image), None
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        return path.read_bytes(), path.name
    return image.read(), Path(str(getattr(image, "name", ""))).name or None


def _only_set(**fields: Any) -> dict[str, Any]:
    """The fields the caller gave: None means "not said", so the service's own defaults apply."""
    return {k: v for k, v in fields.items() if v is not None}


@dataclass
class Restoration:
    """A job and its downloaded samples (one image per `params.num_samples`, in order)."""

    job: Job
    samples: list[bytes] = field(default_factory=list)
    name: str | None = None  # the photo's file name, when restore() was given a path

    def save(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Write each sample to `directory` (made if missing) as `<photo's name>.<ext>`, the second sample
        `<name>-1.<ext>` and so on; the job's id names them when the photo had no file name."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        stem = Path(self.name).stem if self.name else self.job.id
        extension = self.job.result.extension if self.job.result else ".png"
        paths = []
        for index, data in enumerate(self.samples):
            path = out / (f"{stem}{extension}" if index == 0 else f"{stem}-{index}{extension}")
            path.write_bytes(data)
            paths.append(path)
        return paths


@dataclass(frozen=True)
class BatchSample:
    """One image of a batch's results: the job's sample `index`, for the photo at `source`."""

    source: Path | None
    job: Job
    index: int
    data: bytes

    @property
    def filename(self) -> str:
        stem = self.source.stem if self.source else self.job.id
        extension = self.job.result.extension if self.job.result else ".png"
        return f"{stem}{extension}" if self.index == 0 else f"{stem}-{self.index}{extension}"


@dataclass
class BatchResult:
    """An ended batch: its view, which photo each job restored, and where its results.zip went (if asked)."""

    client: Client = field(repr=False)
    batch: Batch
    sources: dict[str, Path]  # job id → the photo it restored
    zip_path: Path | None = None

    def jobs(self) -> list[Job]:
        return list(self.client.iter_batch_jobs(self.batch.id))

    def failed(self) -> list[Job]:
        return [job for job in self.jobs() if job.status != "succeeded"]

    def results(self) -> Iterator[BatchSample]:
        """Every succeeded job's samples, downloaded one at a time."""
        for job in self.jobs():
            if job.status == "succeeded":
                for index in range(job.samples):
                    yield BatchSample(self.sources.get(job.id), job, index, self.client.result(job.id, index))

    def save(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Each succeeded job's samples in `directory`, named after the photos (as Restoration.save)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for sample in self.results():
            path = out / sample.filename
            path.write_bytes(sample.data)
            paths.append(path)
        return paths

    def download_zip(self, dest: str | os.PathLike[str]) -> Path:
        self.zip_path = self.client.download_batch_zip(self.batch.id, dest)
        return self.zip_path


class Client:
    """A supir-serve client. `base_url` and `api_key` default to the SUPIR_URL and SUPIR_API_KEY environment
    variables (a service in dev mode needs no key). Failed tries are retried up to `max_retries` times (connection
    errors, 429, 5xx), each create with one idempotency key, so a retry never makes a second job.

        with Client("https://supir.example.com", "sk_...") as client:
            client.restore("old.jpg", preset="quality", upscale=2).save("restored/")
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 5,
        max_retry_wait_s: float = 120.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        base = base_url or os.environ.get("SUPIR_URL") or DEFAULT_URL
        key = api_key if api_key is not None else os.environ.get("SUPIR_API_KEY") or None
        self._http = Http(
            base,
            key,
            timeout=timeout,
            max_retries=max_retries,
            max_retry_wait_s=max_retry_wait_s,
            transport=transport,
            user_agent=f"supir-client/{__version__}",
        )
        self.base_url = self._http.base_url

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    @property
    def retries(self) -> int:
        """Requests sent again so far (after a connection error, 429 or 5xx)."""
        return self._http.retries

    # --- the whole round trip -------------------------------------------------------------------------------

    def restore(
        self,
        image: ImageSource,
        *,
        params: Mapping[str, Any] | None = None,
        preset: str | None = None,
        variant: str | None = None,
        webhook_url: str | None = None,
        webhook_events: Sequence[str] | None = None,
        expires_after: int | None = None,
        idempotency_key: str | None = None,
        wait: bool = True,
        timeout: float | None = None,
        **more_params: Any,
    ) -> Restoration:
        """Restore one photo (a path, bytes or a binary file): uploaded straight to storage, then one job. Only the
        parameters given here are sent (`params` and keyword arguments, e.g. `upscale=2, seed=7`): the rest are the
        service's, below `preset`. With `wait` (the default), returns once the job has succeeded, every sample
        downloaded; raises JobFailed or JobCanceled if it did not, WaitTimeout after `timeout` seconds."""
        started = time.monotonic()
        data, name = _read_image(image)
        upload = self.upload(data)
        chosen = {**(params or {}), **more_params}
        job = self.create_job(
            upload_id=upload.id,
            params=chosen or None,
            preset=preset,
            variant=variant,
            webhook_url=webhook_url,
            webhook_events=webhook_events,
            expires_after=expires_after,
            idempotency_key=idempotency_key,
            prefer_wait=max(1, min(MAX_PREFER_WAIT_S, timeout or MAX_PREFER_WAIT_S)) if wait else None,
        )
        if not wait:
            return Restoration(job, [], name)
        if not job.terminal:
            job = self.wait(job.id, None if timeout is None else timeout - (time.monotonic() - started))
        return Restoration(job, self.samples(job), name)

    def samples(self, job: Job) -> list[bytes]:
        """Every sample of a succeeded job; JobFailed or JobCanceled for a job that ended otherwise."""
        if job.status == "failed":
            raise JobFailed(job)
        if job.status == "canceled":
            raise JobCanceled(job)
        return [self.result(job.id, index) for index in range(job.samples)]

    def upload(self, image: ImageSource, content_type: str | None = None) -> UploadTarget:
        """Send a photo straight to the service's storage (`POST /v1/uploads`, then the bytes where it says);
        name the returned upload's id as `upload_id` in a job or batch item."""
        data, _ = _read_image(image)
        target = self.create_upload(content_type or sniff_content_type(data), len(data))
        self.send_upload(target, data)
        return target

    # --- jobs ------------------------------------------------------------------------------------------------

    def create_upload(self, content_type: str, size: int, expires_after: int | None = None) -> UploadTarget:
        """Where to send a photo of this type and size; `expires_after`: seconds the upload is kept while no job
        uses it (at most, and by default, the service's upload retention)."""
        body = _only_set(content_type=content_type, size=size, expires_after=expires_after)
        response = self._http.request("POST", "/v1/uploads", json=body)
        return UploadTarget.from_json(response.json())

    def send_upload(self, target: UploadTarget, data: bytes) -> None:
        """The bytes to where `create_upload` said: the API's signed PUT, or an S3 presigned POST (its form
        fields, then the file). Neither takes the API key, and none is sent."""
        if target.method == "PUT":
            self._http.request("PUT", target.url, api=False, content=data, headers=target.headers)
        else:
            file = ("photo", data, target.content_type)
            self._http.request(
                "POST", target.url, api=False, data=target.fields, files={"file": file}, headers=target.headers
            )

    def create_job(
        self,
        *,
        upload_id: str | None = None,
        image_url: str | None = None,
        params: Mapping[str, Any] | None = None,
        preset: str | None = None,
        variant: str | None = None,
        webhook_url: str | None = None,
        webhook_events: Sequence[str] | None = None,
        expires_after: int | None = None,
        preview: bool | None = None,
        idempotency_key: str | None = None,
        prefer_wait: float | None = None,
    ) -> Job:
        """`POST /v1/jobs` (JSON) for an upload or an image URL. One idempotency key (yours, or one made here)
        covers every retry of this call. `prefer_wait` holds the request until the job ends, up to that many
        seconds (capped by the service at 60): the answer is then the ended job."""
        body = _only_set(
            upload_id=upload_id,
            image_url=image_url,
            params=dict(params) if params else None,
            preset=preset,
            variant=variant,
            webhook_url=webhook_url,
            webhook_events=list(webhook_events) if webhook_events is not None else None,
            expires_after=expires_after,
            preview=preview,
        )
        headers = {"Idempotency-Key": idempotency_key or f"supir-client-{uuid.uuid4().hex}"}
        timeout = None
        if prefer_wait:
            headers["Prefer"] = f"wait={int(prefer_wait)}"
            timeout = max(self._http.timeout, prefer_wait + 30)
        response = self._http.request("POST", "/v1/jobs", json=body, headers=headers, timeout=timeout)
        return Job.from_json(response.json())

    def get_job(self, job_id: str) -> Job:
        return Job.from_json(self._http.request("GET", f"/v1/jobs/{job_id}").json())

    def list_jobs(self, *, status: str | None = None, limit: int = 20, cursor: int = 0) -> JobList:
        """One page of your jobs, newest first; pass `next_cursor` for the next."""
        query = _only_set(status=status, limit=limit, cursor=cursor)
        return JobList.from_json(self._http.request("GET", "/v1/jobs", params=query).json())

    def iter_jobs(self, *, status: str | None = None) -> Iterator[Job]:
        cursor: int | None = 0
        while cursor is not None:
            page = self.list_jobs(status=status, limit=100, cursor=cursor)
            yield from page.jobs
            cursor = page.next_cursor

    def cancel(self, job_id: str) -> Job:
        return Job.from_json(self._http.request("POST", f"/v1/jobs/{job_id}/cancel").json())

    def delete(self, job_id: str) -> None:
        """Erase the job and its files now (idempotent); its reads then raise JobDeleted."""
        self._http.request("DELETE", f"/v1/jobs/{job_id}")

    def result(self, job_id: str, index: int = 0) -> bytes:
        """Sample `index`'s image. With S3 storage the service redirects to a presigned URL, fetched without the
        API key."""
        response = self._http.request("GET", f"/v1/jobs/{job_id}/result", params={"index": index})
        if response.status_code in (301, 302, 303, 307, 308):
            return self._http.request("GET", response.headers["location"], api=False).content
        return response.content

    def thumbnail(self, job_id: str, size: int = 256, index: int = 0) -> bytes:
        """A JPEG of a sample fitting size × size."""
        query = {"size": size, "index": index}
        return self._http.request("GET", f"/v1/jobs/{job_id}/thumbnail", params=query).content

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """The job once it has ended (whatever its status), following its event stream, or polling where a stream
        cannot be had; WaitTimeout after `timeout` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self._follow_events(job_id, deadline)
        if job is None or not job.terminal:
            job = self._poll(job_id, deadline, job)
        return job

    def _follow_events(self, job_id: str, deadline: float | None) -> Job | None:
        """The job's last view from `/events` (ended, or the deadline passed); None when streams fail."""
        job, last_id, failures = None, None, 0
        while failures < 3:
            left = _left(deadline)
            if left is not None and left <= 0:
                return job
            headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last_id} if last_id else {})}
            # keep-alives come every 15 s: a read waits longer than that, or up to the deadline
            read_s = 45.0 if left is None else max(1.0, min(45.0, left))
            timeout = httpx.Timeout(self._http.timeout, read=read_s)
            try:
                events_url = f"/v1/jobs/{job_id}/events"  # no retries: polling is the fallback (429: too many streams)
                with self._http.stream("GET", events_url, headers=headers, timeout=timeout, retries=0) as r:
                    for event in _sse.events(r.iter_lines()):
                        if event is not None and event.event == "job":
                            job = Job.from_json(json.loads(event.data))
                            last_id = event.id or last_id
                            failures = 0
                            if job.terminal:
                                return job
                        left = _left(deadline)
                        if left is not None and left <= 0:
                            return job
            except (httpx.TransportError, SupirError) as exc:
                if _is_final(exc):
                    raise
                failures += 1
                continue
            # the stream ended with the job still going (the API restarting): reconnect where it left off
        return job

    def _poll(self, job_id: str, deadline: float | None, job: Job | None) -> Job:
        interval = 0.5
        while True:
            job = self.get_job(job_id)
            if job.terminal:
                return job
            left = _left(deadline)
            if left is not None and left <= 0:
                raise WaitTimeout(f"job {job_id} is still {job.status}", job=job)
            time.sleep(interval if left is None else min(interval, left))
            interval = min(5.0, interval * 1.5)

    def estimate(
        self,
        width: int,
        height: int,
        *,
        params: Mapping[str, Any] | None = None,
        preset: str | None = None,
        variant: str | None = None,
        preview: bool | None = None,
        **more_params: Any,
    ) -> Estimate:
        """What a job on a photo of this size would do and cost (`POST /v1/estimates`); nothing is queued."""
        chosen = {**(params or {}), **more_params}
        body = _only_set(
            width=width, height=height, params=chosen or None, preset=preset, variant=variant, preview=preview
        )
        return Estimate.from_json(self._http.request("POST", "/v1/estimates", json=body).json())

    def usage(self, from_date: date | str | None = None, to_date: date | str | None = None) -> Usage:
        """This key's jobs, images and GPU-seconds per UTC day, `from_date` to `to_date` inclusive (default:
        today)."""
        query = _only_set(
            **{"from": _day(from_date), "to": _day(to_date)},
        )
        return Usage.from_json(self._http.request("GET", "/v1/usage", params=query).json())

    # --- batches ---------------------------------------------------------------------------------------------

    def create_batch(
        self,
        items: Iterable[str | UploadTarget | Mapping[str, Any]],
        *,
        params: Mapping[str, Any] | None = None,
        preset: str | None = None,
        variant: str | None = None,
        webhook_url: str | None = None,
        expires_after: int | None = None,
        idempotency_key: str | None = None,
    ) -> Batch:
        """`POST /v1/batches`: one job per item. An item is an upload (its id or UploadTarget), an http(s) image
        URL, or a dict (`{"upload_id" | "image_url", "params"?, "preset"?}`); `params` and `preset` here are
        shared by every item, an item's own winning. `webhook_url` is POSTed one signed `batch.completed` event
        when the last job ends (the batch's jobs send none of their own)."""
        body = _only_set(
            items=[_batch_item(item) for item in items],
            params=dict(params) if params else None,
            preset=preset,
            variant=variant,
            webhook_url=webhook_url,
            expires_after=expires_after,
        )
        headers = {"Idempotency-Key": idempotency_key or f"supir-client-{uuid.uuid4().hex}"}
        return Batch.from_json(self._http.request("POST", "/v1/batches", json=body, headers=headers).json())

    def get_batch(self, batch_id: str) -> Batch:
        return Batch.from_json(self._http.request("GET", f"/v1/batches/{batch_id}").json())

    def batch_jobs(self, batch_id: str, *, status: str | None = None, limit: int = 100, cursor: int = 0) -> JobList:
        """One page of the batch's jobs in item order (at most 100); pass `next_cursor` for the next."""
        query = _only_set(status=status, limit=limit, cursor=cursor)
        return JobList.from_json(self._http.request("GET", f"/v1/batches/{batch_id}/jobs", params=query).json())

    def iter_batch_jobs(self, batch_id: str, *, status: str | None = None) -> Iterator[Job]:
        cursor: int | None = 0
        while cursor is not None:
            page = self.batch_jobs(batch_id, status=status, cursor=cursor)
            yield from page.jobs
            cursor = page.next_cursor

    def cancel_batch(self, batch_id: str) -> Batch:
        return Batch.from_json(self._http.request("POST", f"/v1/batches/{batch_id}/cancel").json())

    def delete_batch(self, batch_id: str) -> None:
        """Erase every job of the batch, then the batch (idempotent); its reads then raise BatchDeleted."""
        self._http.request("DELETE", f"/v1/batches/{batch_id}")

    def download_batch_zip(self, batch_id: str, dest: str | os.PathLike[str]) -> Path:
        """Stream `results.zip` to `dest` (a path ending in `.zip`, or a directory, made if missing, to hold
        `<batch id>.zip`), never held in memory; written beside it first and renamed, so a broken download leaves
        no partial zip."""
        path = Path(dest)
        if path.suffix.lower() != ".zip" or path.is_dir():
            path = path / f"{batch_id}.zip"
        path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(self._http.max_retries + 1):
            handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
            try:
                with (
                    os.fdopen(handle, "wb") as file,
                    self._http.stream("GET", f"/v1/batches/{batch_id}/results.zip") as response,
                ):
                    for chunk in response.iter_bytes(1 << 16):
                        file.write(chunk)
                os.replace(partial, path)
                return path
            except httpx.TransportError as exc:  # cut off mid-body: start again
                if attempt >= self._http.max_retries:
                    raise SupirError(f"results.zip of {batch_id}: {type(exc).__name__}: {exc}") from exc
            finally:
                Path(partial).unlink(missing_ok=True)
        raise AssertionError("unreachable")

    def batch(
        self,
        photos: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
        *,
        params: Mapping[str, Any] | None = None,
        preset: str | None = None,
        variant: str | None = None,
        webhook_url: str | None = None,
        expires_after: int | None = None,
        idempotency_key: str | None = None,
        on_progress: Callable[[Batch], None] | None = None,
        poll_interval: float = 1.0,
        timeout: float | None = None,
        zip_to: str | os.PathLike[str] | None = None,
        **more_params: Any,
    ) -> BatchResult:
        """Restore a folder's photos (or the listed files) as one batch: each uploaded straight to storage, then
        one `POST /v1/batches`; returns once every job has ended, calling `on_progress(batch)` after each poll.
        `zip_to` downloads results.zip there; the result also lists, downloads or saves the images."""
        paths = image_files(photos)
        if not paths:
            raise ValueError(f"no photos to restore in {photos!s} (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})")
        uploads = [self.upload(path) for path in paths]
        chosen = {**(params or {}), **more_params}
        batch = self.create_batch(
            uploads,
            params=chosen or None,
            preset=preset,
            variant=variant,
            webhook_url=webhook_url,
            expires_after=expires_after,
            idempotency_key=idempotency_key,
        )
        batch = self.wait_batch(batch, on_progress=on_progress, poll_interval=poll_interval, timeout=timeout)
        result = BatchResult(self, batch, dict(zip(batch.job_ids, paths, strict=False)))
        if zip_to is not None:
            result.download_zip(zip_to)
        return result

    def wait_batch(
        self,
        batch: Batch | str,
        *,
        on_progress: Callable[[Batch], None] | None = None,
        poll_interval: float = 1.0,
        timeout: float | None = None,
    ) -> Batch:
        """The batch once it has ended, polled every `poll_interval` seconds; WaitTimeout after `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        view = self.get_batch(batch) if isinstance(batch, str) else batch
        while True:
            if on_progress is not None:
                on_progress(view)
            if view.ended:
                return view
            left = _left(deadline)
            if left is not None and left <= 0:
                raise WaitTimeout(f"batch {view.id} is still running", batch=view)
            time.sleep(poll_interval if left is None else min(poll_interval, left))
            view = self.get_batch(view.id)


def image_files(photos: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """A folder's photos (by suffix, sorted by name, not recursive), or the paths given, in order."""
    if isinstance(photos, str | os.PathLike):
        folder = Path(photos)
        if not folder.is_dir():
            return [folder]
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [Path(p) for p in photos]


def _batch_item(item: str | UploadTarget | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(item, UploadTarget):
        return {"upload_id": item.id}
    if isinstance(item, str):
        return {"image_url": item} if item.startswith(("http://", "https://")) else {"upload_id": item}
    return dict(item)


def _day(value: date | str | None) -> str | None:
    return value.isoformat() if isinstance(value, date) else value


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _is_final(exc: Exception) -> bool:
    """An error a poll would meet too (the job is missing, erased, not ours, the key wrong): not worth a
    fallback."""
    return isinstance(exc, ApiError) and exc.status in (401, 403, 404, 410)
