"""A worker's live view of its running task, for ``GET /api_task``: ``{service}/progress`` records.

While a task runs, its worker keeps one record on ``{service}/progress`` (``requestId`` = the task's):
``{"worker", "instance", "node", "progress": {"value", "max"}}``, from the instance's ``executing`` and
``progress`` events. A task the worker queued on its instance behind the running one (``--prefetch``)
has ``{"worker", "instance", "state": "queued"}`` until its ``execution_start``. Nothing is written before
the worker knows which of the two a task is (its prompt goes to the instance), and a record never goes back
from running to queued: a client polling ``GET /api_task`` sees a task's states in order. Writes are throttled
(at most one per ``MIN_INTERVAL_S``; the last state always lands) and each replaces the previous
record (put, then delete the old one: a reader sees one or the other). The worker removes the record
once the task's result is on the sink (a task held with no record reads queued, so it must not lose its
record between its run and its report), after the write under way, if any, has landed; one left by a
killed worker is replaced by the next run of the task and never read once the task is off the input queue.

All-in-one workers write the store directly; a split-deployment worker over the queue service's HTTP API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

from queue_service.client import QueueClient, QueueClientError
from queue_service.protocol import encode_body
from queue_service.store import REQUEST_ID_TAG, QueueError, QueueStore
from standard.tasks import cancel_and_wait, finish

log = logging.getLogger("comfyserve.api.progress")

MIN_INTERVAL_S = 0.2
LOOKUP_LENGTH = 16


class Records(Protocol):
    """put / find-by-requestId / drop on one queue of records."""

    async def put(self, request_id: str, data: bytes) -> int: ...

    async def put_many(self, records: list[tuple[str, bytes]]) -> list[int]:
        """``put`` each (request_id, data) in order; their indexes."""

    async def find(self, request_id: str) -> list[int]: ...

    async def truncate(self, below: int) -> None: ...

    async def drop(self, indexes: list[int]) -> None: ...

    async def aclose(self) -> None: ...


class StoreRecords:
    def __init__(self, store: QueueStore, queue: str) -> None:
        self.store = store
        self.queue = queue

    async def put(self, request_id: str, data: bytes) -> int:
        return await self.store.put(self.queue, encode_body({REQUEST_ID_TAG: request_id}, data), request_id, 0, 0)

    async def put_many(self, records: list[tuple[str, bytes]]) -> list[int]:
        # Started together, in order: the store's put batcher writes them in one round trip, in that order.
        return list(await asyncio.gather(*(self.put(request_id, data) for request_id, data in records)))

    async def find(self, request_id: str) -> list[int]:
        return [item.index for item in await self.store.get(self.queue, 0, LOOKUP_LENGTH, request_id)]

    async def truncate(self, below: int) -> None:
        await self.store.truncate(self.queue, below)

    async def drop(self, indexes: list[int]) -> None:
        await self.store.remove(self.queue, indexes)

    async def aclose(self) -> None:
        return None


class HttpRecords:
    def __init__(self, client: QueueClient) -> None:
        self.client = client

    async def put(self, request_id: str, data: bytes) -> int:
        index, _ = await self.client.put(data, {REQUEST_ID_TAG: request_id})
        return index

    async def put_many(self, records: list[tuple[str, bytes]]) -> list[int]:
        return [await self.put(request_id, data) for request_id, data in records]  # HTTP puts may race: one by one

    async def find(self, request_id: str) -> list[int]:
        try:
            return [frame.index for frame in await self.client.get(0, LOOKUP_LENGTH, request_id=request_id)]
        except QueueClientError as exc:
            if exc.status == 404:  # the queue does not exist yet: nothing recorded
                return []
            raise

    async def truncate(self, below: int) -> None:
        await self.client.truncate(below)

    async def drop(self, indexes: list[int]) -> None:
        await self.client.delete(indexes)

    async def aclose(self) -> None:
        await self.client.aclose()


def _initial(queued: bool) -> dict[str, Any]:
    return {"state": "queued"} if queued else {"node": None}


class _Run:
    """One task's record while its worker holds it."""

    def __init__(self, request_id: str, queued: bool | None) -> None:
        self.request_id = request_id
        # Queued behind another task on the instance: ``GET /api_task`` says queued until its execution_start.
        # None: not known yet, nothing to write (``GET /api_task`` says queued while there is no record).
        self.state: dict[str, Any] | None = None if queued is None else _initial(queued)
        self.dirty = asyncio.Event()
        if self.state is not None:
            self.dirty.set()
        self.written: int | None = None

    def is_queued(self) -> bool:
        return self.state is None or self.state.get("state") == "queued"


