"""How many times a task was cut off mid-run, shared by every worker of a service.

A graph that kills its instance (out of memory, a segfault in a node) would
otherwise circulate for ever: the worker gives it back, the next instance dies
too, and so on. So each run counts once the instance has accepted the prompt
(answered ``/prompt`` with its ``prompt_id``): a submit that never reached the
instance (already dead) ran nothing and costs no try. The count is written
before the prompt is submitted and taken back if the instance never accepted
it, so no moment exists in which the instance runs the prompt and the count is
not written yet (a worker killed there would leave the run uncounted). A task
queued on the instance behind another (``--prefetch``) counts at its
``execution_start`` instead, written while it runs. A worker that receives a
task whose count has reached ``max_attempts`` reports it as failed
(``too_many_attempts``) instead of running it.

Where the count lives: a third queue of the service, ``{service}/attempts``,
holding at most one live record per task, addressed by the input item's
``requestId`` tag. Only put / get-by-``requestId`` / delete are used — the
calls of the queue service's wire protocol (``queue_service.server``) — so the count is as
durable and as shared as the input queue itself (SQLite or Redis), survives
worker restarts, and needs nothing the workers do not already reach. In the
all-in-one the workers write the store directly, as they do for the sink.

The cycle of one delivery (records hold ``{"count": n, "reason": ...}``):

- ``check``: read the task's record(s); ``count`` = their highest count. At
  ``max_attempts`` the task is not run. Otherwise ``count_before_submit`` puts
  a record with ``count + 1`` before the prompt goes to the instance (for a
  task queued behind another, ``record`` puts it at its ``execution_start``),
  whose reason says the worker never finished — true if it is killed
  (kill -9), stopped or cut off from the queue, which leaves the record
  behind; nothing else needs to run for such a run to count. (A worker killed
  between that put and its submit leaves a count for a run that never
  happened: one try too many, never one too few.)
- the instance went away (``GiveBack``): put a record with the same count and
  the reason, then delete the older ones; if the instance never accepted the
  prompt (``accepted`` was not called), delete the record of this run instead.
- a result went to the sink (success, failure, or already reported): delete
  the task's records (after the input's commit, in the background, so the
  next task need not wait for it).

A put always comes before the delete of the record it replaces, so a crash in
between leaves two records and the highest count still wins. (The Redis store
answers a ``requestId`` lookup with the newest item only; the newest always
holds the highest count, so both stores read the same count.) A record left by
a crash between the result's commit and its delete is never read again; such
leftovers are rare and only take room on the queue (when it is full, tasks run
uncounted, with a warning). With ``max_attempts`` 0 nothing is recorded.

Cost per task: one lookup and one put before the run (on the path between two
tasks, unless the task was queued ahead), one delete alongside the
input's commit — on the store in the all-in-one (``bench.api``: overhead p50
about +0.6 ms), three HTTP calls for a split-deployment worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from queue_service.client import QueueClient, QueueClientError, QueueFullError
from queue_service.protocol import encode_body
from queue_service.store import REQUEST_ID_TAG, QueueFull, QueueStore, StoreUnavailable
from standard.errors import WorkerError
from standard.retry import QUEUE

log = logging.getLogger("comfyserve.api.attempts")

ATTEMPTS_SUFFIX = "/attempts"
TOO_MANY_ATTEMPTS = "too_many_attempts"
LOOKUP_LENGTH = 8  # records of one task: 1, or 2 after a crash between a put and its delete
RETRY = QUEUE.but(attempts=5, level=logging.INFO,  # a full queue is final: retrying at once will not help
                  retry_on=lambda exc: isinstance(exc, Unavailable) and not isinstance(exc, Full))
T = TypeVar("T")


def attempts_of(service: str) -> str:
    return service + ATTEMPTS_SUFFIX


class Unavailable(WorkerError):
    """The attempts queue could not be read or written."""


class Full(Unavailable):
    """The attempts queue is at its max length: retrying at once will not help."""


@dataclass(frozen=True, slots=True)
class Record:
    index: int
    count: int
    reason: str


def _decode(index: int, data: bytes) -> Record | None:
    try:
        body = json.loads(data)
        return Record(index, int(body["count"]), str(body.get("reason", "")))
    except (ValueError, KeyError, TypeError):
        return None  # not ours: ignore it


def _encode(count: int, reason: str) -> bytes:
    return json.dumps({"count": count, "reason": reason}, separators=(",", ":")).encode()


class AttemptRecords(Protocol):
    """put / get-by-requestId / delete on ``{service}/attempts``."""

    async def find(self, request_id: str) -> list[Record]: ...

    async def put(self, request_id: str, count: int, reason: str) -> int: ...

    async def drop(self, indexes: list[int]) -> None: ...

    async def aclose(self) -> None: ...


class HttpAttemptRecords:
    """Over the queue service's HTTP API (split deployment)."""

    def __init__(self, client: QueueClient) -> None:
        self.client = client

    async def find(self, request_id: str) -> list[Record]:
        try:
            frames = await self.client.get(0, LOOKUP_LENGTH, request_id=request_id)
        except QueueClientError as exc:
            if exc.status == 404:
                return []
            raise Unavailable(str(exc)) from exc
        return [r for f in frames if (r := _decode(f.index, f.data)) is not None]

    async def put(self, request_id: str, count: int, reason: str) -> int:
        try:
            index, _ = await self.client.put(_encode(count, reason), {REQUEST_ID_TAG: request_id})
        except QueueFullError as exc:
            raise Full(f"the attempts queue is full ({exc.message})") from exc
        except QueueClientError as exc:
            raise Unavailable(str(exc)) from exc
        return index

    async def drop(self, indexes: list[int]) -> None:
        try:
            await self.client.delete(indexes)
        except QueueClientError as exc:
            if exc.status != 404:
                raise Unavailable(str(exc)) from exc

    async def aclose(self) -> None:
        await self.client.aclose()


