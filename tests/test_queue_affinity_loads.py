"""A free watch and the cost of a model load (``queue_service.affinity``, ``standard.load_costs``): at the end
of a model's work the items are left to the watches whose consumers hold it, unless another load pays off,
and never longer than ``_affinity_wait_``. On both stores."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from test_queue_handback import QUEUE, commit, idle_watches, next_item, pending, watch

from queue_service.server import STORE_KEY, WATCHERS_KEY
from queue_service.store import Item
from support.clock import FakeClock
from support.queue import TOKEN, LiveQueue
from support.wait import until

AFFINITY = {"_affinity_": "models", "_affinity_wait_": "60s"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers={"Authorization": TOKEN}) as session:
        yield session


async def put(live: LiveQueue, name: str, models: str) -> int:
    index, _ = await live.client(QUEUE, uid="producer").put(name.encode(), {"models": models})
    return index


async def learn_costs(live: LiveQueue, http: aiohttp.ClientSession, clock: FakeClock, *, run_s: float,
                      loaded_run_s: float) -> None:
    """One consumer runs an item with its own models for ``run_s``, then one it loads for ``loaded_run_s``."""
    costs = live.app[WATCHERS_KEY].passed.costs
    async with watch(http, live, "teacher", window=1, prefetch=False,
                     options={**AFFINITY, "_affinity_prefer_": "x"}) as teacher:
        for name, seconds in (("x1", run_s), ("y1", loaded_run_s)):
            index = await put(live, name, name[0])
            assert await next_item(teacher) == (index, name.encode())
            clock.advance(seconds)
            await commit(http, live, index)
        await until(lambda: [(c.run_s, c.loaded_run_s) for c in costs.values()] == [(run_s, loaded_run_s)],
                    what="both runs observed")
    await until(lambda: not live.app[WATCHERS_KEY].sockets, what="the teacher's watch gone")


@pytest.fixture
async def clock(live_queue: LiveQueue, http: aiohttp.ClientSession) -> FakeClock:
    """The queue on a fake clock, having seen a run with its consumer's own models take 1 s and one that
    needed a load 5 s: another consumer loading pays off from 4 waiting items per holder."""
    fake = FakeClock()
    live_queue.app[WATCHERS_KEY].passed.clock = fake
    await learn_costs(live_queue, http, fake, run_s=1.0, loaded_run_s=5.0)
    return fake


async def declined(live: LiveQueue) -> None:
    """The free watch just opened (the second preferring watch) has made its first claim, and it took nothing:
    it is no longer counted idle, as it was from its opening on."""
    watches = live.app[WATCHERS_KEY].passed.models
    await until(lambda: sum(map(len, watches.values())) == 2 and idle_watches(live) == 0,
                what="the free watch's first claim")


async def holder_of_b(live: LiveQueue,
                      http: aiohttp.ClientSession) -> tuple[list[int], aiohttp.ClientWebSocketResponse]:
    """Four ``b`` items; a watch preferring ``b`` holds the first two (one running, one queued ahead)."""
    items = [await put(live, f"b{i}", "b") for i in range(4)]
    ws = await watch(http, live, "holder", options={**AFFINITY, "_affinity_prefer_": "b"}).__aenter__()
    assert [await next_item(ws), await next_item(ws)] == [(items[0], b"b0"), (items[1], b"b1")]
    return items, ws


async def test_a_free_watch_leaves_the_last_items_of_a_model_to_its_holder_until_a_load_pays_off(
        live_queue: LiveQueue, http: aiohttp.ClientSession, clock: FakeClock) -> None:
    items, holder = await holder_of_b(live_queue, http)
    try:
        async with watch(http, live_queue, "free", options={**AFFINITY, "_affinity_prefer_": "c"}) as free:
            await declined(live_queue)
            assert not await pending(live_queue, items[2])  # 2 waiting for 1 holder: b stays with it
            more = [await put(live_queue, "b4", "b"), await put(live_queue, "b5", "b")]
            assert await next_item(free) == (items[2], b"b2")  # 4 waiting: now the load pays off
            assert not await pending(live_queue, more[1])
    finally:
        await holder.close()


async def test_an_item_left_to_its_models_holder_waits_at_most_the_affinity_wait(
        live_queue: LiveQueue, http: aiohttp.ClientSession, clock: FakeClock) -> None:
    items, holder = await holder_of_b(live_queue, http)
    try:
        sockets = live_queue.app[WATCHERS_KEY].sockets
        for advance in (0.0, 59.9):  # b2 is left to the holder from the first free watch's claim on
            clock.advance(advance)
            async with watch(http, live_queue, f"free{advance}", options={**AFFINITY, "_affinity_prefer_": "c"}):
                await declined(live_queue)
                assert not await pending(live_queue, items[2])
            await until(lambda: len(sockets) == 1, what="the free watch gone")
        clock.advance(0.2)
        async with watch(http, live_queue, "free", options={**AFFINITY, "_affinity_prefer_": "c"}) as free:
            assert await next_item(free) == (items[2], b"b2")  # passed over for 60 s: it goes
    finally:
        await holder.close()


async def test_before_any_load_was_seen_a_free_watch_loads_held_models_from_four_items_per_holder(
        live_queue: LiveQueue, http: aiohttp.ClientSession) -> None:
    items, holder = await holder_of_b(live_queue, http)
    try:
        async with watch(http, live_queue, "free", options={**AFFINITY, "_affinity_prefer_": "c"}) as free:
            await declined(live_queue)
            assert not await pending(live_queue, items[2])  # 2 waiting for 1 holder: b stays with it
            await put(live_queue, "b4", "b")
            await put(live_queue, "b5", "b")
            assert await next_item(free) == (items[2], b"b2")  # 4 waiting: a load counts as 4 runs until seen
    finally:
        await holder.close()


async def test_before_any_load_was_seen_a_free_watch_holding_nothing_takes_the_oldest_item(
        live_queue: LiveQueue, http: aiohttp.ClientSession) -> None:
    items, holder = await holder_of_b(live_queue, http)
    try:
        async with watch(http, live_queue, "fresh", options=AFFINITY) as fresh:  # no models of its own yet
            assert await next_item(fresh) == (items[2], b"b2")
    finally:
        await holder.close()


async def test_at_the_start_of_a_burst_a_free_watch_leaves_a_model_being_loaded_for_the_next_model(
        live_queue: LiveQueue, http: aiohttp.ClientSession) -> None:
    # The burst's first items all want a, b's come a moment later: the watch that took a0 is loading a; a
    # second one loading a as well would leave b's items no consumer (no run has ended: costs unknown).
    options = {**AFFINITY, "_affinity_prefer_": "warm-up"}
    a0 = await put(live_queue, "a0", "a")
    async with watch(http, live_queue, "first", window=1, prefetch=False, options=options) as first:
        assert await next_item(first) == (a0, b"a0")
        a1, _ = await put(live_queue, "a1", "a"), await put(live_queue, "a2", "a")
        async with watch(http, live_queue, "second", options=options) as second:
            await declined(live_queue)
            b0 = await put(live_queue, "b0", "b")
            assert await next_item(second) == (b0, b"b0")
            assert not await pending(live_queue, a1)


async def test_two_free_watches_deciding_at_once_load_different_models(
        live_queue: LiveQueue, http: aiohttp.ClientSession) -> None:
    # Both wake to the same queue and read it before either claims: the models the first one is about to load
    # count as held from its decision, not from its claim's answer, so the second takes b0, not a1.
    store = live_queue.app[STORE_KEY]
    real_get, reads, both_read = store.get, [], asyncio.Event()

    async def read_together(queue: str, start_index: int, length: int, request_id: str | None) -> list[Item]:
        items = await real_get(queue, start_index, length, request_id)
        if stash.closed and len(reads) < 2:
            reads.append(items)
            if len(reads) == 2:
                both_read.set()
            await both_read.wait()
        return items

    named = [("a0", "a"), ("a1", "a"), ("b0", "b")]
    indexes = [await put(live_queue, name, models) for name, models in named]
    stash = await watch(http, live_queue, "stash", window=3, prefetch=False).__aenter__()
    assert [(await next_item(stash))[0] for _ in named] == indexes
    store.get = read_together  # type: ignore[method-assign]
    options = {**AFFINITY, "_affinity_prefer_": "warm-up"}
    async with watch(http, live_queue, "one", window=1, prefetch=False, options=options) as one, \
            watch(http, live_queue, "two", window=1, prefetch=False, options=options) as two:
        watches = live_queue.app[WATCHERS_KEY].passed.models
        await until(lambda: sum(map(len, watches.values())) == 2, what="both watches open")
        await stash.close()  # its items are ready again at once, in one change
        assert {await next_item(one), await next_item(two)} == {(indexes[0], b"a0"), (indexes[2], b"b0")}
        assert not await pending(live_queue, indexes[1])


async def test_an_overdue_head_moves_one_watch_to_its_models_not_every_watch_deciding_at_once(
        live_queue: LiveQueue, http: aiohttp.ClientSession) -> None:
    clock = FakeClock()
    live_queue.app[WATCHERS_KEY].passed.clock = clock
    named = [("y1", "y"), ("y2", "y"), ("x1", "x"), ("x2", "x"), ("x3", "x")]
    indexes = dict(zip([name for name, _ in named], [await put(live_queue, *item) for item in named], strict=True))
    options = {**AFFINITY, "_affinity_prefer_": "x"}
    async with watch(http, live_queue, "one", window=1, prefetch=False, options=options) as one, \
            watch(http, live_queue, "two", window=1, prefetch=False, options=options) as two:
        taken = {await next_item(one), await next_item(two)}  # y1 passed over from the first claim on
        assert taken == {(indexes["x1"], b"x1"), (indexes["x2"], b"x2")}
        clock.advance(60.0)
        async with http.put(f"http://{live_queue.endpoint}/api/predict/{QUEUE}",
                            params={"_indexes_": f"{indexes['x1']},{indexes['x2']}"}) as response:
            assert response.status == 200  # both free in one change: both find y1 overdue at once
        # y1 goes now, on one of them; the other keeps x: y2 was not passed over for the bound.
        assert {await next_item(one), await next_item(two)} == {(indexes["y1"], b"y1"), (indexes["x3"], b"x3")}
        assert not await pending(live_queue, indexes["y2"])


async def test_a_free_watch_takes_first_an_item_whose_models_no_watch_holds(
        live_queue: LiveQueue, http: aiohttp.ClientSession) -> None:
    a0 = await put(live_queue, "a0", "a")
    async with watch(http, live_queue, "holder", window=1, prefetch=False,
                     options={**AFFINITY, "_affinity_prefer_": "a"}) as holder:
        assert await next_item(holder) == (a0, b"a0")
        a1, b1 = await put(live_queue, "a1", "a"), await put(live_queue, "b1", "b")
        async with watch(http, live_queue, "free", options={**AFFINITY, "_affinity_prefer_": "warm-up"}) as free:
            assert await next_item(free) == (b1, b"b1")  # a has a consumer already, b none
            assert not await pending(live_queue, a1)


async def test_a_free_watch_that_leaves_an_item_to_its_holder_does_not_keep_the_holders_slot_ahead_shut(
        live_queue: LiveQueue, http: aiohttp.ClientSession, clock: FakeClock) -> None:
    b0 = await put(live_queue, "b0", "b")
    async with watch(http, live_queue, "holder", options={**AFFINITY, "_affinity_prefer_": "b"}) as holder:
        assert await next_item(holder) == (b0, b"b0")
        async with watch(http, live_queue, "free", options={**AFFINITY, "_affinity_prefer_": "c"}):
            await until(lambda: idle_watches(live_queue) == 1, what="the free watch idle (nothing to take)")
            b1 = await put(live_queue, "b1", "b")  # one item for one holder: not worth a load on the free one
            assert await next_item(holder) == (b1, b"b1")  # queued ahead there, though a watch was idle
