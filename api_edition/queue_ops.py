"""The three queue calls a worker makes per task, over HTTP or straight on the store.

A split-deployment worker talks to the queue service over HTTP. In the
all-in-one the worker lives in the queue service's own process, so its sink
put, input commit and sink lookup go straight to the store — three round
trips fewer per task. The watch stays a WebSocket either way: that is where
the queue tracks consumers, leases and redelivery.
"""

from __future__ import annotations

from typing import Protocol

from queue_service.client import QueueClient, QueueClientError, QueueFullError
from queue_service.protocol import encode_body
from queue_service.store import REQUEST_ID_TAG, QueueFull, QueueStore, StoreUnavailable


class SinkFull(Exception):
    """The sink queue is at its max length: hold the result and retry."""


class ResultTooLarge(Exception):
    """The result exceeds the sink's payload limit."""


class Transient(Exception):
    """The queue could not be reached; retry."""


class QueueOps(Protocol):
    async def put_result(self, data: bytes, tags: dict[str, str]) -> int: ...

    async def commit(self, index: int) -> None: ...

    async def in_sink(self, request_id: str) -> bool: ...


class HttpQueueOps:
    def __init__(self, input_client: QueueClient, sink_client: QueueClient) -> None:
        self.input = input_client
        self.sink = sink_client

    async def put_result(self, data: bytes, tags: dict[str, str]) -> int:
        try:
            index, _ = await self.sink.put(data, tags)
            return index
        except QueueFullError as exc:
            raise SinkFull(str(exc)) from exc
        except QueueClientError as exc:
            if exc.status == 413:
                raise ResultTooLarge(exc.message) from exc
            if exc.status == 0 or exc.status >= 500:
                raise Transient(str(exc)) from exc
            raise

    async def commit(self, index: int) -> None:
        try:
            await self.input.commit(index)
        except QueueClientError as exc:
            if exc.status == 404:
                return  # the queue is gone: nothing to commit
            raise Transient(str(exc)) from exc

    async def in_sink(self, request_id: str) -> bool:
        try:
            return bool(await self.sink.get(0, 1, request_id=request_id))
        except QueueClientError as exc:
            if exc.status == 404:
                return False
            raise Transient(str(exc)) from exc


class StoreQueueOps:
    def __init__(self, store: QueueStore, service: str, *, max_length: int, max_payload_bytes: int) -> None:
        self.store = store
        self.input = service
        self.sink = service + "/sink"
        self.max_length = max_length
        self.max_payload_bytes = max_payload_bytes

    async def put_result(self, data: bytes, tags: dict[str, str]) -> int:
        if len(data) > self.max_payload_bytes:
            raise ResultTooLarge(f"the body exceeds {self.max_payload_bytes} bytes")
        try:
            return await self.store.put(self.sink, encode_body(tags, data), tags[REQUEST_ID_TAG], 0,
                                        self.max_length)
        except QueueFull as exc:
            raise SinkFull(str(exc)) from exc
        except StoreUnavailable as exc:
            raise Transient(str(exc)) from exc

    async def commit(self, index: int) -> None:
        try:
            await self.store.remove(self.input, [index])
        except StoreUnavailable as exc:
            raise Transient(str(exc)) from exc

    async def in_sink(self, request_id: str) -> bool:
        try:
            return bool(await self.store.get(self.sink, 0, 1, request_id))
        except StoreUnavailable as exc:
            raise Transient(str(exc)) from exc
