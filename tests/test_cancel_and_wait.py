"""Stopping a helper task never swallows a cancel aimed at the one stopping it (standard/tasks.py).

``task.cancel()`` then ``await task`` under ``contextlib.suppress(asyncio.CancelledError)`` cannot tell
the helper's cancel from the caller's: a caller cancelled while it waited for its helper to end went on
as if never cancelled (a worker's final cancel at shutdown was lost while it waited for its progress
writer). The loop is stepped (``asyncio.sleep(0)`` turns and events), never the clock.
"""

from __future__ import annotations

import asyncio

import pytest

from api_edition.progress import TaskProgress
from standard.tasks import cancel_and_wait, finish
from support.wait import next_turns

SETTLE_TURNS = 8  # loop turns for a caller to reach its wait (a few are enough; more cost nothing)



class SlowToEnd:
    """A helper task that, once cancelled, ends only when ``release`` is set (as one closing a connection)."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.release = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            await self.release.wait()
            raise


async def test_a_caller_cancelled_while_its_helper_ends_ends_cancelled_once_the_helper_has_ended() -> None:
    helper = SlowToEnd()
    caller = asyncio.create_task(cancel_and_wait(helper.task))
    await helper.cancelled.wait()  # the caller waits for the helper to end
    caller.cancel()
    await next_turns(SETTLE_TURNS)
    assert not caller.done(), "the caller left before the helper it stopped had ended"
    helper.release.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert helper.task.cancelled()


async def test_a_helper_that_had_failed_has_its_error_raised_and_a_cancelled_one_none() -> None:
    async def fails() -> None:
        raise LookupError("broken")

    failed, idle = asyncio.create_task(fails()), asyncio.create_task(asyncio.Event().wait())
    await next_turns(1)
    with pytest.raises(LookupError, match="broken"):
        await cancel_and_wait(failed, idle)
    assert idle.cancelled()
    await cancel_and_wait(asyncio.create_task(asyncio.Event().wait()))  # its own cancel is no error


async def test_finish_runs_its_work_to_the_end_and_then_raises_the_callers_cancel() -> None:
    started, release, ended = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def work() -> None:
        started.set()
        await release.wait()
        ended.set()

    caller = asyncio.create_task(finish(work()))
    await started.wait()
    caller.cancel()
    await next_turns(SETTLE_TURNS)
    assert not caller.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert ended.is_set()


class GatedRecords:
    """Progress records in memory whose put waits for ``gate`` (a store slow to answer)."""

    def __init__(self) -> None:
        self.records: dict[int, bytes] = {}
        self.putting = asyncio.Event()
        self.gate = asyncio.Event()
        self._next = 0

    async def put(self, request_id: str, data: bytes) -> int:
        self.putting.set()
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            await self.gate.wait()  # a put cut off still takes its time to end
            raise
        self._next += 1
        self.records[self._next] = data
        return self._next

    async def put_many(self, records: list[tuple[str, bytes]]) -> list[int]:
        return [await self.put(request_id, data) for request_id, data in records]

    async def find(self, request_id: str) -> list[int]:
        return list(self.records)

    async def truncate(self, below: int) -> None:
        return None

    async def drop(self, indexes: list[int]) -> None:
        for index in indexes:
            self.records.pop(index, None)

    async def aclose(self) -> None:
        return None


async def test_a_run_cancelled_while_its_progress_writer_ends_ends_cancelled() -> None:
    """The worker's case: a run's end waits for its progress writer (here mid-write); the run's own
    cancel landing meanwhile is not lost, and no record is left behind."""
    records = GatedRecords()
    progress = TaskProgress(records, "w", "http://instance")
    leave = asyncio.Event()

    async def one_run() -> None:
        async with progress.running("task"):
            await leave.wait()

    run = asyncio.create_task(one_run())
    await records.putting.wait()  # its first record is being written
    leave.set()  # the run is over: its end stops the writer and waits for it
    await next_turns(SETTLE_TURNS)
    assert not run.done()
    run.cancel()
    await next_turns(SETTLE_TURNS)
    records.gate.set()
    ended = await asyncio.wait({run}, timeout=5.0)  # a bound for a failing test, never reached by a passing one
    assert run in ended[0], "the run did not end"
    assert run.cancelled(), "the run's cancel was lost while it waited for its progress writer"
    assert records.records == {}
