"""Object stores for inputs and results: a local directory (the embedded default) or any S3 API."""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlencode

from supir_core.errors import StorageError

from .settings import Settings

__all__ = ["LocalStore", "ObjectStore", "S3Store", "StorageError", "make_store"]


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...
    def get(self, key: str) -> bytes: ...
    def delete(self, key: str) -> None: ...
    def url(self, key: str, expires_s: int) -> str: ...
    def delete_older_than(self, cutoff: float) -> int: ...
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
            raise StorageError(f"object key {key!r} leaves the storage directory")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(data)
        tmp.replace(path)  # readers never see half a file

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"object {key!r} is missing") from None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def url(self, key: str, expires_s: int) -> str:
        expires = int(time.time()) + expires_s
        query = urlencode({"expires": expires, "signature": sign(self.secret, key, expires)})
        return f"{self.public_url}/v1/files/{quote(key)}?{query}"

    def verify(self, key: str, expires: int, signature: str) -> bool:
        return expires >= time.time() and hmac.compare_digest(sign(self.secret, key, expires), signature)

    def delete_older_than(self, cutoff: float) -> int:
        removed = 0
        for path in self.root.rglob("*"):
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def ping(self) -> None:
        if not self.root.is_dir():
            raise StorageError(f"storage directory {self.root} is missing")


class S3Store:
    """A bucket of any S3 API (AWS, MinIO, moto), through boto3; URLs are presigned GETs."""

    def __init__(self, client: Any, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Store:
        import boto3
        from botocore.config import Config

        config = Config(
            s3={"addressing_style": "path" if settings.s3_path_style else "auto"},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
        )
        secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
        client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=secret,
            config=config,
        )
        return cls(client, settings.s3_bucket)

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404"):
                raise StorageError(f"object {kwargs.get('Key')!r} is missing") from None
            raise StorageError(f"S3 {what} failed: {code or exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 {what} failed: {exc}") from exc

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self._call("put", self.client.put_object, Key=key, Body=data, ContentType=content_type)

    def get(self, key: str) -> bytes:
        return bytes(self._call("get", self.client.get_object, Key=key)["Body"].read())

    def delete(self, key: str) -> None:
        self._call("delete", self.client.delete_object, Key=key)

    def url(self, key: str, expires_s: int) -> str:
        params = {"Bucket": self.bucket, "Key": key}
        return str(self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s))

    def delete_older_than(self, cutoff: float) -> int:
        removed = 0
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket):
            for item in page.get("Contents", []):
                if item["LastModified"].timestamp() < cutoff:
                    self.delete(item["Key"])
                    removed += 1
        return removed

    def ping(self) -> None:
        self._call("head_bucket", self.client.head_bucket)


def make_store(settings: Settings) -> ObjectStore:
    if settings.storage == "s3":
        return S3Store.from_settings(settings)
    return LocalStore(settings.local_dir, settings.public_url, settings.signing_secret.get_secret_value())
