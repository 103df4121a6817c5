"""Errors of the object-storage layer; oss2's exceptions are translated at the boundary.

    StorageError                (a ComfyServeError: see standard.errors)
    ├── StorageConfigError      bad oss:// URL, missing endpoint or credentials (also a ConfigError)
    ├── StorageAuthError        the bucket refused our credentials (wrong secret, bad STS token)
    ├── ObjectNotFound          no such key / bucket
    ├── IntegrityError          size or CRC64 of a download does not match the object
    ├── CacheFullError         a model does not fit into --cache-max-gb
    ├── TransientStorageError   5xx / dropped connection after the retries ran out
    └── DownloadCancelled       the prompt that wanted the file was interrupted (resumable later)
"""

from __future__ import annotations

from ..errors import ComfyServeError, ConfigError


class StorageError(ComfyServeError):
    """Root of the storage errors."""


class StorageConfigError(StorageError, ConfigError):
    """The storage flags cannot work (reported at start as a config error)."""


class StorageAuthError(StorageError):
    """403 from the bucket: wrong key id/secret, expired STS token, or no permission."""


class ObjectNotFound(StorageError):
    """The key (or the bucket) does not exist."""


class IntegrityError(StorageError):
    """A downloaded file's size or CRC64 differs from the object's; the file was discarded."""


class CacheFullError(StorageError):
    """The model cache cannot make room for a file."""


class TransientStorageError(StorageError):
    """The bucket kept failing (5xx, connection drops) after the retries."""


class DownloadCancelled(StorageError):
    """The download was stopped on purpose; its finished parts are kept for a later resume."""


def translate(exc: BaseException, what: str) -> StorageError:
    """An oss2 / requests exception as one of ours, with a message naming ``what`` failed."""
    import oss2.exceptions as oe

    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, oe.OssError):
        status = getattr(exc, "status", 0)
        code = getattr(exc, "code", "") or ""
        detail = f"{code or type(exc).__name__} (HTTP {status}, request id {getattr(exc, 'request_id', '')})"
        message = getattr(exc, "message", "") or ""
        if status == 403:
            hint = " - check OSS_ACCESS_KEY_ID / OSS_ACCESS_KEY_SECRET (and OSS_SECURITY_TOKEN)"
            return StorageAuthError(f"{what}: access denied by the bucket: {detail}: {message}{hint}")
        if status == 404:
            return ObjectNotFound(f"{what}: not found: {detail}")
        return TransientStorageError(f"{what}: {detail}: {message}".rstrip(": "))
    return TransientStorageError(f"{what}: {type(exc).__name__}: {exc}")


def is_retryable(exc: BaseException) -> bool:
    """5xx, 429, timeouts and dropped connections are worth another try; 4xx are final."""
    import oss2.exceptions as oe

    if isinstance(exc, oe.RequestError | oe.InconsistentError):
        return True
    if isinstance(exc, oe.OssError):
        status = getattr(exc, "status", 0)
        return status >= 500 or status in (408, 429) or status < 0
    return isinstance(exc, OSError | TransientStorageError) or type(exc).__module__.startswith(
        ("requests", "urllib3", "http.client"))