class StoreAttemptRecords:
    """Straight on the store (all-in-one: the worker lives in the queue service's process)."""

    def __init__(self, store: QueueStore, service: str, *, max_length: int) -> None:
        self.store = store
        self.queue = attempts_of(service)
        self.max_length = max_length

    async def find(self, request_id: str) -> list[Record]:
        try:
            items = await self.store.get(self.queue, 0, LOOKUP_LENGTH, request_id)
        except StoreUnavailable as exc:
            raise Unavailable(str(exc)) from exc
        return [r for item in items if (r := _decode(item.index, item.decoded()[1])) is not None]

    async def put(self, request_id: str, count: int, reason: str) -> int:
        tags = {REQUEST_ID_TAG: request_id}
        try:
            return await self.store.put(self.queue, encode_body(tags, _encode(count, reason)), request_id, 0,
                                        self.max_length)
        except QueueFull as exc:
            raise Full(str(exc)) from exc
        except StoreUnavailable as exc:
            raise Unavailable(str(exc)) from exc

    async def drop(self, indexes: list[int]) -> None:
        try:
            await self.store.remove(self.queue, indexes)
        except StoreUnavailable as exc:
            raise Unavailable(str(exc)) from exc

    async def aclose(self) -> None:
        return None


@dataclass
class Ticket:
    """One delivery of a task: its attempt number and the records that hold its count now."""

    request_id: str
    count: int = 0  # this run's number; 0 when not counted
    records: list[int] = field(default_factory=list)
    exhausted: Record | None = None  # set when the cap is reached: report, do not run
    previous: int | None = None  # the count read by ``check``; None when it could not be read
    recording: asyncio.Task[None] | None = None  # this run's record being written (counted at its start)
    unconfirmed: int | None = None  # the record put before the submit, until the instance accepted the prompt

    def message(self) -> str:
        """The error result's message once ``exhausted``."""
        last = self.exhausted or Record(0, self.count, "")
        return (f"the task was cut off mid-run {last.count} times (its instance or worker went away each "
                f"time), so it is not run again; last: {last.reason}")


