"""Object storage for the data dir: ``--data-dir oss://BUCKET/PREFIX`` without a mount.

Public surface: the settings and flags, :class:`ObjectStorage` (what an
instance does with its bucket), the errors. ``oss2`` is imported lazily so
instances without a bucket never load it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    CacheFullError,
    IntegrityError,
    ObjectNotFound,
    StorageAuthError,
    StorageConfigError,
    StorageError,
    TransientStorageError,
)
from .location import OssLocation, is_oss_url
from .settings import StorageSettings, add_storage_arguments, instance_flags, storage_settings_from_args

if TYPE_CHECKING:  # pragma: no cover
    from .storage import ObjectStorage

__all__ = [
    "CacheFullError", "IntegrityError", "ObjectNotFound", "ObjectStorage", "OssLocation", "StorageAuthError",
    "StorageConfigError", "StorageError", "StorageSettings", "TransientStorageError", "add_storage_arguments",
    "instance_flags", "is_oss_url", "storage_settings_from_args",
]


def __getattr__(name: str) -> Any:
    if name == "ObjectStorage":
        from .storage import ObjectStorage

        return ObjectStorage
    raise AttributeError(name)
