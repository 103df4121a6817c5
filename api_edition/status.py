"""``GET /api_task?task_id=T`` (or ``?requestId=R``): where a task is.

Answers, from the shared queue store (so every front on one Redis answers alike):

- ``queued``: the input item is ready; ``position`` = ready items ahead of it (0: next);
- ``running``: a worker holds the input item and has recorded it running (``progress`` records, below:
  from its ``execution_start`` on the instance, or as its prompt goes to an idle instance); with ``worker``,
  ``instance``, ``node`` and ``progress`` (``value``/``max``) as the worker reports them. Until then a held
  task is ``queued`` (position 0; with ``worker`` and ``instance`` once its worker queued it on its instance
  behind the running one, ``--prefetch``), so the states a client polls only go forward (the record stays
  until the result is on the sink);
- ``succeeded`` / ``failed`` / ``cancelled``: the result is on the sink (``result``: the sink item's data,
  ``tags``: its tags), until a client commits it;
- 404 otherwise (never submitted, or the result was already taken from the sink).

One store round trip answers (``QueueStore.whereabouts``: one Lua script on Redis, one executor hop on
SQLite), ``task_id`` lookup included; it reads the input queue before the sink in one atomic step, and a
worker's "result put + input commit" is one atomic step too, so a moving task is found, never missed.

A ``task_id`` is the client's label and may repeat (task ids are per service, not per client: any client
with the service token can look up any id). The front keeps ``{service}/tasks``: one record per
submission, ``requestId`` = ``task:<task_id>``, data = the queue's requestId, so ``task_id`` finds the
newest task with that id; older records of the id are dropped after each put and the queue is trimmed to
the newest ``TASK_INDEX_KEEP`` records.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from aiohttp import web

from queue_service.client import QueueClient, QueueClientError
from queue_service.protocol import encode_body
from queue_service.store import REQUEST_ID_TAG, Item, QueueError, QueueStore, Whereabouts
from standard.http_util import json_error

from .results import STATUS_TAG
from .settings import sink_of
from .task_ref import check_task_refs

log = logging.getLogger("comfyserve.api.status")

TASKS_SUFFIX = "/tasks"
PROGRESS_SUFFIX = "/progress"
TASK_KEY_PREFIX = "task:"
TASK_INDEX_KEEP = 100_000
LOOKUP_LENGTH = 16
CANCELLED = "cancelled"


def tasks_of(service: str) -> str:
    return service + TASKS_SUFFIX


def progress_of(service: str) -> str:
    return service + PROGRESS_SUFFIX


class TaskStatus:
    """The front's view of its service's tasks, straight on the store."""

    def __init__(self, store: QueueStore, service: str) -> None:
        self.store = store
        self.service = service
        self.sink = sink_of(service)
        self.tasks = tasks_of(service)
        self.progress = progress_of(service)
        self._background: set[asyncio.Task[None]] = set()

    # -- the task_id index ---------------------------------------------------------------

    async def remember(self, task_id: str, request_id: str) -> None:
        """Record a submission; the previous records of the same task_id go in the background."""
        key = TASK_KEY_PREFIX + task_id
        body = encode_body({REQUEST_ID_TAG: key}, request_id.encode())
        try:
            index = await self.store.put(self.tasks, body, key, 0, 0)
        except QueueError as exc:  # the task is queued: only its lookup by task_id suffers
            log.warning("task %r not indexed for /api_task: %s", task_id, exc)
            return
        task = asyncio.create_task(self._tidy(key, index))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _tidy(self, key: str, newest: int) -> None:
        with contextlib.suppress(QueueError):
            older = [i.index for i in await self.store.get(self.tasks, 0, LOOKUP_LENGTH, key) if i.index < newest]
            if older:
                await self.store.remove(self.tasks, older)
            if newest % 1000 == 0 and newest > TASK_INDEX_KEEP:
                await self.store.truncate(self.tasks, newest - TASK_INDEX_KEEP)

    async def request_id_of(self, task_id: str) -> str | None:
        items = await self.store.get(self.tasks, 0, LOOKUP_LENGTH, TASK_KEY_PREFIX + task_id)
        if not items:
            return None
        return max(items, key=lambda item: item.index).decoded()[1].decode()

    # -- status --------------------------------------------------------------------------

    async def status(self, request_id: str) -> dict[str, Any] | None:
        return self._answer(await self.store.whereabouts(self.service, self.sink, self.progress,
                                                         request_id=request_id))

    async def status_of_task(self, task_id: str) -> dict[str, Any] | None:
        """``status`` of the newest task with this ``task_id``, index lookup included: one store round trip."""
        return self._answer(await self.store.whereabouts(self.service, self.sink, self.progress, index_queue=self.tasks,
                                                         index_key=TASK_KEY_PREFIX + task_id))

    @staticmethod
    def _answer(where: Whereabouts | None) -> dict[str, Any] | None:
        if where is None or not where.request_id:
            return None
        if where.item is not None and where.position is not None:
            base = {"request_id": where.request_id, "task_id": where.item.decoded()[0].get("task_id")}
            if where.position.pending:
                progress = _progress(where.progress)
                if not progress or progress.get("state") == "queued":  # not started (held ahead: --prefetch)
                    return {**base, **progress, "state": "queued", "position": 0}
                return {**base, "state": "running", **progress}
            return {**base, "state": "queued", "position": where.position.waiting}
        if where.result is None:
            return None
        tags, data, _ = where.result.decoded()
        try:
            result: Any = json.loads(data)
        except ValueError:
            result = None
        return {"request_id": where.request_id, "task_id": tags.get("task_id"), "state": final_state(tags, result),
                "result": result, "tags": tags}

    async def aclose(self) -> None:
        if self._background:
            await asyncio.wait(set(self._background), timeout=2.0)


def _progress(record: Item | None) -> dict[str, Any]:
    if record is None:
        return {}
    try:
        data = json.loads(record.decoded()[1])
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def final_state(tags: dict[str, str], result: Any) -> str:
    if tags.get(STATUS_TAG) == "success":
        return "succeeded"
    if isinstance(result, list) and result and isinstance(result[0], dict):
        data = result[0].get("data")
        if isinstance(data, dict) and data.get("exception_type") == CANCELLED:
            return CANCELLED
    return "failed"


STATUS_KEY = web.AppKey("api_task_status", TaskStatus)


class RemoteTaskIndex:
    """A stateless front writes the same ``{service}/tasks`` records over HTTP, so ``task_id`` lookups on
    the fronts that hold the store find the tasks it queued."""

    def __init__(self, queue_url: str, service: str, token: str | None) -> None:
        self.client = QueueClient(queue_url, tasks_of(service), token=token)

    async def remember(self, task_id: str, request_id: str) -> None:
        try:
            await self.client.put(request_id.encode(), {REQUEST_ID_TAG: TASK_KEY_PREFIX + task_id})
        except QueueClientError as exc:
            log.warning("task %r not indexed for /api_task: %s", task_id, exc)

    async def aclose(self) -> None:
        await self.client.aclose()


INDEX_KEY = web.AppKey("api_task_index", RemoteTaskIndex)


async def api_task(request: web.Request) -> web.StreamResponse:
    """``GET /api_task?task_id=T`` or ``?requestId=R``."""
    check_task_refs(request)
    status = request.app.get(STATUS_KEY)
    if status is None:
        raise json_error(501, "not_implemented", "task status is answered by the fronts that hold the queue "
                                                 "store (all-in-one, or several on one --redis-url)")
    task_id, request_id = request.query.get("task_id"), request.query.get(REQUEST_ID_TAG)
    if not task_id and not request_id:
        raise json_error(400, "bad_request", "give task_id or requestId")
    try:
        if request_id is None:
            answer = await status.status_of_task(str(task_id))
        else:
            answer = await status.status(request_id)
    except QueueError as exc:
        raise json_error(503, "queue_unavailable", str(exc), headers={"Retry-After": "1"}) from None
    if answer is None:
        raise json_error(404, "not_found", "no such task (or its result was already taken from the sink)")
    return web.json_response(answer)
