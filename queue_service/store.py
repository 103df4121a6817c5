"""The queue store interface and what both stores share.

A queue holds items under a monotonic index (1, 2, ...). An item is *ready*
until a watcher claims it; then it is *pending* on that consumer with a
deadline the consumer's live connection keeps pushing forward. A pending item
whose deadline passed is ready again (its consumer vanished). Commit, delete
and truncate remove items for good; an index is never reused.

A consumer (``gid/uid``) has one live *session* at a time: a reconnecting
watcher opens a new session, which takes over the old one's pending items
(they are sent again) and makes the old connection's next claim fail with
``Superseded`` — also across service processes on one Redis.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from standard.errors import ComfyServeError

from .protocol import decode_frame, encode_frame

# A watcher with tags looks at most this many ready items per claim for ones that match.
TAG_SCAN_LIMIT = 10_000
QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(?:/[A-Za-z0-9][A-Za-z0-9._-]{0,127})?$")
REQUEST_ID_TAG = "requestId"
# How long a put's dedup key is remembered (``put_once``): a client retrying within this time gets the
# first put's answer, whether or not that item was consumed since.
IDEMPOTENCY_TTL_S = 24 * 3600.0
# How long, and how many per queue, the requestIds of removed (committed, deleted) items are remembered
# (``lookup``): a worker handed an input again after its result was put and taken off the sink (it died
# between the put and the input's commit) finds the result was reported and commits, instead of re-running.
COMMITTED_TTL_S = 24 * 3600.0
COMMITTED_MAX = 100_000


class QueueError(ComfyServeError):
    """Root of the queue service's own errors."""


class QueueFull(QueueError):
    """A put was refused: the queue holds ``max_length`` items."""


class Superseded(QueueError):
    """The consumer opened a newer session (it reconnected); this one must stop."""


class StoreUnavailable(QueueError):
    """The backing store cannot be reached right now."""


@dataclass(frozen=True, slots=True)
class Item:
    """One stored item; ``body`` is its ``DataFrameProto`` without the index field."""

    index: int
    body: bytes

    def frame(self) -> bytes:
        return encode_frame(self.index, self.body)

    def decoded(self) -> tuple[dict[str, str], bytes, str]:
        _, tags, data, message = decode_frame(self.body)
        return tags, data, message

    def has_tags(self, wanted: dict[str, str]) -> bool:
        """True when every wanted tag is on the item with that value."""
        if not wanted:
            return True
        tags = self.decoded()[0]
        return all(tags.get(key) == value for key, value in wanted.items())


@dataclass(frozen=True, slots=True)
class PutOnce:
    """What ``put_once`` did: the item's index and requestId, and whether they are an earlier put's."""

    index: int
    request_id: str
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Seen:
    """Where the item put with a requestId is: on the queue (``committed=False``), or removed within
    ``COMMITTED_TTL_S`` (``committed=True``, among the queue's last ``COMMITTED_MAX`` removals)."""

    index: int
    committed: bool


@dataclass(frozen=True, slots=True)
class QueueStats:
    length: int
    first_index: int  # 0 when empty
    last_index: int  # the last index handed out (0 for a queue never written)
    consumers: int


@dataclass(frozen=True, slots=True)
class Position:
    """Where an item stands: ``pending`` = being processed; ``waiting`` = ready items ahead of it."""

    pending: bool
    waiting: int


@dataclass(frozen=True, slots=True)
class Whereabouts:
    """Where a request is, read in one store round trip (``QueueStore.whereabouts``).

    ``item``/``position``: its newest item on the input queue and where it stands (None when not
    there); ``progress``: the newest record with its requestId on the progress queue, read only when
    the item is pending; ``result``: its item on the sink, read only when it is not on the input queue.
    """

    request_id: str
    item: Item | None = None
    position: Position | None = None
    progress: Item | None = None
    result: Item | None = None


