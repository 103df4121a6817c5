"""Bad input and faults: each gets a clear error or is survived; no accepted item is lost."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest
import websockets
from aiohttp import web

from queue_service.client import QueueClient, QueueClientError
from queue_service.protocol import encode_body, encode_frame, encode_frame_list
from queue_service.redis_store import RedisStore
from queue_service.server import create_app
from queue_service.store import Seen, StoreUnavailable, wait_event
from support.processes import RedisServer
from support.queue import (
    PENDING_TIMEOUT_S,
    TOKEN,
    LiveQueue,
    record_long_polls,
    requires_sdk,
    run_sdk,
    settings_for,
    start_sdk,
)
from support.wait import until

AUTH = {"Authorization": TOKEN}


async def call(live: LiveQueue, method: str, queue: str = "svc", **kwargs) -> httpx.Response:
    async with httpx.AsyncClient(headers={**AUTH, **kwargs.pop("headers", {})}) as http:
        return await http.request(method, f"http://{live.endpoint}/api/predict/{queue}", **kwargs)


def assert_error(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert words in message, message


async def test_bad_parameters_get_a_clear_400(live_queue: LiveQueue) -> None:
    await live_queue.client("svc").put(b"x")
    cases = [
        ("GET", {"_search_": "true", "_index_": "abc"}, "_index_ must be an integer"),
        ("GET", {"_index_": "-1"}, "_index_ must be between"),
        ("GET", {"_length_": "0"}, "_length_ must be between 1"),
        ("GET", {"_length_": "100000"}, "_length_ must be between 1"),
        ("GET", {"_timeout_": "soon"}, "_timeout_ must be a duration"),
        ("GET", {"_timeout_": "2h"}, "_timeout_ must be a duration"),
        ("GET", {"_auto_delete_": "maybe"}, "_auto_delete_ must be true or false"),
        ("PUT", {"_indexes_": "1,x"}, "_indexes_ must list positive integers"),
        ("PUT", {"_indexes_": "0"}, "_indexes_ must list positive integers"),
        ("PUT", {}, "_indexes_ is required"),
        ("DELETE", {"_indexes_": "1;2"}, "_indexes_ must list positive integers"),
        ("DELETE", {"_trunc_": "true"}, "_index_ is required"),
        ("POST", {"_priority_": "high"}, "_priority_ must be an integer"),
        ("POST", {"_eos_": "true"}, "_eos_ is not supported"),
        ("PUT", {"_indexes_": "1", "_negative_": "true"}, "_negative_ is not supported"),
    ]
    for method, query, words in cases:
        assert_error(await call(live_queue, method, params=query), 400, words)
    assert_error(await call(live_queue, "GET", queue="bad%20name", params={"_attrs_": "true"}), 400,
                 "bad queue name")
    assert (await call(live_queue, "GET", queue="a/b/c")).status_code == 404  # at most one '/'
    assert (await call(live_queue, "GET", params={"_count_": "true"})).text == "1"  # nothing was committed


async def test_unknown_queue_and_index(live_queue: LiveQueue) -> None:
    assert_error(await call(live_queue, "PUT", queue="nobody", params={"_indexes_": "1"}), 404, "does not exist")
    assert_error(await call(live_queue, "DELETE", queue="nobody", params={"_indexes_": "1"}), 404,
                 "does not exist")
    assert_error(await call(live_queue, "GET", queue="nobody", params={"_search_": "true", "_index_": "1"}), 404,
                 "does not exist")
    await live_queue.client("svc").put(b"x")
    assert_error(await call(live_queue, "GET", params={"_search_": "true", "_index_": "7"}), 404, "not in queue")
    # Unknown items in a commit are fine (commit is idempotent); an empty get is an empty list.
    assert (await call(live_queue, "PUT", params={"_indexes_": "1,7"})).text == "OK"
    assert (await call(live_queue, "GET", queue="nobody", params={"_index_": "0"})).content == b""


async def test_payload_over_the_max_is_refused(live_queue: LiveQueue) -> None:
    limit = int((await live_queue.client().attributes())["meta.maxPayloadBytes"])
    assert_error(await call(live_queue, "POST", content=b"x" * (limit + 1)), 413, f"exceeds {limit} bytes")

    async def chunks():
        for _ in range(limit // 1000 + 2):
            yield b"y" * 1000

    assert_error(await call(live_queue, "POST", content=chunks()), 413, "exceeds")
    assert (await call(live_queue, "POST", content=b"x" * limit)).status_code == 200


async def test_wrong_token_is_refused_everywhere(live_queue: LiveQueue) -> None:
    wrong = live_queue.client(token="nope")
    with pytest.raises(QueueClientError) as info:
        await wrong.put(b"x")
    assert info.value.status == 401
    with pytest.raises(QueueClientError) as info:
        async for _ in wrong.watch():
            break
    assert info.value.status == 401
    with pytest.raises(QueueClientError) as info:
        async for _ in live_queue.client().watch(window=0):
            break
    assert info.value.status == 400 and "_window_" in info.value.message


@requires_sdk
async def test_sdk_sees_wrong_token_and_oversize_as_final_errors(live_queue: LiveQueue) -> None:
    out = await live_queue.sdk("put_error", token="nope")
    assert out["code"] == 401
    out = await live_queue.sdk("put_error", args={"data": "z" * (64 * 1024 + 1)})
    assert out["code"] == 413


async def test_watcher_sending_garbage_is_ignored(live_queue: LiveQueue) -> None:
    url = f"ws://{live_queue.endpoint}/api/predict/svc?_watch_=true&_window_=2&_auto_commit_=true"
    async with websockets.connect(url, additional_headers=AUTH) as ws:
        await ws.send("garbage")
        await ws.send(b"\xff\x00\x13 not protobuf")
        await live_queue.client("svc").put(b"still here")
        frame = await asyncio.wait_for(ws.recv(), 5)
        assert isinstance(frame, bytes) and frame.endswith(b"still here")


@requires_sdk
async def test_sdk_watcher_killed_mid_watch_its_items_reach_another(live_queue: LiveQueue) -> None:
    producer = live_queue.client()
    for n in range(4):
        await producer.put(str(n))
    proc = await start_sdk(live_queue.endpoint, "svc/sink", "watch",
                           {"count": 100, "window": 2, "no_commit": True, "signal_after": 2})
    assert proc.stdout is not None
    assert (await asyncio.wait_for(proc.stdout.readline(), 20)).strip() == b"SIGNAL"
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    other = live_queue.client()
    async with other.watch(window=10) as watcher:
        got = [await asyncio.wait_for(watcher.__anext__(), PENDING_TIMEOUT_S * 6) for _ in range(4)]
    assert sorted(f.data for f in got) == [b"0", b"1", b"2", b"3"]


@pytest.mark.parametrize("store_kind", ["redis"])  # several service processes share a store only with Redis
async def test_two_service_processes_on_one_redis_share_queues(make_live_queue, store_kind: str) -> None:
    one, two = await make_live_queue(), await make_live_queue()
    seen: list[int] = []

    async def consume(live: LiveQueue) -> None:
        queue = live.client()
        async with queue.watch(window=2) as watcher:
            async for frame in watcher:
                seen.append(frame.index)
                await queue.commit(frame.index)

    consumers = [asyncio.create_task(consume(one)), asyncio.create_task(consume(two))]
    producers = [one.client(), two.client()]
    for n in range(40):
        await producers[n % 2].put(str(n))
    await until(lambda: len(seen) >= 40, what="all 40 items consumed")

    async def all_committed() -> bool:  # then nothing can be delivered a second time
        return (await one.client().attributes())["stream.length"] == "0"

    await until(all_committed, what="all 40 items committed")
    for task in consumers:
        task.cancel()
    await asyncio.gather(*consumers, return_exceptions=True)
    assert sorted(seen) == list(range(1, 41))
    assert (await one.client().attributes())["stream.length"] == "0"

    # A long-poll get on one process wakes at once for a put on the other.
    parked = record_long_polls(two)
    waiting = asyncio.create_task(two.client().get(index=1, timeout_s=20))
    await until(lambda: "svc/sink" in parked, what="the get parked on the second service")
    loop = asyncio.get_running_loop()
    started = loop.time()
    put_index, _ = await producers[0].put(b"wake up")
    [woken] = await asyncio.wait_for(waiting, 5)
    assert woken.index == put_index and loop.time() - started < 5.0  # not the 19.5 s of the long poll
    await producers[0].commit(put_index)

    # A consumer that reconnects to the other process takes its pending items along.
    await producers[0].put(b"p")
    first = one.client(uid="roamer")
    watcher_a = first.watch(window=1)
    item = await asyncio.wait_for(watcher_a.__anext__(), 5)
    second = two.client(uid="roamer")
    async with second.watch(window=1) as watcher_b:
        again = await asyncio.wait_for(watcher_b.__anext__(), 5)
        assert again.index == item.index
        with pytest.raises(QueueClientError) as info:
            await asyncio.wait_for(watcher_a.__anext__(), 5)  # the stale socket is closed by its service
        assert info.value.status == 409


async def test_commit_is_final_even_for_a_resuming_consumer(live_queue: LiveQueue) -> None:
    queue = live_queue.client(uid="resumer")
    for n in range(3):
        await queue.put(str(n))
    watcher = queue.watch(window=3)
    got = [await asyncio.wait_for(watcher.__anext__(), 5) for _ in range(3)]
    await queue.commit([f.index for f in got[:2]])
    again = QueueClient(live_queue.endpoint, "svc/sink", token=TOKEN, uid="resumer")
    try:
        async with again.watch(window=3) as resumed:
            frame = await asyncio.wait_for(resumed.__anext__(), 5)
            assert frame.data == b"2"
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(resumed.__anext__(), PENDING_TIMEOUT_S * 2)
    finally:
        await again.aclose()
        await watcher.aclose()


@requires_sdk
async def test_sdk_put_and_get_through_run_sdk_helper(live_queue: LiveQueue) -> None:
    out = await run_sdk(live_queue.endpoint, "svc", "put", {"items": ["a", "b"], "tags": {"k": "v"}})
    assert [index for index, _ in out["put"]] == [1, 2]
    frames = await live_queue.client("svc").get(length=5, tags={"k": "v"})
    assert [f.data for f in frames] == [b"a", b"b"]


async def test_a_hung_redis_gets_503_within_the_call_timeout_and_the_service_recovers(
        tmp_path, aiohttp_server) -> None:
    """Redis stops answering without dropping the connection (SIGSTOP): calls end with 503, not never."""
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        settings = settings_for("redis", tmp_path, redis.url)
        app = create_app(settings, store=RedisStore(redis.url, call_timeout_s=0.5))
        server = await aiohttp_server(app)
        live = LiveQueue(app=app, port=server.port, backend="redis")
        async with QueueClient(live.endpoint, "svc", token=TOKEN) as queue:
            first, _ = await queue.put(b"before")
            assert redis.proc is not None
            redis.proc.send_signal(signal.SIGSTOP)
            try:
                started = asyncio.get_running_loop().time()
                during = await call(live, "POST", content=b"during")
                assert_error(during, 503, "may have been stored")
                during_id = during.headers["X-Eas-Queueservice-Request-Id"]
                assert during_id in during.json()["error"]["message"]
                assert_error(await call(live, "GET", params={"_attrs_": "true"}), 503, "redis")
                assert asyncio.get_running_loop().time() - started < 5
            finally:
                redis.proc.send_signal(signal.SIGCONT)
            for _ in range(50):  # the service finds its feet again on its own
                response = await call(live, "POST", content=b"after")
                if response.status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert response.status_code == 200
            # The put that got 503 ran once Redis woke up; its requestId tells the client so.
            assert [f.data for f in await queue.get(request_id=during_id)] == [b"during"]
            async with queue.watch(window=5, auto_commit=True) as frames:
                got = [await asyncio.wait_for(frames.__anext__(), 5) for _ in range(3)]
            assert got[0].index == first and [f.data for f in got] == [b"before", b"during", b"after"]
            await server.close()  # shutting down does not hang either
    finally:
        redis.stop()


async def test_a_redis_that_never_answers_says_so_in_the_error(silent_redis: str) -> None:
    """A call cut off by the store's own bound names the bound (asyncio's TimeoutError has no text)."""
    store = RedisStore(silent_redis, call_timeout_s=0.2)
    try:
        with pytest.raises(StoreUnavailable, match=r"^redis: no answer within 0.2 s$"):
            await store.open()
    finally:
        await store.close()


async def test_lookup_against_a_queue_service_without_it_falls_back_to_a_get(aiohttp_server) -> None:
    """The platform's queue service answers the unknown ``_lookup_`` as a get by requestId (a frame list)."""
    async def platform(request: web.Request) -> web.Response:
        frames = []
        if request.query.get("requestId") == "there":
            frames = [encode_frame(7, encode_body({"requestId": "there"}, b"result"))]
        return web.Response(body=encode_frame_list(frames), content_type="application/vnd.google.protobuf")

    app = web.Application()
    app.router.add_get("/api/predict/{name:.+}", platform)
    server = await aiohttp_server(app)
    async with QueueClient(f"127.0.0.1:{server.port}", "svc/sink") as sink:
        assert await sink.lookup("there") == Seen(7, committed=False)
        assert await sink.lookup("elsewhere") is None


async def test_a_cancel_landing_with_the_event_is_not_swallowed() -> None:
    """A long poll cancelled (client gone, shutdown) in the same loop turn as its event is set ends cancelled:
    ``asyncio.wait_for`` on 3.11 returned the result and dropped the cancel."""
    event = asyncio.Event()
    waiter = asyncio.create_task(wait_event(event, 30.0))

    def set_and_cancel() -> None:  # runs after the waiter's first step (call_soon is FIFO): it is parked
        event.set()
        waiter.cancel()

    asyncio.get_running_loop().call_soon(set_and_cancel)
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert await wait_event(event, 0.0) is True
    assert await wait_event(asyncio.Event(), 0.0) is False
