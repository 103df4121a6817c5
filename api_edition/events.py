"""``GET /api_events?task_id=T`` (repeatable, or ``requestId``): a task's events as Server-Sent Events.

Workers put each event of a running prompt (``execution_start``, ``executing``, ``progress``,
``executed``, ...) on ``{service}/events`` as it comes off the instance's socket, tagged with the
task's ``requestId`` (``progress`` at most every ``PROGRESS_EVERY_S`` and its last step), and a
``comfyserve_result`` record once the result is on the sink (the front's
cancel of a queued task puts one too). Every front holding the store tails that queue (one reader per
process, woken by the store's change notices: across processes on Redis too; each wake-up costs one store
round trip, which reads the new records and asks for the next wake-up) and hands each record to the
streams that asked for its task. So the stream reads the same on any front on one Redis.

A stream sends, per task: ``event: status`` (the ``GET /api_task`` answer) first, then each instance
event under its own type (``data``: the instance's event object plus ``task_id`` and ``request_id``),
and ``event: result`` (the ``GET /api_task`` answer with the result) at the end; it closes once every
task has its result. Comments (``: ping``) keep idle connections open. On shutdown the hub ends every
open stream with a ``: server shutting down`` comment (an open stream must not hold the front's exit).
The sink item is unchanged: one per task. The queue is trimmed to the newest ``EVENTS_KEEP`` records by the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from aiohttp import web

from queue_service.store import REQUEST_ID_TAG, QueueError, QueueStore
from standard.http_util import json_error
from standard.tasks import cancel_and_wait

from .progress import Records
from .settings import TASK_ID_TAG
from .status import STATUS_KEY, TaskStatus
from .task_ref import check_task_refs

log = logging.getLogger("comfyserve.api.events")

EVENTS_SUFFIX = "/events"
RESULT_EVENT = "comfyserve_result"
EVENTS_KEEP = 20_000
TRIM_EVERY = 1000
BATCH = 256
SEND_BATCH = 64
IDLE_WAIT_S = 1.0
PING_S = 15.0
MAX_TASKS = 100
PROGRESS_EVERY_S = 0.05
FINAL_STATES = ("succeeded", "failed", "cancelled")
CLOSED: tuple[str, dict[str, Any]] = ("", {})  # put on every stream by ``EventHub.aclose``: the stream ends


def events_of(service: str) -> str:
    return service + EVENTS_SUFFIX


def result_event(status: str) -> dict[str, Any]:
    return {"type": RESULT_EVENT, "data": {"status": status}}


class EventPublisher:
    """The worker's side: puts events in order, off the run's path (a slow store never holds a task)."""

    def __init__(self, records: Records) -> None:
        self.records = records
        self._outbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._sender: asyncio.Task[None] | None = None
        self._last_progress = 0.0

    def publish(self, request_id: str, event: dict[str, Any]) -> None:
        if event.get("type") == "progress" and not self._progress_due(event):
            return
        self._outbox.put_nowait((request_id, json.dumps(event, separators=(",", ":")).encode()))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send(), name="comfyserve-events")

    def _progress_due(self, event: dict[str, Any]) -> bool:
        """A sampler's progress comes per step: at most one per ``PROGRESS_EVERY_S``, and always the last."""
        data: dict[str, Any] = event["data"] if isinstance(event.get("data"), dict) else {}
        now = time.monotonic()
        if data.get("value") != data.get("max") and now - self._last_progress < PROGRESS_EVERY_S:
            return False
        self._last_progress = now
        return True

    async def _send(self) -> None:
        """Everything waiting goes in one ``put_many`` (one store round trip on the store): an event that
        arrives while the previous ones are written does not queue behind one round trip each."""
        while True:
            batch = [await self._outbox.get()]
            while len(batch) < SEND_BATCH and not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            try:
                indexes = await self.records.put_many(batch)
                if indexes and max(indexes) > EVENTS_KEEP and any(i % TRIM_EVERY == 0 for i in indexes):
                    await self.records.truncate(max(indexes) - EVENTS_KEEP)
            except Exception as exc:  # events are best effort: the sink result is the truth
                log.info("%d event(s) of %s not published: %r", len(batch), batch[0][0], exc)
            finally:
                for _ in batch:
                    self._outbox.task_done()

    async def aclose(self, timeout_s: float = 2.0) -> None:
        if self._sender is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._outbox.join()
            await cancel_and_wait(self._sender)
        await self.records.aclose()


