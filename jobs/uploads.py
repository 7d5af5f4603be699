"""Direct uploads (`POST /v1/uploads`): the photo goes to the object store without passing through a create
request, and a job names it by id. Torch-free: the API makes and uses uploads, the expiry sweep erases unused ones.

    p:upload:<id>   JSON {id, owner, size, content_type, key, created_at, expires_at, used_by}; its TTL is the
                    upload's retention. `used_by` is set once, atomically, by the create that takes the upload.

An upload is used once: the store copies it to the job's own input, never through the API (so the job's
retention and DELETE cover it), and the upload's object is removed. An upload never used is erased by the expiry
sweep: its id sits in `p:expiring` (jobs.retention) at its retention's end.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

UPLOAD_PREFIX = "upl_"


def new_upload_id() -> str:
    return UPLOAD_PREFIX + uuid.uuid4().hex


def upload_key(upload_id: str) -> str:
    """The upload's object key; ids have one length, so this prefix reaches no other upload's object."""
    return f"uploads/{upload_id}"


def is_upload_id(value: str) -> bool:
    return value.startswith(UPLOAD_PREFIX)


@dataclass(frozen=True)
class Upload:
    id: str
    owner: str
    size: int
    content_type: str
    key: str
    created_at: float
    expires_at: float  # the URL's (or policy's) end: the bytes are refused after it
    used_by: str | None = None


class UploadBook:
    def __init__(self, client: Any, prefix: str) -> None:
        self.r, self.p = client, prefix

    def _key(self, upload_id: str) -> str:
        return f"{self.p}:upload:{upload_id}"

    def create(self, owner: str, size: int, content_type: str, url_expires_s: int, retention_s: int) -> Upload:
        now = time.time()
        upload_id = new_upload_id()
        upload = Upload(upload_id, owner, size, content_type, upload_key(upload_id), now, now + url_expires_s)
        keep_s = max(retention_s, url_expires_s)
        with self.r.pipeline() as pipe:
            pipe.set(self._key(upload_id), json.dumps(asdict(upload)), ex=keep_s)
            pipe.zadd(f"{self.p}:expiring", {upload_id: now + keep_s})  # the sweep erases its object then
            pipe.execute()
        return upload

    def get(self, upload_id: str) -> Upload | None:
        raw = self.r.get(self._key(upload_id)) if is_upload_id(upload_id) else None
        return Upload(**json.loads(raw)) if raw else None

    def claim(self, upload_id: str, job_id: str) -> bool:
        """Mark the upload used by job_id unless another job has it: one create wins."""
        script = """
        local raw = redis.call('GET', KEYS[1])
        if not raw then return 0 end
        local upload = cjson.decode(raw)
        if upload['used_by'] ~= nil and upload['used_by'] ~= cjson.null then return 0 end
        upload['used_by'] = ARGV[1]
        redis.call('SET', KEYS[1], cjson.encode(upload), 'KEEPTTL')
        return 1
        """
        return bool(self.r.eval(script, 1, self._key(upload_id), job_id))

    def release(self, upload_id: str, job_id: str) -> None:
        """Give the upload back after the create that claimed it failed."""
        script = """
        local raw = redis.call('GET', KEYS[1])
        if not raw then return 0 end
        local upload = cjson.decode(raw)
        if upload['used_by'] ~= ARGV[1] then return 0 end
        upload['used_by'] = cjson.null
        redis.call('SET', KEYS[1], cjson.encode(upload), 'KEEPTTL')
        return 1
        """
        self.r.eval(script, 1, self._key(upload_id), job_id)

    def forget(self, upload_id: str) -> None:
        """A used upload: its record and its place in the sweep's index go (its object was removed)."""
        with self.r.pipeline() as pipe:
            pipe.delete(self._key(upload_id))
            pipe.zrem(f"{self.p}:expiring", upload_id)
            pipe.execute()
