"""Task input folders in the bucket of an ``oss://`` data dir: ``PREFIX/input/api/<id>/<name>``.

With ``--data-dir oss://BUCKET/PREFIX`` the front and the workers only hold a local mirror, and an instance
may run on another machine: a task's files must be in the bucket before it can run. The front uploads the
inline files before the task is queued, the worker the URL inputs it fetched before the run; both mirror the
local ``DIR/input/api/<id>/`` layout, so the graph's ``api/<id>/<name>`` references resolve on any instance
(which checks the bucket for a name its cached listing does not know yet: ``ObjectStorage.probe_inputs``; in
front of real ComfyUI, the front fetches such names before it forwards the prompt: ``standard.backend.inputs``).
The objects go when the result is committed (``remove``), or after ``--input-retention`` (``sweep``).

Blocking calls (oss2) run in threads; a task's folder holds at most ``MAX_INPUT_FILES`` objects, so a
removal lists only that folder.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from standard.storage.settings import StorageSettings

from .inputs import INPUT_FOLDER, folder_id_of

log = logging.getLogger("comfyserve.api.inputs")


class InputBucket:
    """The bucket side of task input folders (one per front or worker)."""

    def __init__(self, settings: StorageSettings) -> None:
        if settings.location is None:
            raise ValueError("task inputs go to the bucket of an oss:// data dir only")
        from standard.storage.client import OssClient  # oss2 is loaded only for a bucket

        self.location = settings.location
        self.client = OssClient(settings, settings.location, pool_size=8)
        self.root = self.location.key(f"input/{INPUT_FOLDER}") + "/"

    def key(self, relative: str, name: str) -> str:
        """The key of ``name`` in a task folder named ``api/<id>`` (``inputs.folder_of`` checked)."""
        return self.location.key(f"input/{relative}/{name}")

    async def upload(self, folder: Path, relative: str, names: list[str]) -> None:
        """Put the task folder's files ``names`` at their keys (before the task can run anywhere)."""
        for name in names:
            await asyncio.to_thread(self.client.put_file, self.key(relative, name), folder / name)

    async def remove(self, relative: str) -> int:
        """Delete every object of the task folder ``api/<id>``; how many went."""
        return await asyncio.to_thread(self._remove, relative)

    def _remove(self, relative: str) -> int:
        prefix = self.location.key(f"input/{relative}") + "/"
        objects = self.client.list(prefix)
        for info in objects:
            self.client.delete(info.key)
        return len(objects)

    def sweep(self, older_than_s: float, now: float | None = None) -> int:
        """Delete the task folders whose newest object is older than ``older_than_s``; how many folders went.

        Lists ``PREFIX/input/api/`` only (task folders), never the rest of the bucket.
        """
        cutoff = (time.time() if now is None else now) - older_than_s
        newest: dict[str, float] = {}
        keys: dict[str, list[str]] = {}
        for info in self.client.list(self.root):
            folder_id, _, name = info.key[len(self.root):].partition("/")
            if folder_id_of(folder_id) is None or not name:
                continue
            newest[folder_id] = max(newest.get(folder_id, 0.0), info.last_modified)
            keys.setdefault(folder_id, []).append(info.key)
        removed = 0
        for folder_id, changed in newest.items():
            if changed < cutoff:
                for key in keys[folder_id]:
                    self.client.delete(key)
                removed += 1
        return removed


def input_bucket(settings: StorageSettings | None) -> InputBucket | None:
    """The bucket of an oss:// data dir's settings, None for a local (or mounted) data dir."""
    if settings is None or settings.location is None:
        return None
    return InputBucket(settings)
