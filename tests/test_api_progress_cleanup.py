"""API edition: a run leaves no progress record on ``{service}/progress``, wherever its writer was.

A put cut off by the writer's cancel still lands (the store's put batcher owns the write), and its index
never reached the writer, so nothing removed that record: the task's progress stayed readable after its
run. The run's end is swept over every loop turn of a put (stepping the loop, not the clock).
"""

from __future__ import annotations

import asyncio

import pytest

from api_edition import progress as progress_module
from api_edition.progress import StoreRecords, TaskProgress
from queue_service.protocol import encode_body
from queue_service.redis_store import RedisStore
from support.wait import next_turns

QUEUE = "svc/progress"
PUT_TURNS = 16  # more loop turns than one put takes on an idle local Redis
ENDS_WITHIN_S = 5.0  # a bound for a failing test, never reached by a passing one




class Seen(StoreRecords):
    """Store records that say when a put starts."""

    def __init__(self, store: RedisStore, queue: str) -> None:
        super().__init__(store, queue)
        self.putting = asyncio.Event()

    async def put(self, request_id: str, data: bytes) -> int:
        self.putting.set()
        return await super().put(request_id, data)


async def test_a_run_that_ends_while_a_progress_record_is_put_leaves_no_record(
        redis_store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_module, "MIN_INTERVAL_S", 0.0)  # no throttle between the writes
    records = Seen(redis_store, QUEUE)
    progress = TaskProgress(records, "w", "http://instance")

    async def one_run(request_id: str, turns: int) -> None:
        async with progress.running(request_id):
            await records.putting.wait()
            await next_turns(turns)  # the run ends this many turns into the put

    for turns in range(PUT_TURNS):
        records.putting.clear()
        run = asyncio.create_task(one_run(f"task-{turns}", turns))
        await asyncio.wait({run}, timeout=ENDS_WITHIN_S)
        assert run.done(), f"the run did not end when it ended {turns} turns into a put"
        run.result()
    # One more put through the same batcher: it is written after any put still under way, so what is
    # read next is all that the runs left.
    marker = await redis_store.put(QUEUE, encode_body({"requestId": "marker"}, b"{}"), "marker", 0, 0)
    left = [item.index for item in await redis_store.get(QUEUE, 0, 4 * PUT_TURNS, None) if item.index != marker]
    assert left == [], "these runs left their progress record behind"
