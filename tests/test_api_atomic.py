"""A worker's "result on the sink + input committed" as one store operation (``put_and_remove``).

Store level on both stores (Redis: also across two service processes on one Redis), then the
all-in-one worker using it, and the split deployment's two-call version of the same step.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from api_edition.queue_ops import HttpQueueOps, SinkFull, StoreQueueOps, Transient
from queue_service.client import QueueClient
from queue_service.protocol import encode_body
from queue_service.redis_store import CHANNEL, RedisStore
from queue_service.server import STORE_KEY
from queue_service.sqlite_store import SQLiteStore
from queue_service.store import QueueFull, QueueStore, wait_event
from support.api import ApiFactory
from support.metrics import value
from support.processes import RedisServer
from support.server import tiny_graph
from support.wait import until

INPUT, SINK = "svc", "svc/sink"
StoreFactory = Callable[[], Awaitable[QueueStore]]


@pytest.fixture
async def open_store(store_kind: str, request: pytest.FixtureRequest,
                     tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """Open stores under test: SQLite in tmp_path, or (each call a "process" of its own) a flushed Redis."""
    redis_url = request.getfixturevalue("redis_url") if store_kind == "redis" else None
    stack = contextlib.AsyncExitStack()

    async def make() -> QueueStore:
        store: QueueStore = RedisStore(redis_url) if redis_url else SQLiteStore(tmp_path / "queue.sqlite3")
        await store.open()
        stack.push_async_callback(store.close)
        return store

    async with stack:
        yield make


def body(data: bytes, request_id: str) -> bytes:
    return encode_body({"requestId": request_id}, data)


async def put_input(store: QueueStore, count: int) -> list[int]:
    return [await store.put(INPUT, body(b"graph", f"rid-{n}"), f"rid-{n}", 0, 0) for n in range(count)]


# -- the store --------------------------------------------------------------------------------


async def test_put_and_remove_puts_and_removes_together(open_store: StoreFactory) -> None:
    store = await open_store()
    first, second = await put_input(store, 2)
    await store.open_session(INPUT, "worker-1", "s1", 30.0)
    [claimed] = await store.claim(INPUT, "worker-1", "s1", window=1, min_index=0, auto_commit=False, lease_s=30.0)
    assert claimed.index == first

    index = await store.put_and_remove(SINK, body(b"result", "rid-0"), "rid-0", 0, 10, INPUT, [first])

    assert index == 1
    [result] = await store.get(SINK, 0, 10, "rid-0")
    assert result.index == index and result.decoded()[1] == b"result"
    assert [item.index for item in await store.get(INPUT, 0, 10, None)] == [second]
    assert await store.pending(INPUT, "worker-1", "s1") == []  # the claim is gone with the item
    assert (await store.stats(INPUT)).length == 1 and (await store.stats(SINK)).length == 1


async def test_full_put_queue_refuses_and_keeps_the_item_to_remove(open_store: StoreFactory) -> None:
    store = await open_store()
    [first] = await put_input(store, 1)
    await store.put(SINK, body(b"older", "rid-x"), "rid-x", 0, 1)

    with pytest.raises(QueueFull):
        await store.put_and_remove(SINK, body(b"result", "rid-0"), "rid-0", 0, 1, INPUT, [first])

    assert [item.index for item in await store.get(INPUT, 0, 10, None)] == [first]  # back-pressure: kept
    assert await store.get(SINK, 0, 10, "rid-0") == []
    assert (await store.stats(SINK)).length == 1
    await store.remove(SINK, [1])  # the client takes the older result: room again
    assert await store.put_and_remove(SINK, body(b"result", "rid-0"), "rid-0", 0, 1, INPUT, [first]) == 2
    assert await store.get(INPUT, 0, 10, None) == []


async def test_unknown_indexes_to_remove_are_harmless(open_store: StoreFactory) -> None:
    store = await open_store()
    [first] = await put_input(store, 1)
    assert await store.put_and_remove(SINK, body(b"a", "rid-a"), "rid-a", 0, 10, INPUT, [first + 41]) == 1
    assert await store.put_and_remove(SINK, body(b"b", "rid-b"), "rid-b", 0, 10, "svc/never-written", [1]) == 2
    assert await store.put_and_remove(SINK, body(b"c", "rid-c"), "rid-c", 0, 10, INPUT, []) == 3
    assert (await store.stats(INPUT)).length == 1 and (await store.stats(SINK)).length == 3
    assert not await store.exists("svc/never-written")


async def test_watchers_of_both_queues_wake(open_store: StoreFactory, store_kind: str) -> None:
    store = await open_store()
    [first] = await put_input(store, 1)
    sink_changed, input_changed = store.changes(SINK), store.changes(INPUT)  # taken before looking
    await store.put_and_remove(SINK, body(b"r", "rid-0"), "rid-0", 0, 10, INPUT, [first])
    assert await wait_event(sink_changed, 2.0) and await wait_event(input_changed, 2.0)


async def test_watchers_in_another_process_on_the_same_redis_wake(redis_url: str) -> None:
    """Redis only: one process per SQLite store."""
    writer, watcher = RedisStore(redis_url), RedisStore(redis_url)
    admin = aioredis.Redis.from_url(redis_url)
    subscribed = await _subscribers(admin)
    for store in (writer, watcher):
        await store.open()
    try:
        # Both stores' change listeners are subscribed: a notice now reaches the watcher.
        await until(lambda: _subscribers_reach(admin, subscribed + 2))
        await _wake_across_processes(writer, watcher)
    finally:
        for store in (writer, watcher):
            await store.close()
        await admin.aclose()


async def _subscribers(admin: aioredis.Redis) -> int:
    [(_, count)] = await admin.pubsub_numsub(CHANNEL)
    return count


async def _subscribers_reach(admin: aioredis.Redis, count: int) -> bool:
    return await _subscribers(admin) >= count


async def _wake_across_processes(writer: QueueStore, watcher: QueueStore) -> None:
    [first] = await put_input(writer, 1)
    sink_changed, input_changed = watcher.changes(SINK), watcher.changes(INPUT)
    await watcher.arm(SINK)
    await watcher.arm(INPUT)
    await writer.put_and_remove(SINK, body(b"r", "rid-0"), "rid-0", 0, 10, INPUT, [first])
    assert await wait_event(sink_changed, 2.0) and await wait_event(input_changed, 2.0)
    assert [item.index for item in await watcher.get(SINK, 0, 10, "rid-0")] == [1]


async def test_a_retry_after_a_lost_redis_reply_puts_no_second_result(tmp_path: Path) -> None:
    """Redis gone mid-call: the worker cannot tell if the script ran; its retry must not put twice."""
    server = RedisServer(tmp_path / "redis")
    await asyncio.to_thread(server.start)
    store = RedisStore(server.url, call_timeout_s=0.5)
    await store.open()
    ops = StoreQueueOps(store, INPUT, max_length=10, max_payload_bytes=1024)

    async def report(request_id: str, index: int) -> int:  # as the worker does: retry while Transient
        async with asyncio.timeout(20):
            while True:
                try:
                    return await ops.put_result_and_commit(b"result", {"requestId": request_id}, index)
                except Transient:
                    await asyncio.sleep(0.05)

    try:
        first, second = await put_input(store, 2)
        for request_id, index, landed in (("rid-0", first, False), ("rid-1", second, True)):
            await asyncio.to_thread(server.stop)
            with pytest.raises(Transient):
                await ops.put_result_and_commit(b"result", {"requestId": request_id}, index)
            await asyncio.to_thread(server.start)  # AOF: the data is back
            if landed:  # the lost call had run: result put, input removed
                done = await store.put_and_remove(SINK, body(b"result", request_id), request_id, 0, 10, INPUT, [index])
                assert await report(request_id, index) == done
            else:
                await report(request_id, index)
        results = await store.get(SINK, 0, 10, None)
        assert [item.decoded()[0]["requestId"] for item in results] == ["rid-0", "rid-1"]
        assert await store.get(INPUT, 0, 10, None) == []
    finally:
        await store.close()
        await asyncio.to_thread(server.stop)


# -- the API edition ---------------------------------------------------------------------------


def _held(caplog: pytest.LogCaptureFixture) -> bool:
    """The worker has run a task and is retrying its result's put on a full sink."""
    return any("sink put failed" in r.getMessage() and "is full" in r.getMessage() for r in caplog.records)


