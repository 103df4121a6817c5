"""A cancelled task stays cancelled through the Redis store's calls, wherever the cancel lands.

redis-py 8 gives clients a 5 s ``socket_timeout`` by default, and then sends each command under
``asyncio.wait_for``, which on Python 3.11 returns normally when a cancel lands just as the send
completes: the store call went on and answered, and the cancelled task never learnt it was cancelled.
The worker's helper tasks (progress writer, cancel poller) then looped on, and the worker, waiting for
them to end after a run, hung with its result never reported. The cancel is swept over every turn of
the event loop of one call (stepping the loop, not waiting on the clock), so each window is hit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from api_edition import progress as progress_module
from api_edition.progress import StoreRecords, TaskProgress
from queue_service.protocol import encode_body
from queue_service.redis_store import RedisStore
from support.wait import cancelled_after, next_turns

TURNS = 24  # more loop turns than one store call takes on an idle local Redis
DROP_TURNS = 8  # the turns of one removal's send, which is what swallowed the cancel
ENDS_WITHIN_S = 5.0  # a bound for a failing test, never reached by a passing one





async def test_a_store_call_cancelled_at_any_turn_ends_cancelled(redis_store: RedisStore) -> None:
    body = encode_body({"requestId": "r"}, b"x")
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "get": lambda: redis_store.get("q", 0, 16, "r"),
        "put": lambda: redis_store.put("q", body, "r", 0, 0),
        "remove": lambda: redis_store.remove("q", [1]),
    }
    swallowed = [(name, turns) for name, call in calls.items() for turns in range(TURNS)
                 if not await cancelled_after(call, turns)]
    assert swallowed == [], "these calls returned normally after their task was cancelled"


async def test_after_a_call_cut_off_at_any_turn_the_next_calls_get_their_own_answers(redis_store: RedisStore) -> None:
    """Puts and claims run on connections of the store's own (``_DirectCalls``): one cut off mid-call must not
    leave its late reply to be read as the answer of the next call on that connection."""
    await redis_store.open_session("other", "g/c", "s", 30.0)
    for turns in range(TURNS):
        body = encode_body({"requestId": f"cut{turns}"}, b"x")
        await cancelled_after(lambda: redis_store.put("q", body, f"cut{turns}", 0, 0), turns)
        await cancelled_after(lambda: redis_store.claim("other", "g/c", "s", window=1000, min_index=0,
                                                        auto_commit=True, lease_s=30.0), turns)
        index = await redis_store.put("q", encode_body({"requestId": f"ok{turns}"}, b"y"), f"ok{turns}", 0, 0)
        assert index == (await redis_store.stats("q")).last_index  # this put's answer, not a stale one
        [item] = await redis_store.get("q", index, 1, None)
        assert item.decoded()[0]["requestId"] == f"ok{turns}"


class Seen(StoreRecords):
    """Store records that say when a put, and a drop (an old record's removal), start."""

    def __init__(self, store: RedisStore, queue: str) -> None:
        super().__init__(store, queue)
        self.putting = asyncio.Event()
        self.dropping = asyncio.Event()

    async def put(self, request_id: str, data: bytes) -> int:
        self.putting.set()
        return await super().put(request_id, data)

    async def drop(self, indexes: list[int]) -> None:
        self.dropping.set()
        await super().drop(indexes)


async def test_a_task_progress_writer_ends_with_its_run_whenever_the_run_ends(
        redis_store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hang as the worker saw it: leaving ``TaskProgress.running`` (the run is over) cancels the
    record writer and waits for it; a writer whose cancel was swallowed mid-drop never ended."""
    monkeypatch.setattr(progress_module, "MIN_INTERVAL_S", 0.0)  # no throttle between the writes
    records = Seen(redis_store, "svc/progress")
    progress = TaskProgress(records, "w", "http://instance")

    async def one_run(turns: int) -> None:
        async with progress.running(f"task-{turns}"):
            await records.putting.wait()  # its first record is being written
            progress.event(f"task-{turns}", {"type": "executing", "data": {"node": "1"}})  # the next one replaces it
            await records.dropping.wait()
            await next_turns(turns)  # the run ends this many turns into the removal of the first

    for turns in range(DROP_TURNS):
        records.putting.clear()
        records.dropping.clear()
        run = asyncio.create_task(one_run(turns))
        # Not asyncio.timeout: running()'s exit, hung on its writer, would swallow that cancel too.
        await asyncio.wait({run}, timeout=ENDS_WITHIN_S)
        assert run.done(), f"the run did not end when it ended {turns} turns into a record's removal"
        run.result()
