"""``OssClient``: the few bucket operations we need, over ``oss2``, with retries and our errors.

Blocking (oss2 is): call it from worker threads (``asyncio.to_thread``), never
on the event loop. One instance is shared by every thread; oss2's session
keeps a connection pool sized for the parallel downloads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import oss2
import oss2.exceptions
import oss2.models

from ..retry import STORAGE
from .errors import IntegrityError, StorageConfigError, is_retryable, translate
from .location import OssLocation
from .settings import StorageSettings

log = logging.getLogger("comfyserve.storage")
T = TypeVar("T")

RETRY = STORAGE.but(retry_on=is_retryable)  # 4 tries: 5xx, 429, timeouts and dropped connections
READ_CHUNK_BYTES = 1024 * 1024
MULTIPART_THRESHOLD_BYTES = 32 * 1024 * 1024
UPLOAD_PART_BYTES = 16 * 1024 * 1024
REQUEST_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or HEAD tells about an object; ``crc64`` is None when the bucket omits it."""

    key: str
    size: int
    etag: str
    last_modified: float = 0.0
    crc64: int | None = None


class OssClient:
    """A bucket, addressed by keys (callers join the data dir's prefix via ``OssLocation.key``)."""

    def __init__(self, settings: StorageSettings, location: OssLocation, *, pool_size: int = 16) -> None:
        if not settings.endpoint or not settings.access_key_id or not settings.access_key_secret:
            raise StorageConfigError("OSS endpoint and credentials are required")
        if settings.security_token:
            auth: Any = oss2.StsAuth(settings.access_key_id, settings.access_key_secret, settings.security_token)
        else:
            auth = oss2.Auth(settings.access_key_id, settings.access_key_secret)
        self.location = location
        session = oss2.Session(pool_size=pool_size)
        self.bucket = oss2.Bucket(auth, settings.endpoint, location.bucket, session=session,
                                  connect_timeout=REQUEST_TIMEOUT_S)
        # Ranged reads: oss2's CRC (crcmod, ~150 MB/s) would cap downloads, and it cannot check
        # a range anyway; ``download`` checks the whole file's CRC64 with a fast implementation.
        self._range_bucket = oss2.Bucket(auth, settings.endpoint, location.bucket, session=session,
                                         connect_timeout=REQUEST_TIMEOUT_S, enable_crc=False)

    # -- retries ---------------------------------------------------------------

    def retry(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``; retry 5xx / dropped connections (``RETRY``); raise ours at the end."""
        try:
            return RETRY.call_sync(fn, what=what, log=log)
        except Exception as exc:
            raise translate(exc, what) from exc

    # -- reads -----------------------------------------------------------------

    def list(self, prefix: str, *, page_size: int = 1000) -> list[ObjectInfo]:
        """Every object under ``prefix`` (ListObjects pages followed through their markers)."""
        def run() -> list[ObjectInfo]:
            found = []
            for obj in oss2.ObjectIterator(self.bucket, prefix=prefix, max_keys=page_size, max_retries=0):
                if obj.key.endswith("/"):
                    continue  # folder placeholders
                found.append(ObjectInfo(obj.key, int(obj.size), obj.etag.strip('"'), float(obj.last_modified)))
            return found

        return self.retry(f"listing oss://{self.location.bucket}/{prefix}", run)

    def head(self, key: str) -> ObjectInfo:
        def run() -> ObjectInfo:
            result = self.bucket.head_object(key)
            crc = result.headers.get("x-oss-hash-crc64ecma")
            return ObjectInfo(key, int(result.content_length), (result.etag or "").strip('"'),
                              float(result.last_modified or 0), int(crc) if crc else None)

        return self.retry(f"HEAD oss://{self.location.bucket}/{key}", run)

    def iter_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes ``start..end`` (inclusive) of ``key`` in chunks; no retries (the caller resumes)."""
        result = self._range_bucket.get_object(key, byte_range=(start, end))
        try:
            if result.status != 206 and not (start == 0 and result.content_length == end + 1):
                raise IntegrityError(f"bucket ignored the range {start}-{end} of {key}")
            while True:
                chunk = result.read(READ_CHUNK_BYTES)
                if not chunk:
                    return
                yield chunk
        finally:
            result.resp.response.close()

    def get_bytes(self, key: str) -> bytes:
        return self.retry(f"GET oss://{self.location.bucket}/{key}", lambda: self.bucket.get_object(key).read())

    # -- writes ----------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes) -> None:
        self.retry(f"PUT oss://{self.location.bucket}/{key}", lambda: self.bucket.put_object(key, data))

    def put_file(self, key: str, path: Path, *, workers: int = 4,
                 multipart_threshold: int = MULTIPART_THRESHOLD_BYTES, part_size: int = UPLOAD_PART_BYTES) -> None:
        """Upload a file; multipart (parts in parallel) above the threshold. oss2 checks CRC64."""
        size = path.stat().st_size
        what = f"uploading {path.name} to oss://{self.location.bucket}/{key}"
        if size < multipart_threshold:
            self.retry(what, lambda: self.bucket.put_object_from_file(key, str(path)))
            return
        upload_id = self.retry(what, lambda: self.bucket.init_multipart_upload(key).upload_id)
        ranges = [(n + 1, offset, min(part_size, size - offset))
                  for n, offset in enumerate(range(0, size, part_size))]

        def upload(part: tuple[int, int, int]) -> oss2.models.PartInfo:
            number, offset, length = part

            def run() -> oss2.models.PartInfo:
                with path.open("rb") as handle:
                    handle.seek(offset)
                    data = handle.read(length)
                result = self.bucket.upload_part(key, upload_id, number, data)
                return oss2.models.PartInfo(number, result.etag, size=length, part_crc=result.crc)

            return self.retry(f"{what} (part {number})", run)

        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="oss-upload") as pool:
                parts = list(pool.map(upload, ranges))
            self.retry(what, lambda: self.bucket.complete_multipart_upload(key, upload_id, parts))
        except BaseException:
            try:
                self.bucket.abort_multipart_upload(key, upload_id)
            except Exception as exc:  # the upload expires on its own; report the first failure
                log.warning("could not abort upload %s: %s", upload_id, _short(exc))
            raise

    def delete(self, key: str) -> None:
        """DeleteObject: gone afterwards; deleting a missing key is no error (OSS answers 204 either way)."""
        self.retry(f"DELETE oss://{self.location.bucket}/{key}", lambda: self.bucket.delete_object(key))

    # -- URLs ------------------------------------------------------------------

    def sign_url(self, key: str, expires_s: int) -> str:
        """A GET URL that works without credentials for ``expires_s`` seconds."""
        return self.bucket.sign_url("GET", key, expires_s, slash_safe=True)


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:200]}"

