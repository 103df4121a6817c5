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
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from standard.errors import ComfyServeError

from .protocol import decode_frame, encode_frame

log = logging.getLogger("comfyserve.queue")
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
                    auto_commit: bool, lease_s: float, tags: dict[str, str] | None = None,
                    handoff: bool = True) -> list[Item]:
        """Hand the consumer up to ``window`` minus its pending count ready items (priority first).

        With ``tags`` only items carrying all of them (among the first ``TAG_SCAN_LIMIT`` ready
        ones); the others stay ready for other watchers.
        With ``auto_commit`` the items are removed instead of becoming pending.
        Raises ``Superseded`` when ``session`` is no longer the consumer's live one.
        From its first claim until ``release``/``forget`` the consumer is a taker (``Handoff``): puts in
        this process claim for it too, and its next claim returns what they got. ``handoff=False``: not a
        taker, for a watcher whose terms are decided afresh at each claim from what the store does not see
        (``affinity``: an idle peer, an overdue head, a finishing item): a put claiming with its last claim's
        terms would take items those decisions leave to other watches or for later.
        """

    async def pending(self, queue: str, consumer: str, session: str) -> list[Item]:
        """The consumer's pending items (to send again after a store hiccup); raises ``Superseded``."""

    async def renew(self, queue: str, consumer: str, session: str, lease_s: float) -> None:
        """Push the deadlines of the consumer's pending items; raises ``Superseded``."""

    async def release(self, queue: str, consumer: str, session: str) -> None:
        """The watcher left on purpose: its pending items are ready again now."""

    async def release_one(self, queue: str, consumer: str, session: str, index: int) -> bool:
        """A watcher hands one item back (``handback``): ready again now, atomically, if it is pending on
        ``consumer`` and ``session`` is the consumer's live one; else nothing changes (False). Like
        ``release``, for one item: its next claim hands it out as it would any released item."""

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


@dataclass(frozen=True, slots=True)
class ClaimSpec:
    """What a watcher asks of each claim; fixed for the life of one watch."""

    window: int
    min_index: int
    auto_commit: bool
    lease_s: float
    tags: tuple[tuple[str, str], ...] = ()

    def tag_dict(self) -> dict[str, str] | None:
        return dict(self.tags) or None


@dataclass(slots=True, eq=False)
class Taker:
    """A watcher of this process that puts claim for (see ``Handoff``)."""

    queue: str
    consumer: str
    session: str
    spec: ClaimSpec
    items: list[Item] = field(default_factory=list)  # claimed for it by puts, not yet handed to it
    error: QueueError | None = None  # a claim made for it failed (Superseded, StoreUnavailable)
    # Set at the first change after its last claim drained the queue; until then a claim finds nothing.
    quiet: asyncio.Event | None = None
    # Its last claim (its own or a put's for it) drained what was ready for it, with room left in its window:
    # puts claim for it until it takes what they got. Puts claim only for waiting takers; a busy watcher
    # (it took items and has not come back) claims for itself when it comes back, and a claim for it
    # meanwhile would cost Redis work.
    waiting: bool = False
    # Its last claim drained what was ready for it with room left in its window (``waiting`` is cleared while
    # it is busy with what it took; this stays).
    drained: bool = False
    # Set at the first change (removals included) after its last claim; None when one came during the claim.
    calm: asyncio.Event | None = None
    # Only removals changed the queue since its last claim (``Handoff.removed``): the next claim is answered
    # empty without a round trip (once per claim the store answered).
    removals_only: bool = False
    may_skip: bool = False