class AttemptLedger:
    """The worker's side of the cycle in the module docstring; failures of the queue only cost the count."""

    def __init__(self, records: AttemptRecords, *, max_attempts: int, holder: str) -> None:
        self.records = records
        self.max_attempts = max_attempts
        self.holder = holder

    async def check(self, request_id: str) -> Ticket:
        """Read the task's count; ``exhausted`` is set when it has reached the cap (report, do not run)."""
        ticket = Ticket(request_id)
        if self.max_attempts <= 0:
            return ticket
        found = await self._try("read", self.records.find, request_id)
        if found is None:
            return ticket
        last = max(found, key=lambda r: (r.count, r.index), default=None)
        ticket.records = [r.index for r in found]
        if last is not None and last.count >= self.max_attempts:
            ticket.exhausted = last
        else:
            ticket.previous = last.count if last else 0
        return ticket

    async def count_before_submit(self, ticket: Ticket) -> None:
        """Count this run before its prompt goes to the instance: a worker killed at any moment after the
        instance accepted it leaves it counted. ``accepted`` confirms the count; a run given back
        without it takes the count back (a submit the instance never took is no run)."""
        if ticket.previous is not None and ticket.exhausted is None:
            await self._record(ticket, ticket.previous + 1)
            if ticket.count:
                ticket.unconfirmed = ticket.records[-1]

    def accepted(self, ticket: Ticket) -> None:
        """The instance accepted the prompt counted by ``count_before_submit``: the count stands."""
        ticket.unconfirmed = None

    def record(self, ticket: Ticket) -> None:
        """Count this run at its start (queued behind another prompt on the instance, it started there).
        The record is written while the run goes on, off the path between two tasks."""
        if ticket.previous is not None and ticket.exhausted is None:
            ticket.recording = asyncio.create_task(self._record(ticket, ticket.previous + 1))

    async def _record(self, ticket: Ticket, count: int) -> None:
        reason = f"worker {self.holder} never finished it (killed, stopped, or cut off from the queue)"
        index = await self._try("record", self.records.put, ticket.request_id, count, reason)
        if index is not None:
            ticket.count = count
            ticket.records.append(index)

    @staticmethod
    async def _recorded(ticket: Ticket) -> None:
        if ticket.recording is not None:
            await asyncio.shield(ticket.recording)

    async def give_back(self, ticket: Ticket, reason: str) -> None:
        """The run was cut off: keep its count, with the reason the next worker will report. A submit
        the instance never accepted was no run: its count goes."""
        await self._recorded(ticket)
        index = ticket.unconfirmed
        if index is not None:
            ticket.unconfirmed, ticket.count = None, 0
            ticket.records.remove(index)
            await self._try("take back", self.records.drop, [index])
            return
        if not ticket.count:
            return
        index = await self._try("record", self.records.put, ticket.request_id, ticket.count, reason)
        if index is not None:
            await self.finish(ticket)
            ticket.records = [index]

    async def finish(self, ticket: Ticket) -> None:
        """The task has its result on the sink: its records are done with."""
        await self._recorded(ticket)
        if ticket.records:
            await self._try("drop", self.records.drop, ticket.records)
            ticket.records = []

    async def _try(self, what: str, call: Callable[..., Awaitable[T]], *args: Any) -> T | None:
        """``call(*args)``, retried while the queue is unavailable (not when full); None if it never worked."""
        try:
            return await RETRY.call(lambda: call(*args), what=f"{self.holder}: {what} the attempt count", log=log)
        except Unavailable as exc:
            log.warning("%s: cannot %s the attempt count of %s (%s); going on without it",
                        self.holder, what, args[0], exc)
            return None
