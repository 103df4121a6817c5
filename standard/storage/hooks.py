"""Where the engine's ``folder_paths`` and the model listing find the storage of a data dir.

Kept free of oss2 imports: it is imported by every instance, bucket or not.
Several instances may live in one process (tests), so storages are keyed by the
data dir's local root.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ..datadir import DataDir
    from .storage import ObjectStorage

_lock = threading.Lock()
_storages: dict[Path, ObjectStorage] = {}


def register(root: Path, storage: ObjectStorage) -> None:
    with _lock:
        _storages[Path(root)] = storage


def unregister(root: Path, storage: ObjectStorage | None = None) -> None:
    with _lock:
        if storage is None or _storages.get(Path(root)) is storage:
            _storages.pop(Path(root), None)


def remote_models(data_dir: DataDir) -> ObjectStorage | None:
    """The storage whose bucket holds this data dir's models (``--data-dir oss://``), else None."""
    storage = _storages.get(data_dir.root)
    return storage if storage is not None and storage.remote_models else None


def bucket_inputs(data_dir: DataDir, input_dir: str | Path) -> ObjectStorage | None:
    """The storage whose bucket holds ``input_dir`` (``PREFIX/input`` of an oss:// data dir), else None.

    A cluster user's own input folder is not mirrored: it answers None.
    """
    storage = _storages.get(data_dir.root)
    if storage is None or not storage.remote_inputs or Path(input_dir).resolve() != storage.input_root:
        return None
    return storage


def engine_input_path(storage: ObjectStorage, path: Path) -> None:
    """``folder_paths.get_annotated_filepath`` of an input: fetch it from the bucket when the disk
    lacks it. Never on the event loop (validation only asks the listing). A failed download
    raises StorageError, which the node reports as its execution error."""
    if not _on_event_loop():
        storage.input_path(path)


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