class QueueStore(Protocol):
    """What the server needs from a store. All methods are coroutines and never block the loop."""

    backend: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def put(self, queue: str, body: bytes, request_id: str, priority: int, max_length: int) -> int:
        """Append an item and return its index; raises ``QueueFull`` (max_length 0 = unbounded)."""

    async def put_once(self, queue: str, body: bytes, request_id: str, priority: int, max_length: int, *,
                       key: str, ttl_s: float = IDEMPOTENCY_TTL_S) -> PutOnce:
        """``put`` unless ``key`` was put on ``queue`` within ``ttl_s``: then nothing is written and the
        first put's index and requestId come back (``duplicate=True``). Check and put are one atomic
        step, so two concurrent puts with one key make one item. ``ttl_s <= 0`` remembers nothing.
        Raises ``QueueFull`` (and remembers nothing) when a new put does not fit."""

    async def get(self, queue: str, start_index: int, length: int, request_id: str | None) -> list[Item]:
        """Up to ``length`` items with index >= start_index, in index order (claimed or not)."""

    async def tail(self, queue: str, start_index: int, length: int) -> list[Item]:
        """``get`` for a reader that follows a queue: with fewer than ``length`` items back, it is also armed
        (``arm``) in the same round trip, so a wake-up costs the follower one store call, not three. Take
        ``changes`` before calling; wait on it only after a short answer."""

    async def lookup(self, queue: str, request_id: str) -> Seen | None:
        """The newest item with this requestId on the queue, else its removal if still remembered, else None."""

    async def remove(self, queue: str, indexes: list[int]) -> int:
        """Commit/delete: drop these items for good; returns how many existed. Every removal (here, in
        ``put_and_remove``, ``truncate`` and auto-commit claims) remembers the item's requestId (``lookup``)."""

    async def put_and_remove(self, put_queue: str, body: bytes, request_id: str, priority: int, max_length: int,
                             remove_queue: str, indexes: list[int]) -> int:
        """``put`` on one queue and ``remove`` on another as ONE atomic step; returns the put's index.

        A worker's "result on the sink, input committed": a crash can leave neither or both, never
        a result whose input comes back to be run again. A full ``put_queue`` raises ``QueueFull`` and
        removes nothing (back-pressure: the input stays with its consumer). Indexes that do not
        exist are ignored. Wakes the watchers of both queues, in every process.
        """

    async def truncate(self, queue: str, below_index: int) -> int:
        """Drop every item with index < below_index."""

    async def stats(self, queue: str) -> QueueStats: ...

    async def position(self, queue: str, index: int) -> Position | None: ...

    async def exists(self, queue: str) -> bool: ...

    async def whereabouts(self, queue: str, sink: str, progress: str, *, request_id: str | None = None,
                          index_queue: str | None = None, index_key: str | None = None) -> Whereabouts | None:
        """A request's input item + position, progress record and sink result, as ONE store round trip.

        Give ``request_id``, or ``index_queue`` + ``index_key``: the newest item put there with requestId
        ``index_key`` holds the request's requestId as its data (None when there is none). The input
        queue is read before the sink in the same atomic step, so a request moving between them (a
        worker's ``put_and_remove``) is found on one or the other."""

    async def open_session(self, queue: str, consumer: str, session: str, lease_s: float) -> list[Item]:
        """Make ``session`` the consumer's live one; returns its pending items (to send again)."""

    async def claim(self, queue: str, consumer: str, session: str, *, window: int, min_index: int,
                    auto_commit: bool, lease_s: float, tags: dict[str, str] | None = None) -> list[Item]:
        """Hand the consumer up to ``window`` minus its pending count ready items (priority first).

        With ``tags`` only items carrying all of them (among the first ``TAG_SCAN_LIMIT`` ready
        ones); the others stay ready for other watchers.
        With ``auto_commit`` the items are removed instead of becoming pending.
        Raises ``Superseded`` when ``session`` is no longer the consumer's live one.
        """

    async def pending(self, queue: str, consumer: str, session: str) -> list[Item]:
        """The consumer's pending items (to send again after a store hiccup); raises ``Superseded``."""

    async def renew(self, queue: str, consumer: str, session: str, lease_s: float) -> None:
        """Push the deadlines of the consumer's pending items; raises ``Superseded``."""

    async def release(self, queue: str, consumer: str, session: str) -> None:
        """The watcher left on purpose: its pending items are ready again now."""

    async def forget(self, queue: str, consumer: str, session: str) -> None:
        """The watcher's connection ended without a goodbye: drop the session record if it is still
        the live one; its pending items stay with the consumer until their lease runs out."""

    def changes(self, queue: str) -> asyncio.Event:
        """An event set at the queue's next change (put, removal, release). Take it *before* looking."""

    async def arm(self, queue: str) -> None:
        """Ask for a wake-up from other processes at the next change (then look once more before waiting)."""


class Notifier:
    """Per-queue wake-ups for waiting watchers and long-poll gets in this process."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def notify(self, queue: str) -> None:
        event = self._events.pop(queue, None)
        if event is not None:
            event.set()

    def notify_all(self) -> None:
        events, self._events = self._events, {}
        for event in events.values():
            event.set()

    def event(self, queue: str) -> asyncio.Event:
        event = self._events.get(queue)
        if event is None:
            event = self._events[queue] = asyncio.Event()
        return event


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """True if ``event`` was set within ``timeout_s``."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(timeout_s):  # not wait_for: on 3.11 it can swallow a cancel landing with the set
            await event.wait()
    except TimeoutError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class PutRequest:
    body: bytes
    request_id: str
    priority: int
    max_length: int


FULL = -1  # a batch result: this put was refused, the queue is full
PutFlush = Callable[[str, list[PutRequest]], Awaitable[list[int]]]


class PutBatcher:
    """Natural batching of puts: one store round trip (one transaction, one Lua call) per batch.

    The first put of an idle queue goes out at once; puts that arrive while a
    batch is being written go out together in the next one. So a lone put pays
    no wait, and concurrent producers share round trips.
    """

    def __init__(self, flush: PutFlush, *, max_batch: int = 256) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._waiting: dict[str, list[tuple[PutRequest, asyncio.Future[int]]]] = {}
        self._running: dict[str, asyncio.Task[None]] = {}

    async def put(self, queue: str, request: PutRequest) -> int:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(queue, []).append((request, future))
        if queue not in self._running:
            self._running[queue] = asyncio.create_task(self._drain(queue))
        # A put whose client left is still written exactly once: the drain task owns the write,
        # and a cancelled future is only skipped when the results come back.
        index = await future
        if index == FULL:
            raise QueueFull(f"queue {queue!r} is full ({request.max_length} items)")
        return index

    async def _drain(self, queue: str) -> None:
        try:
            while waiting := self._waiting.get(queue):
                batch, self._waiting[queue] = waiting[:self._max_batch], waiting[self._max_batch:]
                try:
                    results = await self._flush(queue, [request for request, _ in batch])
                except BaseException as exc:  # noqa: BLE001 - handed to every waiter
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                for (_, future), index in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(index)
        finally:
            self._running.pop(queue, None)
            for _, future in self._waiting.pop(queue, []):  # only left over when cancelled (store closing)
                if not future.done():
                    future.set_exception(StoreUnavailable("the store is closing"))
