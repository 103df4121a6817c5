"""Where the front puts accepted tasks: the local store (all-in-one) or a remote queue service.

Both answer like the queue's own put: (index, requestId), ``QueueFull`` when
the input queue is at its max length. With an idempotency key, a key the queue
saw within ``IDEMPOTENCY_TTL_S`` answers that put's (index, requestId) and
queues nothing (``QueueStore.put_once``).
"""

from __future__ import annotations

import uuid
from typing import Protocol

from queue_service.client import QueueClient, QueueClientError, QueueFullError
from queue_service.protocol import encode_body
from queue_service.store import REQUEST_ID_TAG, QueueFull, QueueStore, StoreUnavailable
from standard.errors import WorkerError


class InboxUnavailable(WorkerError):
    """The queue could not take the task for a reason other than being full."""


class Inbox(Protocol):
    async def put(self, data: bytes, tags: dict[str, str], priority: int,
                  idempotency_key: str | None = None) -> tuple[int, str]: ...

    async def depths(self) -> dict[str, int]:
        """Queue name -> length, for /metrics (empty when unknown)."""

    async def aclose(self) -> None: ...


class StoreInbox:
    """The all-in-one front writes straight into the queue service's store (no extra hop)."""

    def __init__(self, store: QueueStore, service: str, max_length: int) -> None:
        self.store = store
        self.queues = (service, service + "/sink")
        self.max_length = max_length

    async def put(self, data: bytes, tags: dict[str, str], priority: int,
                  idempotency_key: str | None = None) -> tuple[int, str]:
        request_id = tags.get(REQUEST_ID_TAG) or str(uuid.uuid4())
        tags = {**tags, REQUEST_ID_TAG: request_id}
        body, priority = encode_body(tags, data), 1 if priority > 0 else 0
        try:
            if idempotency_key is None:
                return await self.store.put(self.queues[0], body, request_id, priority, self.max_length), request_id
            once = await self.store.put_once(self.queues[0], body, request_id, priority, self.max_length,
                                             key=idempotency_key)
        except StoreUnavailable as exc:
            raise InboxUnavailable(str(exc)) from exc
        return once.index, once.request_id

    async def depths(self) -> dict[str, int]:
        out = {}
        for queue in self.queues:
            try:
                out[queue] = (await self.store.stats(queue)).length
            except StoreUnavailable:
                pass
        return out

    async def aclose(self) -> None:
        return None


class RemoteInbox:
    """A stateless front: puts go to the queue service over HTTP."""

    def __init__(self, queue_url: str, service: str, token: str | None) -> None:
        self.input = QueueClient(queue_url, service, token=token, uid=f"front-{uuid.uuid4().hex[:12]}")
        self.sink = QueueClient(queue_url, service + "/sink", token=token, uid=self.input.uid)
        self.names = (service, service + "/sink")

    async def put(self, data: bytes, tags: dict[str, str], priority: int,
                  idempotency_key: str | None = None) -> tuple[int, str]:
        try:
            return await self.input.put(data, tags, priority=priority, idempotency_key=idempotency_key)
        except QueueFullError as exc:
            raise QueueFull(exc.message) from exc
        except QueueClientError as exc:
            raise InboxUnavailable(str(exc)) from exc

    async def depths(self) -> dict[str, int]:
        out = {}
        for name, client in zip(self.names, (self.input, self.sink), strict=True):
            try:
                out[name] = int((await client.attributes()).get("stream.length", 0))
            except (QueueClientError, ValueError):
                pass
        return out

    async def aclose(self) -> None:
        await self.input.aclose()
        await self.sink.aclose()
