"""The queue calls a worker makes per task, over HTTP or straight on the store.

A split-deployment worker talks to the queue service over HTTP. In the
all-in-one the worker lives in the queue service's own process, so its sink
lookup, result put and input commit go straight to the store, without HTTP.
The watch stays a WebSocket either way: that is where the queue tracks
consumers, leases and redelivery.

``put_result_and_commit`` is the step that makes "exactly one result per
task" hold. On the store it is ONE atomic operation (``put_and_remove``), so a
worker that dies can leave the result and the commit both done or both
undone. Over HTTP it is two calls, put then commit, each safe to repeat:

- the put carries ``Idempotency-Key: <the input's requestId>``, so a put
  retried after an unsure answer (a 503 "may have been stored" while Redis
  stalls) answers the first put's index instead of storing a second result;
- a worker that dies between the put and the commit leaves its result on the
  sink and the input uncommitted; the redelivered input is looked up on the
  sink (``in_sink``: the queue's ``_lookup_``, which also knows results a
  client has committed since) before it runs, and is only committed.
"""

from __future__ import annotations

from typing import Protocol

from queue_service.client import QueueClient, QueueClientError, QueueFullError
from queue_service.protocol import encode_body
from queue_service.store import REQUEST_ID_TAG, QueueFull, QueueStore, StoreUnavailable
from standard.errors import WorkerError


class SinkFull(WorkerError):
    """The sink queue is at its max length: hold the result and retry."""


class ResultTooLarge(WorkerError):
    """The result exceeds the sink's payload limit."""


class Transient(WorkerError):
    """The queue could not be reached; retry."""


class Uncommitted(WorkerError):
    """The result is on the sink but the input's commit failed: retry the commit alone."""

    def __init__(self, sink_index: int, reason: str) -> None:
        super().__init__(reason)
        self.sink_index = sink_index


class QueueOps(Protocol):
    async def put_result_and_commit(self, data: bytes, tags: dict[str, str], index: int) -> int:
        """Put the result on the sink and commit input item ``index``; returns the sink index.

        Raises ``SinkFull`` / ``ResultTooLarge`` / ``Transient`` with nothing done (retry the
        whole call), or ``Uncommitted`` when only the commit is left to do.
        """

    async def commit(self, index: int) -> None: ...

    async def in_sink(self, request_id: str) -> bool: ...


class HttpQueueOps:
    def __init__(self, input_client: QueueClient, sink_client: QueueClient) -> None:
        self.input = input_client
        self.sink = sink_client

    async def put_result(self, data: bytes, tags: dict[str, str]) -> int:
        """Put the result under the input's requestId as its idempotency key: a retry stores nothing twice."""
        try:
            index, _ = await self.sink.put(data, tags, idempotency_key=tags[REQUEST_ID_TAG])
            return index
        except QueueFullError as exc:
            raise SinkFull(str(exc)) from exc
        except QueueClientError as exc:
            if exc.status == 413:
                raise ResultTooLarge(exc.message) from exc
            if exc.status == 0 or exc.status >= 500:
                raise Transient(str(exc)) from exc
            raise

    async def put_result_and_commit(self, data: bytes, tags: dict[str, str], index: int) -> int:
        """Two calls; a death between them is caught by ``in_sink`` when the input comes back."""
        sink_index = await self.put_result(data, tags)
        try:
            await self.commit(index)
        except Transient as exc:
            raise Uncommitted(sink_index, str(exc)) from exc
        return sink_index

    async def commit(self, index: int) -> None:
        try:
            await self.input.commit(index)
        except QueueClientError as exc:
            if exc.status == 404:
                return  # the queue is gone: nothing to commit
            raise Transient(str(exc)) from exc

    async def in_sink(self, request_id: str) -> bool:
        """A result with this requestId is on the sink or was committed from it recently."""
        try:
            return await self.sink.lookup(request_id) is not None
        except QueueClientError as exc:
            raise Transient(str(exc)) from exc


class StoreQueueOps:
    def __init__(self, store: QueueStore, service: str, *, max_length: int, max_payload_bytes: int) -> None:
        self.store = store
        self.input = service
        self.sink = service + "/sink"
        self.max_length = max_length
        self.max_payload_bytes = max_payload_bytes
        self._unsure: int | None = None  # the input whose last try failed without saying if it landed

    async def put_result_and_commit(self, data: bytes, tags: dict[str, str], index: int) -> int:
        """One store operation: the result lands and the input goes together, or neither does."""
        if len(data) > self.max_payload_bytes:
            raise ResultTooLarge(f"the body exceeds {self.max_payload_bytes} bytes")
        request_id = tags[REQUEST_ID_TAG]
        try:
            if self._unsure == index:
                if not await self._still_queued(index):
                    # The last try landed but its reply was lost (Redis): both happened, do not put again.
                    self._unsure = None
                    seen = await self.store.lookup(self.sink, request_id)
                    return seen.index if seen else 0
                self._unsure = None
            sink_index = await self.store.put_and_remove(self.sink, encode_body(tags, data), request_id, 0,
                                                         self.max_length, self.input, [index])
        except QueueFull as exc:
            raise SinkFull(str(exc)) from exc
        except StoreUnavailable as exc:
            self._unsure = index
            raise Transient(str(exc)) from exc
        self._unsure = None
        return sink_index

    async def _still_queued(self, index: int) -> bool:
        items = await self.store.get(self.input, index, 1, None)
        return bool(items) and items[0].index == index

    async def commit(self, index: int) -> None:
        try:
            await self.store.remove(self.input, [index])
        except StoreUnavailable as exc:
            raise Transient(str(exc)) from exc

    async def in_sink(self, request_id: str) -> bool:
        try:
            return await self.store.lookup(self.sink, request_id) is not None
        except StoreUnavailable as exc:
            raise Transient(str(exc)) from exc
