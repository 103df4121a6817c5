"""``POST /api_task/cancel?task_id=T`` (or ``requestId``): stop a task; its sink result says ``cancelled``.

The cancelled result is an error result like the others (tag ``status=error``), whose one event is an
``execution_error`` with ``exception_type: "cancelled"``; ``GET /api_task`` answers ``cancelled``.

- Queued: the front claims that very item on the input queue (a watcher's claim filtered by its
  ``requestId``: atomic, so no worker can take it meanwhile), then puts the cancelled result and removes
  the item in one store step. Nothing runs.
- Running (or claimed by a worker an instant before): the front leaves a record on ``{service}/cancel``.
  The worker holding the task looks for one as the run starts and every ``POLL_S`` while it runs; on
  seeing it, it interrupts that prompt on its instance (only that one) and reports the cancelled result
  itself. A task not yet started is not run at all.
- Finished: nothing changes; the answer gives its state. Cancelling again is harmless (idempotent).

Task ids are per service, not per client: whoever holds the service token may cancel any task of the
service. ``/api/predict/{service}/api_task/cancel`` of another service answers 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from queue_service.protocol import encode_body
from queue_service.store import REQUEST_ID_TAG, QueueError, QueueFull, QueueStore
from standard.http_util import json_error
from standard.tasks import cancel_and_wait

from . import results
from .events import events_of, result_event
from .progress import Records, StoreRecords
from .settings import TASK_ID_TAG, sink_of
from .status import CANCELLED, STATUS_KEY, TaskStatus
from .task_ref import check_task_refs

log = logging.getLogger("comfyserve.api.cancel")

CANCEL_SUFFIX = "/cancel"
POLL_S = 0.25
CLAIM_LEASE_S = 30.0
MESSAGE = "cancelled by a client (POST /api_task/cancel)"


def cancel_of(service: str) -> str:
    return service + CANCEL_SUFFIX


def cancelled_result() -> tuple[str, bytes]:
    status, events = results.from_failure(CANCELLED, MESSAGE)
    return status, results.encode(events)


class Canceller:
    """The front's side, straight on the store."""

    def __init__(self, store: QueueStore, service: str, max_length: int, status: TaskStatus) -> None:
        self.store = store
        self.service = service
        self.sink = sink_of(service)
        self.max_length = max_length
        self.status = status
        self.records = StoreRecords(store, cancel_of(service))
        self.events = StoreRecords(store, events_of(service))

    async def cancel(self, request_id: str) -> bool:
        """True when this call stopped the task (queued: removed; running: the worker is told)."""
        found = await self.store.get(self.service, 0, 1, request_id)
        if not found:
            return False
        if await self._take_queued(found[0].index, request_id):
            return True
        await self.records.put(request_id, b"{}")
        return True

    async def _take_queued(self, index: int, request_id: str) -> bool:
        consumer, session = f"comfyserve-cancel/{uuid.uuid4().hex}", uuid.uuid4().hex
        await self.store.open_session(self.service, consumer, session, CLAIM_LEASE_S)
        try:
            claimed = await self.store.claim(self.service, consumer, session, window=1, min_index=index,
                                             auto_commit=False, lease_s=CLAIM_LEASE_S,
                                             tags={REQUEST_ID_TAG: request_id})
            if not claimed:
                return False  # a worker has it (or it is past the tag scan): the worker is told instead
            tags = claimed[0].decoded()[0]
            status, data = cancelled_result()
            tags = {**tags, results.STATUS_TAG: status, TASK_ID_TAG: tags.get(TASK_ID_TAG) or request_id}
            tags.pop("webhook", None)
            try:
                await self.store.put_and_remove(self.sink, encode_body(tags, data), request_id, 0, self.max_length,
                                                self.service, [claimed[0].index])
            except QueueFull:
                raise web.HTTPServiceUnavailable(reason="the sink is full", headers={"Retry-After": "1"}) from None
            with contextlib.suppress(QueueError):  # streams of this task end with its result
                await self.events.put(request_id, json.dumps(result_event(status)).encode())
            return True
        finally:
            with contextlib.suppress(QueueError):
                await self.store.release(self.service, consumer, session)


CANCELLER_KEY = web.AppKey("api_canceller", Canceller)


async def api_task_cancel(request: web.Request) -> web.StreamResponse:
    """``POST /api_task/cancel?task_id=T`` or ``?requestId=R``: 200 with the task's state, 404 unknown."""
    check_task_refs(request)
    canceller = request.app.get(CANCELLER_KEY)
    status = request.app.get(STATUS_KEY)
    if canceller is None or status is None:
        raise json_error(501, "not_implemented", "cancel is answered by the fronts that hold the queue store")
    service = request.match_info.get("service")
    if service is not None and service != canceller.service:
        raise json_error(404, "not_found", f"no service {service!r} here (task ids are per service)")
    task_id, request_id = request.query.get(TASK_ID_TAG), request.query.get(REQUEST_ID_TAG)
    if not task_id and not request_id:
        raise json_error(400, "bad_request", "give task_id or requestId")
    try:
        if request_id is None:
            request_id = await status.request_id_of(str(task_id))
        if request_id is None:
            raise json_error(404, "not_found", "no such task")
        stopped = await canceller.cancel(request_id)
        answer = await status.status(request_id)
    except QueueError as exc:
        raise json_error(503, "queue_unavailable", str(exc), headers={"Retry-After": "1"}) from None
    if answer is None:
        raise json_error(404, "not_found", "no such task (or its result was already taken from the sink)")
    answer.pop("result", None)
    return web.json_response({**answer, "cancel_requested": stopped})


@dataclass
class Watch:
    requested: bool = False


class CancelWatch:
    """The worker's side: is the running task's cancel record there?"""

    def __init__(self, records: Records) -> None:
        self.records = records

    @contextlib.asynccontextmanager
    async def watching(self, request_id: str, interrupt: Callable[[], Awaitable[None]]) -> AsyncIterator[Watch]:
        watch = Watch(requested=await self._asked(request_id))
        poller = asyncio.create_task(self._poll(request_id, watch, interrupt))
        try:
            yield watch
        finally:
            await cancel_and_wait(poller)

    async def _asked(self, request_id: str) -> bool:
        try:
            return bool(await self.records.find(request_id))
        except Exception as exc:  # a lookup that fails is retried at the next poll
            log.info("cancel lookup of %s failed: %r", request_id, exc)
            return False

    async def _poll(self, request_id: str, watch: Watch, interrupt: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            if watch.requested or await self._asked(request_id):
                watch.requested = True
                with contextlib.suppress(Exception):
                    await interrupt()  # again at each poll until the run ends: the prompt may not be up yet

    async def forget(self, request_id: str) -> None:
        """The task is reported: its cancel records go."""
        with contextlib.suppress(Exception):
            indexes = await self.records.find(request_id)
            if indexes:
                await self.records.drop(indexes)

    async def aclose(self) -> None:
        await self.records.aclose()