class EventHub:
    """The front's side: one tail of ``{service}/events`` for all of this process's streams."""

    def __init__(self, store: QueueStore, service: str) -> None:
        self.store = store
        self.queue = events_of(service)
        self._streams: dict[str, set[asyncio.Queue[tuple[str, dict[str, Any]]]]] = {}
        self._tail: asyncio.Task[None] | None = None
        self._started = asyncio.Event()
        self._closed = False

    async def subscribe(self, request_id: str, stream: asyncio.Queue[tuple[str, dict[str, Any]]]) -> None:
        if self._closed:
            stream.put_nowait(CLOSED)
            return
        self._streams.setdefault(request_id, set()).add(stream)
        if self._tail is None or self._tail.done():
            self._started.clear()
            self._tail = asyncio.create_task(self._run(), name="comfyserve-events-tail")
        await self._started.wait()  # events from now on reach the stream

    def unsubscribe(self, request_id: str, stream: asyncio.Queue[tuple[str, dict[str, Any]]]) -> None:
        streams = self._streams.get(request_id)
        if streams is not None:
            streams.discard(stream)
            if not streams:
                del self._streams[request_id]

    async def _run(self) -> None:
        next_index: int | None = None
        while True:
            try:
                if next_index is None:
                    next_index = (await self.store.stats(self.queue)).last_index + 1
                    self._started.set()
                changed = self.store.changes(self.queue)
                items = await self.store.tail(self.queue, next_index, BATCH)  # read + re-arm: one round trip
            except QueueError as exc:
                log.warning("events tail: %s; retrying", exc)
                await asyncio.sleep(IDLE_WAIT_S)
                continue
            for item in items:
                next_index = item.index + 1
                tags, data, _ = item.decoded()
                request_id = tags.get(REQUEST_ID_TAG, "")
                streams = self._streams.get(request_id)
                if not streams:
                    continue
                try:
                    event = json.loads(data)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    for stream in list(streams):
                        stream.put_nowait((request_id, event))
            if len(items) < BATCH:  # drained and armed: the next change wakes us
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(IDLE_WAIT_S):
                        await changed.wait()

    async def aclose(self) -> None:
        """Stop the tail and end every open stream (the app's ``on_shutdown``: before handlers are awaited)."""
        self._closed = True
        if self._tail is not None:
            await cancel_and_wait(self._tail)
        for streams in self._streams.values():
            for stream in streams:
                stream.put_nowait(CLOSED)


HUB_KEY = web.AppKey("api_event_hub", EventHub)


def _sse(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def api_events(request: web.Request) -> web.StreamResponse:
    """``GET /api_events?task_id=A&task_id=B`` (or ``requestId=``): Server-Sent Events until every result."""
    check_task_refs(request)
    hub, status = request.app.get(HUB_KEY), request.app.get(STATUS_KEY)
    if hub is None or status is None:
        raise json_error(501, "not_implemented", "events are streamed by the fronts that hold the queue store")
    task_ids, request_ids = request.query.getall(TASK_ID_TAG, []), request.query.getall(REQUEST_ID_TAG, [])
    if not task_ids and not request_ids:
        raise json_error(400, "bad_request", "give task_id (or requestId), repeatable")
    if len(task_ids) + len(request_ids) > MAX_TASKS:
        raise json_error(400, "bad_request", f"at most {MAX_TASKS} tasks per stream")
    try:
        wanted = await _resolve(status, task_ids, request_ids)
    except QueueError as exc:
        raise json_error(503, "queue_unavailable", str(exc), headers={"Retry-After": "1"}) from None
    stream: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
    for request_id in wanted:
        await hub.subscribe(request_id, stream)
    try:
        return await _stream(request, status, stream, wanted)
    finally:
        for request_id in wanted:
            hub.unsubscribe(request_id, stream)


async def _resolve(status: TaskStatus, task_ids: list[str], request_ids: list[str]) -> dict[str, str]:
    """requestId -> task_id of every task asked for; 404 naming the first unknown one."""
    wanted: dict[str, str] = {}
    for task_id in task_ids:
        request_id = await status.request_id_of(task_id)
        if request_id is None:
            raise json_error(404, "not_found", f"no task {task_id!r}")
        wanted[request_id] = task_id
    for request_id in request_ids:
        wanted.setdefault(request_id, "")
    return wanted


async def _stream(request: web.Request, status: TaskStatus, stream: asyncio.Queue[tuple[str, dict[str, Any]]],
                  wanted: dict[str, str]) -> web.StreamResponse:
    open_tasks = set(wanted)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    first: list[bytes] = []
    for request_id in wanted:
        answer = await status.status(request_id)
        if answer is None:
            raise json_error(404, "not_found", f"no task with requestId {request_id!r}")
        wanted[request_id] = answer.get("task_id") or wanted[request_id]
        if answer["state"] in FINAL_STATES:
            first.append(_sse("result", answer))
            open_tasks.discard(request_id)
        else:
            first.append(_sse("status", answer))
    await response.prepare(request)
    for chunk in first:
        await response.write(chunk)
    while open_tasks:
        try:
            async with asyncio.timeout(PING_S):
                item = await stream.get()
        except TimeoutError:
            await response.write(b": ping\n\n")
            continue
        if item is CLOSED:  # the front shuts down: the client reconnects elsewhere or later
            await response.write(b": server shutting down\n\n")
            break
        request_id, event = item
        if request_id not in open_tasks:
            continue
        if event.get("type") == RESULT_EVENT:
            answer = await status.status(request_id) or {"request_id": request_id, "state": "unknown"}
            await response.write(_sse("result", answer))
            open_tasks.discard(request_id)
            continue
        payload = {**event, "request_id": request_id, "task_id": wanted[request_id]}
        await response.write(_sse(str(event.get("type")), payload))
    await response.write_eof()
    return response