class Handoff:
    """Puts that claim for this process's watchers in the same store round trip (the hand-off).

    A watcher that claimed on a queue is a *taker* there until it leaves. A batch of puts on
    that queue also runs the claim of each taker that waits (its last claim, its own or a put's for
    it, drained what was ready for it with room left in its window) right after the puts, in the
    same round trip (one Redis script, one SQLite thread hop), and keeps what it got for the taker,
    adding to what earlier puts got that the watcher has not taken yet; the watcher's
    next ``claim`` returns that without asking the store. So an item put while a watcher waits
    reaches it after one store round trip instead of two, and a busy watcher's claims ride on
    the producers' round trips. The claims are the store's ordinary ones (session check, window,
    priority, tags): pending items claimed for a watcher that then leaves go back like any
    pending item (``release`` or the lease), as after a claim whose frame could not be sent.

    The same record remembers when a watcher's last claim drained the queue: until the next
    change its next claim is answered empty without a round trip (once; then it asks again,
    because expired leases elsewhere make items ready without a change notice).
    """

    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier
        self._takers: dict[str, dict[tuple[str, str], Taker]] = {}

    def taken(self, queue: str, consumer: str, session: str, spec: ClaimSpec) -> list[Item] | None:
        """The claim's answer without the store, or None: ask the store. Raises a hand-off claim's error."""
        taker = self._takers.get(queue, {}).get((consumer, session))
        if taker is None or taker.spec != spec:
            return None
        if taker.error is not None:
            error, taker.error = taker.error, None
            raise error
        if taker.items:
            items, taker.items = taker.items, []
            taker.waiting = False
            return items
        if taker.quiet is not None:
            quiet, taker.quiet = taker.quiet, None
            if not quiet.is_set():
                taker.waiting = True
                return []
        if taker.removals_only:
            taker.removals_only = False
            if taker.calm is not None and not taker.calm.is_set():
                taker.waiting = True
                return []
        return None

    def claimed(self, queue: str, consumer: str, session: str, spec: ClaimSpec, got: bool, drained: bool,
                changed_meanwhile: bool) -> None:
        """After the watcher's own claim, which ``got`` items or not and ``drained`` what was ready for it
        (took fewer than its window allowed), with or without a change of the queue during the call: it is a
        taker. Call after notifying any change the claim made."""
        takers = self._takers.setdefault(queue, {})
        taker = takers.get((consumer, session))
        if taker is None or taker.spec != spec:
            taker = takers[(consumer, session)] = Taker(queue, consumer, session, spec)
        self._settle(taker, got, drained, changed_meanwhile)

    def _settle(self, taker: Taker, got: bool, drained: bool, changed_meanwhile: bool) -> None:
        calm = self._notifier.event(taker.queue) if not changed_meanwhile else None
        taker.quiet = calm if got and drained else None
        taker.calm = calm
        taker.drained = drained
        taker.removals_only = False
        taker.may_skip = True
        # Nothing left for it and room in its window: the next puts claim for it, also while what a put got
        # for it waits to be taken (puts come in batches back to back, faster than the watcher comes back).
        # A full window waits for a commit, whose change wakes it; claims for it before that would find nothing.
        taker.waiting = drained

    def takers(self, queue: str) -> list[Taker]:
        """The waiting takers a batch of puts on ``queue`` claims for, in turn: the first one claims first
        and the next batch starts with the next one, so items spread over the watchers instead of all going
        to the first."""
        takers = self._takers.get(queue)
        if not takers:
            return []
        chosen = [taker for taker in takers.values() if taker.waiting and taker.error is None]
        if len(takers) > 1:
            first = next(iter(takers))
            takers[first] = takers.pop(first)
        return chosen

    def handed(self, taker: Taker, items: list[Item], drained: bool, changed_meanwhile: bool) -> None:
        """A put's claim for ``taker`` got ``items``; call after notifying the queue's change."""
        if taker is not self._takers.get(taker.queue, {}).get((taker.consumer, taker.session)):
            return  # the watcher left meanwhile; a pending item goes back through release or its lease
        taker.items += items
        self._settle(taker, bool(items), drained, changed_meanwhile)

    def removed(self, queue: str) -> None:
        """Notify a change of ``queue`` that only removed items (commit, delete, truncate, auto-commit claim).
        A removal makes nothing ready: a taker whose last claim drained what was ready for it, and that saw no
        other change since, need not ask the store again when it wakes (once per claim the store answered: then
        it asks, for leases that ran out meanwhile, which no notice tells of). Not for a taker with tags: its
        claims look at a bounded number of ready items, which removals can bring matching ones into."""
        calm = [taker for taker in self._takers.get(queue, {}).values()
                if taker.drained and taker.may_skip and not taker.spec.tags and taker.error is None
                and taker.calm is not None and not taker.calm.is_set()]
        self._notifier.notify(queue)
        if calm:
            fresh = self._notifier.event(queue)
            for taker in calm:
                taker.calm = fresh
                taker.removals_only = True
                taker.may_skip = False

    def failed(self, taker: Taker, error: QueueError) -> None:
        """A put's claim for ``taker`` failed or may not have run: the watcher's next claim raises ``error``."""
        taker.error = error
        taker.quiet = taker.calm = None
        taker.waiting = taker.drained = taker.removals_only = False

    def leave(self, queue: str, consumer: str, session: str) -> None:
        """The watcher is gone (release, forget). Auto-commit items claimed for it and not yet taken are
        lost with it, as with a claim whose frames could not be sent."""
        takers = self._takers.get(queue)
        if takers is None:
            return
        taker = takers.pop((consumer, session), None)
        if not takers:
            del self._takers[queue]
        if taker is not None and taker.items and taker.spec.auto_commit:
            log.warning("queue %s: %d auto-committed item(s) claimed for watcher %s, which left before they "
                        "were sent", queue, len(taker.items), consumer)


# A claim made for a watcher with a batch of puts: its items and whether it drained what was ready for it
# (``HandoffStore._claim``), or why it failed.
HandedClaim = tuple[list[Item], bool] | Exception


