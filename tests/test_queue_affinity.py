"""The watch's model preference (``_affinity_``): items like the last one first, the oldest never passed
over for longer than ``_affinity_wait_``, plain order without it. On both stores."""

from __future__ import annotations

import asyncio

import pytest

from queue_service.client import QueueClient, QueueClientError
from queue_service.protocol import encode_body
from queue_service.server import STORE_KEY, WATCHERS_KEY
from support.clock import FakeClock
from support.queue import LiveQueue
from support.wait import until

AFFINITY = {"_affinity_": "models", "_affinity_wait_": "60s"}


async def put_all(queue: QueueClient, items: list[tuple[str, str | None]]) -> None:
    for name, models in items:
        await queue.put(name.encode(), {"models": models} if models else {})


async def take(queue: QueueClient, count: int, window: int = 1, options: dict[str, str] | None = None,
               between: list[float] | None = None, clock: FakeClock | None = None) -> list[str]:
    """The first ``count`` items a watch hands out, each committed once read (the clock moved first)."""
    got: list[str] = []
    async with queue.watch(window=window, options=options) as frames:
        async for frame in frames:
            got.append(frame.data.decode())
            if clock is not None and between:
                clock.advance(between.pop(0))
            await queue.commit(frame.index)
            if len(got) == count:
                return got
    return got


async def test_a_watch_prefers_items_like_the_last_one_and_then_takes_the_oldest(live_queue: LiveQueue) -> None:
    queue = live_queue.client("svc", uid="w1")
    await put_all(queue, [("y1", "y"), ("x1", "x"), ("y2", "y"), ("x2", "x"), ("n1", None), ("y3", "y")])
    got = await take(queue, 6, options={**AFFINITY, "_affinity_prefer_": "x"})
    # x first (the instance holds x); then the oldest (y1), then more y; an untagged item keeps the preference.
    assert got == ["x1", "x2", "y1", "y2", "y3", "n1"]


async def test_a_window_of_two_is_filled_one_preferred_item_at_a_time(live_queue: LiveQueue) -> None:
    queue = live_queue.client("svc", uid="w1")
    await put_all(queue, [("y1", "y"), ("x1", "x"), ("y2", "y"), ("x2", "x")])
    async with queue.watch(window=2, options=AFFINITY) as frames:
        first, second = await anext(frames), await anext(frames)
    assert [first.data, second.data] == [b"y1", b"y2"]  # the second is queued behind y1: it wants y too


async def test_a_slot_behind_a_held_item_waits_for_a_preferred_one_unless_the_head_is_untagged(
        live_queue: LiveQueue) -> None:
    queue = live_queue.client("svc", uid="w1")
    await put_all(queue, [("y1", "y"), ("x1", "x")])
    async with queue.watch(window=2, options=AFFINITY) as frames:
        first = await anext(frames)
        assert first.data == b"y1"
        assert (await queue.search(first.index + 1))["IsPending"] is False  # x1 waits: no switch queued early
        await queue.commit(first.index)
        second = await anext(frames)
        assert second.data == b"x1"  # the instance is free: the oldest goes
        await queue.commit(second.index)
    await put_all(queue, [("y2", "y"), ("n1", None)])
    async with live_queue.client("svc", uid="w2").watch(window=2, options=AFFINITY) as frames:
        assert [(await anext(frames)).data, (await anext(frames)).data] == [b"y2", b"n1"]  # models unknown: taken


async def test_the_oldest_item_is_passed_over_at_most_the_affinity_wait(live_queue: LiveQueue) -> None:
    clock = FakeClock()
    live_queue.app[WATCHERS_KEY].passed.clock = clock
    queue = live_queue.client("svc", uid="w1")
    await put_all(queue, [("y1", "y"), ("x1", "x"), ("x2", "x"), ("x3", "x"), ("x4", "x")])
    options = {**AFFINITY, "_affinity_wait_": "5s", "_affinity_prefer_": "x"}
    # y1 is passed over from the first claim on; 4.9 s later still, 5.1 s later it goes first.
    got = await take(queue, 5, options=options, between=[4.9, 0.2, 0.0, 0.0, 0.0], clock=clock)
    assert got == ["x1", "x2", "y1", "x3", "x4"]