async def test_all_in_one_worker_puts_and_commits_in_one_step(api: ApiFactory, instance_url: Any,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    live = await api(instance_urls=(await instance_url(),), max_length=1)
    assert live.live.pool is not None
    [(worker, _)] = live.live.pool.workers
    assert isinstance(worker.ops, StoreQueueOps)
    store = live.live.app[STORE_KEY]

    first = (await live.submit(tiny_graph("a0"), task_id="a0")).headers["X-Eas-Queueservice-Request-Id"]
    await until(lambda: store.get(SINK, 0, 1, first))
    assert (await store.stats(INPUT)).length == 0  # committed with the put

    # The sink is at its max length: the next result is refused, and its input stays uncommitted.
    second = (await live.submit(tiny_graph("a1"), task_id="a1")).headers["X-Eas-Queueservice-Request-Id"]
    async with live.input() as queue:
        await until(lambda: _pending(queue, 2))  # the worker took it
        await until(lambda: _held(caplog), what="the worker holding its result")
        assert (await store.stats(INPUT)).length == 1
        assert await store.get(SINK, 0, 1, second) == []
        [held] = await store.get(SINK, 0, 10, None)
        await store.remove(SINK, [held.index])  # a client takes the first result: room again
        await until(lambda: store.get(SINK, 0, 1, second))
        assert (await store.stats(INPUT)).length == 0
    metrics = await live.metrics()
    assert value(metrics, "comfyserve_api_worker_tasks_total", status="success") == 2
    assert value(metrics, "comfyserve_api_worker_redeliveries_total") == 0


async def _pending(queue: QueueClient, index: int) -> bool:
    return (await queue.search(index)).get("IsPending") is True


async def test_split_deployment_puts_then_commits(api: ApiFactory) -> None:
    live = await api(max_length=1)
    async with live.input() as queue, live.sink() as sink:
        ops = HttpQueueOps(queue, sink)
        first, _ = await queue.put(b"{}", {"requestId": "rid-0"})
        index = await ops.put_result_and_commit(b"[]", {"requestId": "rid-0", "task_id": "t0"}, first)
        assert [f.tags["task_id"] for f in await sink.get(index, 1)] == ["t0"]
        assert await ops.in_sink("rid-0") and await queue.get(0, 10) == []
        second, _ = await queue.put(b"{}", {"requestId": "rid-1"})
        with pytest.raises(SinkFull):  # back-pressure: the input is not committed
            await ops.put_result_and_commit(b"[]", {"requestId": "rid-1", "task_id": "t1"}, second)
        assert [f.index for f in await queue.get(0, 10)] == [second]
