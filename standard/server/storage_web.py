"""Wiring of ``ObjectStorage`` (``standard.storage``) into the instance app.

- start (before the engine loads): ``custom_nodes/`` synced, ``models/`` listed;
  ``/restart`` does it again before plugins are re-imported;
- ``executed`` events (engine thread) and, after each prompt, its history: output
  files uploaded, a signed ``url`` added to each entry; the models the prompt
  used are then released for eviction;
- before a prompt is validated: the input names it refers to that the listing lacks are looked up
  (one HEAD each, bounded), so a file put in the bucket a moment ago (an API task's inputs) is found;
- ``/upload/image``: the file also goes to ``PREFIX/input/``;
- ``/view`` of a file not on local disk: an input is fetched into the local
  ``input/`` and served; anything else gets a 302 to a signed URL when the bucket has it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from ..errors import ConfigError
from ..storage import hooks
from ..storage.errors import StorageError
from . import keys

log = logging.getLogger("comfyserve.storage")
# The app's ObjectStorage (typed loosely so instances without a bucket never import oss2).
STORAGE: web.AppKey[Any] = web.AppKey("storage", object)


def setup_storage(app: web.Application) -> None:
    """Attach the storage the settings ask for (nothing when there is none).

    Call before the prompt server's cleanup context is added: the sync must
    finish before plugins are imported.
    """
    settings = app[keys.SETTINGS]
    storage_settings = getattr(settings, "storage", None)
    if storage_settings is None:
        return
    from ..storage.storage import ObjectStorage

    data_dir = app[keys.DATA_DIR]
    storage = ObjectStorage(storage_settings, data_dir.root)
    app[STORAGE] = storage
    app.cleanup_ctx.append(_storage_ctx)
    server = app[keys.PROMPT_SERVER]
    workdirs = app[keys.WORKDIRS]
    folders = {"output": workdirs.output, "input": workdirs.input, "temp": workdirs.temp}

    def on_event(event: str | int, data: Any) -> None:
        """On the engine thread: ``executed`` events (what API-edition results are built from)
        get their files uploaded and their ``url``s before they are sent."""
        if event != "executed" or not isinstance(data, dict) or not isinstance(data.get("output"), dict):
            return
        try:
            asyncio.get_running_loop()
            return  # never block the event loop; the history hook covers this one
        except RuntimeError:
            pass
        storage.publish_outputs({str(data.get("node")): data["output"]}, folders)

    async def publish(prompt_id: str, history_result: dict[str, Any]) -> None:
        try:
            count = await asyncio.to_thread(storage.publish_outputs, history_result.get("outputs") or {}, folders)
            if count:
                log.info("prompt %s: %d output files uploaded", prompt_id, count)
        finally:
            storage.task_finished()

    async def resync() -> None:
        await asyncio.to_thread(storage.prepare)

    async def probe(prompt: dict[str, Any]) -> None:
        await asyncio.to_thread(storage.probe_inputs, prompt)

    if storage.remote_inputs:  # names put in the bucket since the last listing pass validation
        server.prompt_hooks.append(probe)
    server.event_hooks.append(on_event)
    server.result_hooks.append(publish)
    server.reload_hooks.append(resync)


async def _storage_ctx(app: web.Application) -> AsyncIterator[None]:
    storage = app[STORAGE]
    root = storage.local_root
    try:
        await asyncio.to_thread(storage.prepare)
    except StorageError as exc:
        raise ConfigError(f"cannot use the bucket {storage.location}: {exc}") from exc
    hooks.register(root, storage)
    try:
        yield
    finally:
        hooks.unregister(root, storage)
        storage.close()


async def after_upload(app: web.Application, path: Path) -> None:
    """An uploaded input goes to the bucket too (oss:// data dir); failures are logged."""
    storage = app.get(STORAGE)
    if storage is None or not storage.uploads_outputs:
        return
    try:
        await asyncio.to_thread(storage.upload, path)
    except (StorageError, OSError, ValueError) as exc:
        log.error("upload %s not copied to the bucket: %s", path.name, exc)


async def fetch_or_remote_url(app: web.Application, path: Path) -> str | None:
    """For a file /view cannot find locally: an input is fetched into the local ``input/`` and
    None returned (the route serves it, or answers 404 when the bucket lacks it too); anything
    else - or an input whose download failed - gets a signed URL when the bucket has the file."""
    storage = app.get(STORAGE)
    return None if storage is None else await bucket_fallback(storage, path)


async def bucket_fallback(storage: Any, path: Path) -> str | None:
    """``fetch_or_remote_url`` with the ``ObjectStorage`` given (the front of real ComfyUI has its own)."""
    if storage.input_rel(path) is not None:
        try:
            await asyncio.to_thread(storage.input_path, path)
            return None
        except (StorageError, OSError, ValueError) as exc:
            log.warning("/view: fetching input %s from the bucket failed: %s", path.name, exc)
    try:
        return await asyncio.to_thread(storage.remote_url, path)
    except (StorageError, ValueError) as exc:
        log.warning("/view: bucket lookup of %s failed: %s", path.name, exc)
        return None
