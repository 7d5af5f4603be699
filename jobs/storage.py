"""Object stores for inputs and results: a local directory (the embedded default) or any S3 API."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import quote, urlencode

from supir_core.errors import SupirError

from .settings import Settings

__all__ = ["LocalStore", "ObjectMissing", "ObjectStore", "S3Store", "StorageError", "make_store"]


class StorageError(SupirError):
    """An object store failed (unreachable, refused, timed out): worth a retry."""

    code = "storage_error"


class ObjectMissing(StorageError):
    """The object is not there (expired, deleted): no retry brings it back."""

    code = "object_missing"


# StorageError messages reach clients (job errors, /readyz): they name the operation and a short reason only.
# Paths, endpoints, buckets and keys go to this log instead.
log = logging.getLogger("supir.storage")


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...
    def get(self, key: str) -> bytes: ...
    def read_range(self, key: str, start: int, length: int) -> bytes: ...
    def chunks(self, key: str, chunk_bytes: int) -> Iterator[bytes]: ...
    def copy(self, source: str, target: str) -> None: ...
    def delete(self, key: str) -> None: ...
    def size(self, key: str) -> int: ...
    def url(self, key: str, expires_s: int) -> str: ...
    def delete_older_than(self, cutoff: float) -> int: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def ping(self) -> None: ...


def sign(secret: str, key: str, expires: int) -> str:
    return hmac.new(secret.encode(), f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()


class LocalStore:
    """Files under a directory; URLs are HMAC-signed links to the API's /v1/files route."""

    def __init__(self, root: Path, public_url: str, secret: str) -> None:
        self.root = root.resolve()
        self.public_url = public_url.rstrip("/")
        self.secret = secret
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            log.warning("local storage: key %r leaves %s", key, self.root)
            raise StorageError("local storage: invalid object key")
        return path

    def _failed(self, what: str, path: Path, exc: OSError) -> StorageError:
        log.warning("local storage %s of %s failed: %r", what, path, exc)
        if isinstance(exc, FileNotFoundError) and what in ("read", "copy"):
            return ObjectMissing(f"local storage {what} failed: object missing")
        reason = (exc.strerror or type(exc).__name__).lower()
        return StorageError(f"local storage {what} failed: {reason}")

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        tmp = path.with_name(path.name + ".part")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            tmp.replace(path)  # readers never see half a file
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # a full disk leaves a partial .part: no litter
            raise self._failed("write", path, exc) from exc

    @contextlib.contextmanager
    def writing(self, key: str) -> Iterator[BinaryIO]:
        """A file to stream an object into: it appears under its key only once the block ends without error."""
        path = self._path(key)
        tmp = path.with_name(path.name + ".part")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as file:
                yield file
            tmp.replace(path)
        except OSError as exc:
            raise self._failed("write", path, exc) from exc
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # a refused or broken stream leaves no litter

    def size(self, key: str) -> int:
        path = self._path(key)
        try:
            return path.stat().st_size
        except FileNotFoundError as exc:
            raise self._failed("read", path, exc) from exc
        except OSError as exc:
            raise self._failed("stat", path, exc) from exc

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise self._failed("read", path, exc) from exc

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """At most `length` bytes from offset `start` (fewer at the end of the object)."""
        path = self._path(key)
        try:
            with path.open("rb") as file:
                file.seek(start)
                return file.read(length)
        except OSError as exc:
            raise self._failed("read", path, exc) from exc

    def chunks(self, key: str, chunk_bytes: int) -> Iterator[bytes]:
        """The object in pieces of at most chunk_bytes, read as they are asked for."""
        path = self._path(key)
        try:
            with path.open("rb") as file:
                while piece := file.read(chunk_bytes):
                    yield piece
        except OSError as exc:
            raise self._failed("read", path, exc) from exc

    def copy(self, source: str, target: str) -> None:
        """A second name for the object, at once and without reading it: a hard link (an object's file is never
        written in place, put and writing replace it whole), else a copy made by the kernel."""
        src, path = self._path(source), self._path(target)
        tmp = path.with_name(path.name + ".part")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)
            try:
                os.link(src, tmp)
                # the link shares the source's mtime: make it the copy's own, or the age sweep (delete_older_than)
                # would count the new object's age from when its source was written
                os.utime(tmp)
            except FileNotFoundError:
                raise
            except OSError:  # a file system without hard links
                shutil.copyfile(src, tmp)
            tmp.replace(path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise self._failed("copy", src, exc) from exc

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise self._failed("delete", path, exc) from exc

    def url(self, key: str, expires_s: int) -> str:
        expires = int(time.time()) + expires_s
        query = urlencode({"expires": expires, "signature": sign(self.secret, key, expires)})
        return f"{self.public_url}/v1/files/{quote(key)}?{query}"

    def verify(self, key: str, expires: int, signature: str) -> bool:
        return expires >= time.time() and hmac.compare_digest(sign(self.secret, key, expires), signature)

    def delete_older_than(self, cutoff: float) -> int:
        removed = 0
        try:
            for path in self.root.rglob("*"):
                with contextlib.suppress(FileNotFoundError):  # removed meanwhile (a redelivered job, another sweep)
                    if path.is_file() and path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
        except OSError as exc:
            raise self._failed("sweep", self.root, exc) from exc
        return removed

    def delete_prefix(self, prefix: str) -> int:
        """Every object whose key starts with prefix (a half-written `.part` too); how many were removed."""
        directory, start = self._path(prefix).parent, prefix.rpartition("/")[2]
        removed = 0
        try:
            for path in directory.glob(f"{start}*") if directory.is_dir() else ():
                with contextlib.suppress(FileNotFoundError):
                    if path.is_file():
                        path.unlink()
                        removed += 1
        except OSError as exc:
            raise self._failed("delete", directory, exc) from exc
        return removed

    def ping(self) -> None:
        if not self.root.is_dir():
            log.warning("local storage directory %s is missing", self.root)
            raise StorageError("local storage unavailable: directory missing")


class S3Store:
    """A bucket of any S3 API (AWS, MinIO, moto), through boto3; URLs are presigned GETs."""

    def __init__(self, client: Any, bucket: str, signer: Any = None) -> None:
        self.client = client
        # presigned URLs are for clients outside: signed for the public endpoint (the signature covers the host)
        self.signer = signer or client
        self.bucket = bucket

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Store:
        import boto3
        from botocore.config import Config

        # A stalled S3 must fail a call within about max_attempts × (connect + read timeout), plus botocore's
        # jittered backoff (≤ 1 s, 2 s, ...): the API then answers 503, and the worker retries with its own backoff.
        config = Config(
            signature_version="s3v4",  # presigned POSTs and URLs: SigV2 is refused by newer regions and most S3 peers
            s3={"addressing_style": "path" if settings.s3_path_style else "auto"},
            retries={"total_max_attempts": settings.s3_max_attempts, "mode": "standard"},
            connect_timeout=settings.s3_connect_timeout_s,
            read_timeout=settings.s3_read_timeout_s,
        )
        secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None

        def client_for(endpoint: str | None) -> Any:
            return boto3.client(
                "s3",
                endpoint_url=endpoint,
                region_name=settings.s3_region,
                aws_access_key_id=settings.s3_access_key_id,
                aws_secret_access_key=secret,
                config=config,
            )

        public = settings.s3_public_endpoint_url
        signer = client_for(public) if public and public != settings.s3_endpoint_url else None
        return cls(client_for(settings.s3_endpoint_url), settings.s3_bucket, signer)

    def _call(self, what: str, fn: Any, read_body: bool = False, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = fn(Bucket=self.bucket, **kwargs)
            # the body streams after the call returns: a drop or stall there is as much a failure of the call
            return bytes(response["Body"].read()) if read_body else response
        except (BotoCoreError, ClientError) as exc:
            raise self._failed(what, kwargs.get("Key", ""), exc) from exc

    def _failed(self, what: str, key: str, exc: Exception) -> StorageError:
        log.warning("S3 %s of s3://%s/%s at %s failed: %r", what, self.bucket, key, self.client.meta.endpoint_url, exc)
        reason = _reason(exc, what)
        return (ObjectMissing if reason == "object missing" else StorageError)(f"S3 {what} failed: {reason}")

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self._call("put", self.client.put_object, Key=key, Body=data, ContentType=content_type)

    def get(self, key: str) -> bytes:
        return bytes(self._call("get", self.client.get_object, read_body=True, Key=key))

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """At most `length` bytes from offset `start` (fewer at the end of the object): one ranged GET."""
        if length <= 0:
            return b""
        span = f"bytes={start}-{start + length - 1}"
        return bytes(self._call("get", self.client.get_object, read_body=True, Key=key, Range=span))

    def chunks(self, key: str, chunk_bytes: int) -> Iterator[bytes]:
        """The object in pieces of at most chunk_bytes, from one GET read as they are asked for."""
        from botocore.exceptions import BotoCoreError, ClientError

        body = self._call("get", self.client.get_object, Key=key)["Body"]
        try:
            yield from body.iter_chunks(chunk_bytes)
        except (BotoCoreError, ClientError) as exc:
            raise self._failed("get", key, exc) from exc
        finally:
            body.close()

    def copy(self, source: str, target: str) -> None:
        """A server-side copy (CopyObject, up to S3's 5 GB for one call): no byte passes through this process."""
        origin = {"Bucket": self.bucket, "Key": source}
        self._call("copy", self.client.copy_object, Key=target, CopySource=origin, MetadataDirective="COPY")

    def delete(self, key: str) -> None:
        self._call("delete", self.client.delete_object, Key=key)

    def size(self, key: str) -> int:
        return int(self._call("get", self.client.head_object, Key=key)["ContentLength"])

    def presigned_post(self, key: str, content_type: str, size: int, expires_s: int) -> dict[str, Any]:
        """{url, fields} of a browser-style POST that S3 itself holds to this key, this exact size and type, and
        the expiry (the policy is signed: a changed field or a late upload is refused by S3)."""
        conditions: list[Any] = [{"Content-Type": content_type}, ["content-length-range", size, size]]
        return dict(
            self.signer.generate_presigned_post(
                self.bucket, key, Fields={"Content-Type": content_type}, Conditions=conditions, ExpiresIn=expires_s
            )
        )

    def url(self, key: str, expires_s: int) -> str:
        params = {"Bucket": self.bucket, "Key": key}
        return str(self.signer.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s))

    def delete_older_than(self, cutoff: float) -> int:
        from botocore.exceptions import BotoCoreError, ClientError

        removed = 0
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
                for item in page.get("Contents", []):
                    if item["LastModified"].timestamp() < cutoff:
                        self.delete(item["Key"])
                        removed += 1
        except (BotoCoreError, ClientError) as exc:
            raise self._failed("sweep", "", exc) from exc
        return removed

    def delete_prefix(self, prefix: str) -> int:
        """Every object whose key starts with prefix: listed, then deleted a thousand at a time."""
        from botocore.exceptions import BotoCoreError, ClientError

        removed = 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if keys:
                    answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
                    if answer.get("Errors"):
                        log.warning("S3 delete of %d keys under %s refused: %r", len(keys), prefix, answer["Errors"])
                        raise StorageError("S3 delete failed: refused")
                    removed += len(keys)
        except (BotoCoreError, ClientError) as exc:
            raise self._failed("delete", prefix, exc) from exc
        return removed

    def ping(self) -> None:
        self._call("ping", self.client.head_bucket)


def _reason(exc: Exception, what: str) -> str:
    """A short class of an S3 failure: botocore's own messages name the endpoint, bucket or key."""
    from botocore import exceptions as e

    if isinstance(exc, e.ClientError):
        code = str(exc.response.get("Error", {}).get("Code") or "")
        if code in ("NoSuchKey", "NoSuchBucket", "404"):
            return "bucket missing" if what == "ping" or code == "NoSuchBucket" else "object missing"
        # an error code is a short class (AccessDenied, SlowDown, InternalError); anything else is not echoed
        return code if re.fullmatch(r"[A-Za-z0-9.]{1,64}", code) else "error response"
    if isinstance(exc, e.ConnectTimeoutError | e.ReadTimeoutError):
        return "timeout"
    if isinstance(exc, e.EndpointConnectionError):
        return "unreachable"
    if isinstance(exc, e.ConnectionClosedError | e.ResponseStreamingError | e.IncompleteReadError):
        return "connection closed"
    if isinstance(exc, e.SSLError):
        return "TLS error"
    if isinstance(exc, e.NoCredentialsError | e.PartialCredentialsError):
        return "no credentials"
    if isinstance(exc, e.ConnectionError):
        return "connection failed"
    return type(exc).__name__


def make_store(settings: Settings) -> ObjectStore:
    if settings.storage == "s3":
        return S3Store.from_settings(settings)
    return LocalStore(settings.local_dir, settings.public_url, settings.signing_secret.get_secret_value())