class HandoffStore(ABC):
    """What both stores share around their storage: the hand-off (``Handoff``) in ``claim`` and in the put
    path. A store says only how it claims (``_claim``) and how it writes a batch of puts, alone
    (``_put_many``) or with claims for waiting watchers in the same round trip (``_put_many_and_claim``);
    the batching, the answer without a round trip, the watcher's record as a taker and the change notices
    around both are kept here, in one order for both stores."""

    backend: str
    # Whether an auto-commit claim that took items wakes this process's waiters on the queue.
    notify_claimed_removals: ClassVar[bool] = False

    def __init__(self) -> None:
        self._notifier = Notifier()
        # This process's watchers: a batch of puts claims for them in its own store round trip.
        self._handoff = Handoff(self._notifier)
        self._batcher = PutBatcher(self._flush_puts)

    @abstractmethod
    async def _claim(self, taker: Taker) -> tuple[list[Item], bool]:
        """The store's claim for ``taker`` (its queue, consumer, session and terms): the items, and whether
        it drained what was ready for the consumer (took fewer than its window allowed). Raises ``Superseded``."""

    @abstractmethod
    async def _put_many(self, queue: str, requests: list[PutRequest]) -> list[int]:
        """Write a batch of puts in one store round trip: each one's index, or ``FULL``."""

    @abstractmethod
    async def _put_many_and_claim(self, queue: str, requests: list[PutRequest], takers: list[Taker]
                                  ) -> tuple[list[int], list[HandedClaim]]:
        """``_put_many``, then each taker's ``_claim`` in turn, in the same round trip. A claim's failure is
        that taker's (``Superseded``, or any other error), never the puts'."""

    async def put(self, queue: str, body: bytes, request_id: str, priority: int, max_length: int) -> int:
        """``QueueStore.put``: batched with the puts that come in meanwhile (``PutBatcher``)."""
        return await self._batcher.put(queue, PutRequest(body, request_id, priority, max_length))

    def submit_put(self, queue: str, body: bytes, request_id: str, priority: int, max_length: int
                   ) -> asyncio.Future[int]:
        """``put`` without a coroutine, for the byte-level put path (``fastput``): a future of the index, or of
        ``FULL`` when the queue is full."""
        return self._batcher.submit(queue, PutRequest(body, request_id, priority, max_length))

    async def _flush_puts(self, queue: str, requests: list[PutRequest]) -> list[int]:
        takers = self._handoff.takers(queue)
        if not takers:
            results = await self._put_many(queue, requests)
            self._notifier.notify(queue)
            return results
        # The puts, then a claim for each waiting watcher of this process, in one round trip.
        changed = self._notifier.event(queue)
        try:
            results, claims = await self._put_many_and_claim(queue, requests, takers)
        except BaseException as exc:
            for taker in takers:  # their claims may have run without the answer reaching us: the watchers resync
                self._handoff.failed(taker, StoreUnavailable(
                    f"{self.backend}: a claim sent with puts got no answer ({exc!r})"))
            raise
        changed_meanwhile = changed.is_set()  # a local change during the call (read before our own notice)
        self._notifier.notify(queue)
        for taker, claim in zip(takers, claims, strict=True):
            if isinstance(claim, QueueError):
                self._handoff.failed(taker, claim)
            elif isinstance(claim, Exception):
                self._handoff.failed(taker, StoreUnavailable(
                    f"{self.backend}: a claim sent with puts failed: {claim!r}"))
            else:
                items, drained = claim
                if items and taker.spec.auto_commit and self.notify_claimed_removals:
                    self._handoff.removed(queue)  # a long-poll get may wait for them
                self._handoff.handed(taker, items, drained, changed_meanwhile)
        return results

    async def claim(self, queue: str, consumer: str, session: str, *, window: int, min_index: int,
                    auto_commit: bool, lease_s: float, tags: dict[str, str] | None = None,
                    handoff: bool = True) -> list[Item]:
        """``QueueStore.claim``."""
        spec = ClaimSpec(window, min_index, auto_commit, lease_s, tuple((tags or {}).items()))
        taken = self._handoff.taken(queue, consumer, session, spec) if handoff else None
        if taken is not None:  # claimed for it by a put, or nothing changed since it drained the queue
            return taken
        changed = self._notifier.event(queue)
        items, drained = await self._claim(Taker(queue, consumer, session, spec))
        changed_meanwhile = changed.is_set()  # a local change during the call (read before our own notice)
        if items and auto_commit and self.notify_claimed_removals:
            self._handoff.removed(queue)
        if handoff:
            self._handoff.claimed(queue, consumer, session, spec, bool(items), drained, changed_meanwhile)
        return items


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
        # A put whose client left is still written exactly once: the drain task owns the write,
        # and a cancelled future is only skipped when the results come back.
        index = await self.submit(queue, request)
        if index == FULL:
            raise QueueFull(f"queue {queue!r} is full ({request.max_length} items)")
        return index

    def submit(self, queue: str, request: PutRequest) -> asyncio.Future[int]:
        """``put`` for a caller that takes the answer in a callback: the future's result is the index or
        ``FULL``. Written exactly once whatever becomes of the future."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(queue, []).append((request, future))
        if queue not in self._running:
            self._running[queue] = asyncio.create_task(self._drain(queue))
        return future

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