async def test_without_affinity_or_with_wait_zero_a_watch_is_first_in_first_out(live_queue: LiveQueue) -> None:
    queue = live_queue.client("svc", uid="w1")
    await put_all(queue, [("y1", "y"), ("x1", "x"), ("y2", "y"), ("x2", "x")])
    off = {**AFFINITY, "_affinity_wait_": "0", "_affinity_prefer_": "x"}
    assert await take(queue, 2, options=off) == ["y1", "x1"]
    assert await take(queue, 2) == ["y2", "x2"]


async def test_a_bad_affinity_wait_is_refused(live_queue: LiveQueue) -> None:
    queue = live_queue.client("svc", uid="w1")
    with pytest.raises(QueueClientError) as refused:
        await take(queue, 1, options={**AFFINITY, "_affinity_wait_": "soon"})
    assert refused.value.status == 400


async def test_a_prefetch_slot_is_left_to_a_watch_that_holds_nothing(live_queue: LiveQueue) -> None:
    idle = live_queue.app[WATCHERS_KEY].passed.idle
    busy_queue, idle_queue = live_queue.client("svc", uid="busy"), live_queue.client("svc", uid="idle")
    await put_all(busy_queue, [("i1", None)])
    async with busy_queue.watch(window=2, options={"_prefetch_": "true"}) as busy:
        assert (await anext(busy)).data == b"i1"
        async with idle_queue.watch(window=2, options={"_prefetch_": "true"}) as free:
            waiting = asyncio.ensure_future(anext(free))  # connects
            await until(lambda: sum(map(len, idle.values())) == 1, what="the second watch holding nothing")
            await put_all(busy_queue, [("i2", None)])
            assert (await waiting).data == b"i2"  # not queued behind i1 on the busy one
            nexts = {asyncio.ensure_future(anext(busy)), asyncio.ensure_future(anext(free))}
            await put_all(busy_queue, [("i3", None)])  # nobody idle now: one of them queues it ahead
            done, pending = await asyncio.wait(nexts, return_when=asyncio.FIRST_COMPLETED)
            for other in pending:
                other.cancel()
            assert [frame.result().data for frame in done] == [b"i3"]


async def test_every_item_a_claim_takes_is_sent_even_when_one_was_committed_meanwhile(live_queue: LiveQueue) -> None:
    """A watch counts what it holds, then claims: an item committed in between makes the claim take one more;
    both must be sent (else one stays pending on the consumer, never delivered)."""
    store = live_queue.app[STORE_KEY]
    real_pending = store.pending
    tricked = asyncio.Event()

    async def pending_then_commit(queue: str, consumer: str, session: str) -> list:
        held = await real_pending(queue, consumer, session)
        waiting = [item.decoded()[1] for item in await store.get(queue, 0, 10, None)]
        if held and b"i2" in waiting and not tricked.is_set():
            tricked.set()  # the held item is committed, and another put, between the count and the claim
            await store.remove(queue, [held[0].index])
            await store.put(queue, encode_body({}, b"i3"), "i3", 0, 0)
        return held

    store.pending = pending_then_commit
    queue = live_queue.client("svc", uid="w1")
    async with queue.watch(window=2, options={**AFFINITY, "_prefetch_": "true"}) as frames:
        await put_all(queue, [("i1", None)])
        assert (await anext(frames)).data == b"i1"
        await put_all(queue, [("i2", None)])
        assert sorted([(await anext(frames)).data, (await anext(frames)).data]) == [b"i2", b"i3"]
    assert tricked.is_set()
