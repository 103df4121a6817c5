"""An ``oss://`` data dir in front of real ComfyUI: a finished prompt's output files go to the bucket.

The embedded engine uploads a prompt's outputs (``ObjectStorage.publish_outputs``) and gives each file item
of its history a signed ``url``. Real ComfyUI writes only its local ``output/`` folder; the front, which
shares that disk, does the same upload once the prompt is finished, from the history entry ComfyUI made:

* the journal's watcher (``standard.backend.journal``), which sees every prompt of ours finish, publishes
  its outputs before it stores the entry: the durable history carries the ``url``s, and the files outlive
  the machine even when no one asks for the result;
* ``GET /history/<id>`` of a prompt that finished but is not stored yet waits for that same upload, and
  answers the entry with its ``url``s;
* an ``executed`` event on the event socket (what an API worker builds its result from) is relayed once its
  files are uploaded, with their ``url``s, as the embedded engine sends it. Only that socket waits: ComfyUI
  goes on with the prompt, and with the next one.

One upload per event or entry (a shared task, its result remembered for ``REMEMBERED`` of them; a file the
event uploaded is not sent again for the entry); the uploads run in a thread, one at a time.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

log = logging.getLogger("comfyserve.backend")

REMEMBERED = 256  # prompts whose published entry is kept (a client polling /history/<id> again)
HISTORY_PREFIXES = ("/history/", "/api/history/")


class OutputPublisher:
    """Uploads the output files ComfyUI reports to the bucket and gives their items a ``url``."""

    def __init__(self, storage: Any, folders: dict[str, Path]) -> None:
        self.storage = storage  # standard.storage.ObjectStorage (oss2 is loaded only for a bucket)
        self.folders = folders  # ComfyUI's "type" -> local folder
        self._tasks: dict[tuple[str, ...], asyncio.Task[Any]] = {}
        self._done: OrderedDict[tuple[str, ...], Any] = OrderedDict()
        self._one_at_a_time = asyncio.Lock()

    async def published(self, prompt_id: str, entry: dict[str, Any]) -> dict[str, Any]:
        """``entry`` (the history entry of ``prompt_id``) with its outputs uploaded and ``url``s added; one
        upload for every caller. A failed upload leaves the items without ``url`` (logged)."""
        return await self._shared(("history", prompt_id), lambda: self._publish(prompt_id, entry, finished=True))

    async def executed(self, text: str) -> str:
        """A text message of ComfyUI's event socket, an ``executed`` event's output files uploaded and given
        their ``url``s first (as the embedded engine sends them); any other message as it is."""
        if '"executed"' not in text or '"output"' not in text:  # most messages: not even parsed
            return text
        try:
            message = json.loads(text)
        except ValueError:
            return text
        data = message.get("data") if isinstance(message, dict) and message.get("type") == "executed" else None
        if not isinstance(data, dict) or not isinstance(data.get("output"), dict):
            return text
        prompt_id, node = str(data.get("prompt_id")), str(data.get("node"))
        outputs = await self._shared(("executed", prompt_id, node),
                                     lambda: self._publish(prompt_id, {"outputs": {node: data["output"]}}))
        return json.dumps({**message, "data": {**data, "output": outputs["outputs"][node]}})

    async def _shared(self, key: tuple[str, ...], publish: Callable[[], Awaitable[Any]]) -> Any:
        """``publish()`` once per ``key``: callers at the same time share it, later ones get its result."""
        if key in self._done:
            return self._done[key]
        task = self._tasks.get(key)
        if task is None:
            task = self._tasks[key] = asyncio.create_task(self._remembered(key, publish()),
                                                          name="comfyserve-backend-outputs")
            task.add_done_callback(lambda _: self._tasks.pop(key, None))
        return await asyncio.shield(task)  # a caller that gives up does not stop the upload

    async def _remembered(self, key: tuple[str, ...], publish: Awaitable[Any]) -> Any:
        result = self._done[key] = await publish
        while len(self._done) > REMEMBERED:
            self._done.popitem(last=False)
        return result

    async def _publish(self, prompt_id: str, entry: dict[str, Any], *, finished: bool = False) -> dict[str, Any]:
        entry = copy.deepcopy(entry)
        outputs = entry.get("outputs")
        if not isinstance(outputs, dict) or not outputs:
            return entry
        async with self._one_at_a_time:
            try:
                count = await asyncio.to_thread(self.storage.publish_outputs, outputs, self.folders)
            except Exception:  # the items go on without urls rather than not at all
                log.exception("prompt %s: its outputs were not uploaded", prompt_id)
                count = 0
            finally:
                if finished:  # the files its executed events uploaded are not sent again; then forgotten
                    self.storage.forget_published()
        if count:
            log.info("prompt %s: %d output files uploaded", prompt_id, count)
        return entry

    async def stop(self) -> None:
        """Wait for the uploads under way (the instance stops: its files would be lost with it)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)


def history_prompt_id(method: str, path: str) -> str | None:
    """The ``<id>`` of ``GET /history/<id>`` (or ``/api/history/<id>``), else None."""
    if method != "GET":
        return None
    for prefix in HISTORY_PREFIXES:
        if path.startswith(prefix) and "/" not in path[len(prefix):] and len(path) > len(prefix):
            return path[len(prefix):]
    return None


async def history_with_urls(publisher: OutputPublisher, prompt_id: str, answer: Any) -> web.Response:
    """ComfyUI's answer to ``GET /history/<id>`` (parsed), the entry published first when there is one."""
    entry = answer.get(prompt_id) if isinstance(answer, dict) else None
    if isinstance(entry, dict):
        answer = {**answer, prompt_id: await publisher.published(prompt_id, entry)}
    return web.json_response(answer)


OUTPUTS: web.AppKey[OutputPublisher] = web.AppKey("backend_outputs", OutputPublisher)