class TaskProgress:
    """One per worker; ``event`` is fed the instance's events of the prompts it runs (``InstanceRunner``),
    each with the request it belongs to."""

    def __init__(self, records: Records, worker: str, instance: str) -> None:
        self.records = records
        self.base = {"worker": worker, "instance": instance}
        self._runs: dict[str, _Run] = {}

    @contextlib.asynccontextmanager
    async def running(self, request_id: str, *, queued: bool | None = False) -> AsyncIterator[None]:
        """The task's record while the block runs: from the start (running, or ``queued`` behind another),
        or, with ``queued=None``, from the ``queued`` call that says which (the worker: once its prompt goes
        to the instance). Removed at the end."""
        run = self._runs[request_id] = _Run(request_id, queued)
        writer = asyncio.create_task(self._write_loop(run))
        try:
            yield
        finally:
            try:
                await cancel_and_wait(writer)  # it ends between writes: a write under way lands first
            finally:  # even when the run's own cancel came meanwhile: the last record written goes
                if self._runs.get(request_id) is run:
                    del self._runs[request_id]
                if run.written is not None:
                    await self._drop([run.written])

    def queued(self, request_id: str, queued: bool) -> None:
        """Whether the task waits behind another on the instance, as its prompt goes there. Never back from
        running to queued."""
        run = self._runs.get(request_id)
        if run is None or (run.state is not None and (queued or not run.is_queued())):
            return
        run.state = _initial(queued)
        run.dirty.set()

    def event(self, request_id: str, item: dict[str, Any]) -> None:
        run = self._runs.get(request_id)
        kind, data = item.get("type"), item.get("data")
        if run is None or not isinstance(data, dict):
            return
        if kind == "execution_start":
            if not run.is_queued():
                return
            run.state = {"node": None}
        elif kind == "executing" and data.get("node") is not None:
            run.state = {"node": str(data["node"])}
        elif kind == "progress":
            run.state = {**(run.state or {}), "progress": {"value": data.get("value"), "max": data.get("max")}}
            run.state.pop("state", None)
            if data.get("node") is not None:
                run.state["node"] = str(data["node"])
        else:
            return
        run.dirty.set()

    async def _write_loop(self, run: _Run) -> None:
        while True:
            await run.dirty.wait()
            run.dirty.clear()
            data = json.dumps({**self.base, **(run.state or {})}, separators=(",", ":")).encode()
            # Never cut in the middle: a put whose cancel came while it was under way still lands (the
            # store owns the write), and with its index unknown nothing would ever remove that record.
            await finish(self._write(run, data))
            await asyncio.sleep(MIN_INTERVAL_S)

    async def _write(self, run: _Run, data: bytes) -> None:
        """Put the record, then drop the one it replaces."""
        try:
            index = await self.records.put(run.request_id, data)
        except (QueueError, QueueClientError) as exc:
            log.info("progress of %s not recorded: %s", run.request_id, exc)
            return
        if run.written is not None:
            await self._drop([run.written])
        run.written = index

    async def _drop(self, indexes: list[int]) -> None:
        with contextlib.suppress(QueueError, QueueClientError):
            await self.records.drop(indexes)

    async def aclose(self) -> None:
        await self.records.aclose()
