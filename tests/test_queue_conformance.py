"""Queue-service conformance: the same stories on the SQLite and the Redis store,
through our async client and through the official SDK (a separate process)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from queue_service.client import DataFrame, QueueFullError
from queue_service.redis_store import RedisStore
from queue_service.server import STORE_KEY, WATCHERS_KEY
from queue_service.sqlite_store import SQLiteStore
from queue_service.store import QueueStore, Seen
from support.queue import PENDING_TIMEOUT_S, TOKEN, LiveQueue, record_long_polls, requires_sdk, start_sdk
from support.wait import until


async def next_frames(frames, count: int, timeout_s: float = 5.0) -> list[DataFrame]:
    out = []
    iterator = frames.__aiter__() if not hasattr(frames, "__anext__") else frames
    for _ in range(count):
        out.append(await asyncio.wait_for(iterator.__anext__(), timeout_s))
    return out


async def drop_watchers(live: LiveQueue) -> None:
    """The service loses every watch connection (as on a network fault): no goodbye, no release."""
    await live.app[WATCHERS_KEY].close_all(code=1011, message=b"test drop", release=False)


async def nothing_within(iterator, seconds: float) -> bool:
    try:
        await asyncio.wait_for(iterator.__anext__(), seconds)
    except TimeoutError:
        return True
    return False


# -- the SDK, unmodified ------------------------------------------------------------------


@requires_sdk
async def test_sdk_put_get_search_commit_truncate(live_queue: LiveQueue) -> None:
    out = await live_queue.sdk("basic")
    assert out["attrs_before"]["stream.length"] == "0"
    index, rid = out["put"]
    assert index == "1" and rid
    assert out["by_rid"] == [{"index": 1, "tags": {"task_id": "t1", "requestId": rid}, "data": "abc"}]
    assert out["by_index"] == out["by_rid"]
    assert out["search"] == {"IsPending": False, "WaitCount": 0}
    assert out["commit"] == "OK"
    assert out["after_commit"] == []
    assert out["binary"] == ["00ff62696e617279"]
    assert out["after_auto_delete"] == "0"
    assert out["truncate"] == "OK"
    attrs = out["attrs_after"]
    assert attrs["stream.length"] == "0" and attrs["stream.lastEntry"] == "5"
    assert attrs["meta.name"] == "svc/sink" and attrs["meta.backend"] == live_queue.backend
    for key in ("stream.firstEntry", "stream.approxMaxLength", "meta.state", "meta.maxPayloadBytes",
                "meta.header.user", "meta.header.group", "meta.header.priority"):
        assert isinstance(attrs[key], str)


@requires_sdk
async def test_sdk_watch_manual_and_auto_commit(live_queue: LiveQueue) -> None:
    await live_queue.sdk("put", args={"items": [str(n) for n in range(10)]})
    out = await live_queue.sdk("watch", args={"count": 10, "window": 5})
    assert [f["data"] for f in out["frames"]] == [str(n) for n in range(10)]
    assert out["attrs"]["stream.length"] == "0"

    await live_queue.sdk("put", args={"items": [str(n) for n in range(10)]})
    out = await live_queue.sdk("watch", args={"count": 10, "window": 5, "auto_commit": True})
    assert [f["data"] for f in out["frames"]] == [str(n) for n in range(10)]
    assert out["attrs"]["stream.length"] == "0"


@requires_sdk
async def test_sdk_watch_with_tags_gets_only_the_items_carrying_them(live_queue: LiveQueue) -> None:
    queue = live_queue.client()
    for n in range(6):
        await queue.put(f"item{n}", tags={"model": "sdxl" if n % 2 else "flux", "n": str(n)})
    out = await live_queue.sdk("watch", args={"count": 3, "window": 5, "tags": {"model": "sdxl"}})
    assert [f["data"] for f in out["frames"]] == ["item1", "item3", "item5"]
    assert out["attrs"]["stream.length"] == "3"  # the others stay for other watchers
    async with queue.watch(window=5, auto_commit=True) as watcher:
        assert [f.data for f in await next_frames(watcher, 3)] == [b"item0", b"item2", b"item4"]


@requires_sdk
async def test_sdk_concurrent_put_and_watch_loses_nothing(live_queue: LiveQueue) -> None:
    out = await live_queue.sdk("produce_consume", args={"count": 150})
    assert out == {"sent": 150, "same": True}


@requires_sdk
async def test_sdk_watcher_reconnects_and_gets_uncommitted_items_again(live_queue: LiveQueue) -> None:
    queue = live_queue.client()
    for n in range(6):
        await queue.put(str(n))
    # The SDK watcher commits nothing and reports after 3 frames; then the service drops it.
    proc = await start_sdk(live_queue.endpoint, "svc/sink", "watch",
                           {"count": 6, "window": 3, "no_commit": True, "signal_after": 3, "uid": "sdk-1"})
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
    except TimeoutError:
        proc.kill()
        raise AssertionError(await proc.communicate()) from None
    assert line.strip() == b"SIGNAL"
    await drop_watchers(live_queue)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()[-2000:]
    frames = json.loads(out.decode().strip().splitlines()[-1])["frames"]
    # The same three uncommitted items again after the reconnect, and nothing else (window 3).
    assert [f["data"] for f in frames] == ["0", "1", "2"] * 2


@requires_sdk
async def test_sdk_put_to_full_queue_is_refused_quickly(make_live_queue) -> None:
    live_queue = await make_live_queue(max_length=5)
    queue = live_queue.client()
    attrs = await queue.attributes()
    limit = int(attrs["stream.approxMaxLength"])
    for _ in range(limit):
        await queue.put(b"x")
    out = await live_queue.sdk("put_error")
    assert out["code"] == 429 and "full" in out["message"]
    assert out["elapsed_s"] < 2.0  # six cheap refusals, no retry storm
    with pytest.raises(QueueFullError):
        await queue.put(b"one more")


# -- our client ------------------------------------------------------------------------------


async def test_indexes_are_monotonic_per_queue_and_names_may_have_one_slash(live_queue: LiveQueue) -> None:
    a, b = live_queue.client("svc"), live_queue.client("svc/sink")
    assert [(await a.put(b"x"))[0] for _ in range(3)] == [1, 2, 3]
    assert (await b.put(b"y"))[0] == 1
    await a.commit([1, 2, 3])
    assert (await a.put(b"z"))[0] == 4  # never reused
    index, rid = await b.put(b"tagged", tags={"requestId": "mine", "task_id": "t9"})
    assert rid == "mine"
    [frame] = await b.get(request_id="mine")
    assert frame.tags == {"requestId": "mine", "task_id": "t9"} and frame.index == index
    [frame] = await b.get(tags={"task_id": "t9"})
    assert frame.data == b"tagged"


async def test_get_long_polls_and_auto_deletes(live_queue: LiveQueue) -> None:
    queue = live_queue.client()
    assert await queue.get(timeout_s=0) == []
    parked = record_long_polls(live_queue)
    waiting = asyncio.create_task(queue.get(index=1, timeout_s=5, auto_delete=True))
    await until(lambda: "svc/sink" in parked, what="the get parked")
    assert not waiting.done()
    await queue.put(b"late")
    [frame] = await asyncio.wait_for(waiting, 3)
    assert frame.data == b"late"
    assert (await queue.attributes())["stream.length"] == "0"
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await queue.get(index=99, timeout_s=1.0) == []
    assert 0.7 < loop.time() - started < 1.5  # answers a little before the client's timeout (0.9 s)


async def test_window_bounds_uncommitted_items_and_commit_opens_it(live_queue: LiveQueue) -> None:
    queue = live_queue.client()
    for n in range(5):
        await queue.put(str(n))
    async with queue.watch(window=2) as watcher:
        frames = watcher.__aiter__()
        got = await next_frames(frames, 2)
        assert [f.data for f in got] == [b"0", b"1"]
        assert await nothing_within(frames, 0.3)
        await queue.commit(got[0].index)
        [third] = await next_frames(frames, 1)
        assert third.data == b"2"
        assert (await queue.search(got[1].index)) == {"IsPending": True, "WaitCount": 0}
        assert (await queue.search(5)) == {"IsPending": False, "WaitCount": 1}
        assert await queue.search(got[0].index) is None  # committed: gone for good


async def test_auto_commit_removes_items_as_they_are_sent(live_queue: LiveQueue) -> None:
    queue = live_queue.client()
    for n in range(4):
        await queue.put(str(n))
    async with queue.watch(window=2, auto_commit=True) as watcher:
        got = await next_frames(watcher, 4)
    assert [f.data for f in got] == [b"0", b"1", b"2", b"3"]
    assert (await queue.attributes())["stream.length"] == "0"


async def test_priority_items_come_first(live_queue: LiveQueue) -> None:
    queue = live_queue.client()
    for n in range(3):
        await queue.put(f"normal{n}")
    await queue.put("urgent", priority=1)
    _, rid = await queue.put("urgent2", tags={"_priority_": "1"})
    async with queue.watch(window=5, auto_commit=True) as watcher:
        got = await next_frames(watcher, 5)
    assert [f.data for f in got] == [b"urgent", b"urgent2", b"normal0", b"normal1", b"normal2"]
    assert "_priority_" not in got[1].tags and got[1].tags["requestId"] == rid


async def test_watchers_with_tags_share_a_queue_by_tag(live_queue: LiveQueue) -> None:
    producer = live_queue.client()
    for n in range(4):
        await producer.put(f"a{n}", tags={"pool": "a"})
        await producer.put(f"b{n}", tags={"pool": "b"})
    await producer.put("urgent-b", tags={"pool": "b"}, priority=1)
    await producer.put("untagged")
    for_a, for_b = live_queue.client(), live_queue.client()
    async with for_a.watch(window=2, tags={"pool": "a"}) as a_frames, \
            for_b.watch(window=10, tags={"pool": "b"}) as b_frames:
        got_a = await next_frames(a_frames, 2)
        assert await nothing_within(a_frames, 0.3)  # window 2: the rest waits for a commit
        await for_a.commit([f.index for f in got_a])
        got_a += await next_frames(a_frames, 2)
        await for_a.commit([f.index for f in got_a[2:]])
        got_b = await next_frames(b_frames, 5)
        assert await nothing_within(b_frames, 0.3)  # no other item carries pool=b
        await producer.put("late-b", tags={"pool": "b", "extra": "x"})  # more tags than asked still match
        got_b += await next_frames(b_frames, 1)
    assert [f.data for f in got_a] == [b"a0", b"a1", b"a2", b"a3"]
    assert [f.data for f in got_b] == [b"urgent-b", b"b0", b"b1", b"b2", b"b3", b"late-b"]
    async with producer.watch(window=5, tags={"pool": "c"}) as none_frames:
        assert await nothing_within(none_frames, 0.3)
    async with producer.watch(window=5, tags={"requestId": got_b[0].request_id or ""}) as by_id:
        assert [f.data for f in await next_frames(by_id, 1)] == [b"urgent-b"]  # for_b's close gave it back
    async with producer.watch(window=20, auto_commit=True) as everything:
        rest = {f.data for f in await next_frames(everything, 7)}
    assert rest == {b"untagged", *(f.data for f in got_b)}  # for_b left without commits: its items came back


async def test_watch_tags_match_exact_values_in_any_characters(live_queue: LiveQueue) -> None:
    queue = live_queue.client()
    await queue.put("near", tags={"who": "猫 & =x "})
    await queue.put("long", tags={"who": "猫 & =x" * 40})  # a value longer than 127 bytes (2-byte length)
    await queue.put("exact", tags={"who": "猫 & =x"})
    async with queue.watch(window=5, auto_commit=True, tags={"who": "猫 & =x"}) as frames:
        assert [f.data for f in await next_frames(frames, 1)] == [b"exact"]
    async with queue.watch(window=5, auto_commit=True, tags={"who": "猫 & =x" * 40}) as frames:
        assert [f.data for f in await next_frames(frames, 1)] == [b"long"]
    assert (await queue.attributes())["stream.length"] == "1"


async def test_watch_from_index_skips_older_items(live_queue: LiveQueue) -> None:
    queue = live_queue.client()
    for n in range(4):
        await queue.put(str(n))
    async with queue.watch(index=3, window=5, index_only=True) as watcher:
        got = await next_frames(watcher, 2)
    assert [(f.index, f.data) for f in got] == [(3, b""), (4, b"")]
    assert "requestId" in got[0].tags


async def test_consumers_share_a_queue_each_item_goes_to_one(live_queue: LiveQueue) -> None:
    producer = live_queue.client()
    seen: dict[str, list[int]] = {"a": [], "b": []}

    async def consume(name: str) -> None:
        queue = live_queue.client()
        async with queue.watch(window=3) as watcher:
            async for frame in watcher:
                seen[name].append(frame.index)
                await queue.commit(frame.index)
                if sum(map(len, seen.values())) >= 60:
                    return

    consumers = [asyncio.create_task(consume("a")), asyncio.create_task(consume("b"))]
    for _ in range(200):  # both watches are open before the first put
        if (await producer.attributes())["consumers.status.total"] == "2":
            break
        await asyncio.sleep(0.02)
    for n in range(60):
        await producer.put(str(n))
    await asyncio.wait_for(asyncio.wait(consumers, return_when=asyncio.FIRST_COMPLETED), 10)
    for task in consumers:
        task.cancel()
    everything = seen["a"] + seen["b"]
    assert sorted(everything) == list(range(1, 61))  # each exactly once
    assert seen["a"] and seen["b"]


async def test_items_of_a_vanished_consumer_reach_another_and_committed_never_return(
        live_queue: LiveQueue) -> None:
    producer = live_queue.client()
    for n in range(3):
        await producer.put(str(n))
    first = live_queue.client()
    watcher = first.watch(window=3)
    got = await next_frames(watcher, 3)
    await first.commit(got[0].index)
    # Vanish without a goodbye: the service only sees the socket drop.
    await drop_watchers(live_queue)
    watcher._closed = True  # stop this client from reconnecting
    second = live_queue.client()
    async with second.watch(window=5) as other:
        loop = asyncio.get_running_loop()
        started = loop.time()
        again = await next_frames(other, 2, timeout_s=PENDING_TIMEOUT_S * 5)
        assert loop.time() - started >= PENDING_TIMEOUT_S * 0.5
        assert [f.data for f in again] == [b"1", b"2"]
        assert await nothing_within(other, PENDING_TIMEOUT_S * 2)


async def test_reconnecting_consumer_resumes_with_its_pending_items(live_queue: LiveQueue) -> None:
    queue = live_queue.client(uid="worker-1")
    for n in range(4):
        await queue.put(str(n))
    async with queue.watch(window=2) as watcher:
        got = await next_frames(watcher, 2)
        await queue.commit(got[0].index)
        await drop_watchers(live_queue)  # the client reconnects itself
        resumed = await next_frames(watcher, 2)
        assert watcher.reconnects == 1
    assert [f.data for f in got + resumed] == [b"0", b"1", b"1", b"2"]


async def test_a_clean_close_gives_pending_items_back_at_once(make_live_queue) -> None:
    live_queue = await make_live_queue(pending_timeout_s=60.0)  # so only the release can bring them back
    queue = live_queue.client()
    for n in range(2):
        await queue.put(str(n))
    async with queue.watch(window=2) as watcher:
        await next_frames(watcher, 2)
    other = live_queue.client()
    async with other.watch(window=2) as watcher:
        got = await next_frames(watcher, 2, timeout_s=10)
    assert [f.data for f in got] == [b"0", b"1"]


async def test_delete_and_truncate(live_queue: LiveQueue) -> None:
    queue = live_queue.client()
    for n in range(6):
        await queue.put(str(n))
    await queue.delete([2, 4])
    await queue.truncate(4)
    frames = await queue.get(length=10)
    assert [f.index for f in frames] == [5, 6]
    attrs = await queue.attributes()
    assert (attrs["stream.length"], attrs["stream.firstEntry"], attrs["stream.lastEntry"]) == ("2", "5", "6")


async def test_health_needs_no_token(live_queue: LiveQueue) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://{live_queue.endpoint}/healthz")
        assert response.status_code == 200
        refused = await http.get(f"http://{live_queue.endpoint}/api/predict/svc", params={"_attrs_": "true"})
        assert refused.status_code == 401
        assert TOKEN not in refused.text


async def test_concurrent_puts_get_distinct_indexes_and_respect_max_length(make_live_queue) -> None:
    live = await make_live_queue(max_length=20)
    producers = [live.client() for _ in range(5)]
    results = await asyncio.gather(*(producers[n % 5].put(str(n)) for n in range(30)), return_exceptions=True)
    accepted = sorted(index for index, _ in (r for r in results if isinstance(r, tuple)))
    refused = [r for r in results if isinstance(r, QueueFullError)]
    assert accepted == list(range(1, 21)) and len(refused) == 10
    assert (await producers[0].attributes())["stream.length"] == "20"


async def test_a_busy_watcher_keeps_the_items_it_holds(live_queue: LiveQueue) -> None:
    """Leases are renewed while a watcher is busy, not only while it idles."""
    producer, holder, other = live_queue.client(), live_queue.client(), live_queue.client()
    held_index, _ = await producer.put(b"held")
    stolen: list[int] = []

    async def watch_other() -> None:
        async with other.watch(window=5) as frames:
            async for frame in frames:
                stolen.append(frame.index)
                await other.commit(frame.index)

    async with holder.watch(window=2) as frames:
        first = await asyncio.wait_for(frames.__anext__(), 5)
        assert first.index == held_index
        watching = asyncio.create_task(watch_other())
        loop = asyncio.get_running_loop()
        until = loop.time() + PENDING_TIMEOUT_S * 2
        while loop.time() < until:
            await producer.put(b"flow")
            try:
                frame = await asyncio.wait_for(frames.__anext__(), 0.2)
                await holder.commit(frame.index)
            except TimeoutError:
                pass
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
    assert held_index not in stolen


@requires_sdk
@pytest.mark.parametrize("store_kind", ["sqlite"])  # pings are the front's business: one store is enough
async def test_sdk_watcher_idles_through_its_pings(live_queue: LiveQueue, store_kind: str) -> None:
    proc = await start_sdk(live_queue.endpoint, "svc/sink", "watch", {"count": 1, "window": 1,
                                                                      "report_pings": True})
    assert proc.stdout is not None
    for _ in range(2):  # two rounds of the SDK's own 2 s keep-alive pings on an idle watch
        assert (await asyncio.wait_for(proc.stdout.readline(), 20)).strip() == b"PING"
    await live_queue.client().put(b"after a quiet while")
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()[-2000:]
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert [f["data"] for f in result["frames"]] == ["after a quiet while"]
    assert "reconnect" not in err.decode()


# -- idempotent puts (QueueStore.put_once) --------------------------------------------------------


async def test_a_put_with_a_seen_key_answers_the_first_put_and_stores_nothing(live_queue: LiveQueue) -> None:
    queue = live_queue.client()
    first = await queue.put("a", {"task_id": "t"}, idempotency_key="k1")
    assert await queue.put("b", {"task_id": "t"}, idempotency_key="k1") == first
    other = await queue.put("c", idempotency_key="k2")
    assert other[0] == first[0] + 1 and other[1] != first[1]
    assert [f.data for f in await queue.get(length=10)] == [b"a", b"c"]
    await queue.commit([first[0]])  # consumed since: the key still answers the first put
    assert await queue.put("d", idempotency_key="k1") == first
    assert await queue.put("e", idempotency_key="k1", tags={"requestId": "mine"}) == first
    assert (await queue.attributes())["stream.length"] == "1"
    async with httpx.AsyncClient(base_url=f"http://{live_queue.endpoint}") as http:
        replay = await http.post("/api/predict/svc/sink", content=b"f", headers={
            "Authorization": TOKEN, "Idempotency-Key": "k2"})
        assert replay.headers["Idempotent-Replayed"] == "true" and replay.text == str(other[0])


async def test_concurrent_puts_with_one_key_make_one_item(live_queue: LiveQueue) -> None:
    producers = [live_queue.client() for _ in range(5)]
    results = await asyncio.gather(*(producers[n % 5].put(str(n), idempotency_key="once") for n in range(20)))
    assert len(set(results)) == 1
    assert (await producers[0].attributes())["stream.length"] == "1"


async def test_keys_are_per_queue_a_full_queue_remembers_nothing_and_ttl_bounds_memory(make_live_queue) -> None:
    live = await make_live_queue(max_length=1)
    sink, other = live.client(), live.client("svc")
    assert (await sink.put("a", idempotency_key="k"))[0] == 1
    assert (await other.put("a", idempotency_key="k"))[0] == 1  # another queue: another key space
    with pytest.raises(QueueFullError):
        await sink.put("b", idempotency_key="full")
    await sink.commit([1])
    assert (await sink.put("b", idempotency_key="full"))[0] == 2  # the refused put left no key behind
    store = live.app[STORE_KEY]
    await sink.commit([2])
    first = await store.put_once("svc/sink", b"x", "r1", 0, 0, key="short", ttl_s=0)
    second = await store.put_once("svc/sink", b"x", "r2", 0, 0, key="short", ttl_s=0)
    assert not first.duplicate and not second.duplicate and second.index == first.index + 1


async def test_a_request_id_that_cannot_be_a_header_is_refused_before_the_put(live_queue: LiveQueue) -> None:
    async with httpx.AsyncClient(base_url=f"http://{live_queue.endpoint}") as http:
        for rid in ("a\r\nb", "nul\x00", "x" * 257):
            response = await http.post("/api/predict/svc/sink", params={"requestId": rid}, content=b"a",
                                       headers={"Authorization": TOKEN})
            assert response.status_code == 400, response.text
        response = await http.post("/api/predict/svc/sink", content=b"a",
                                   headers={"Authorization": TOKEN, "Idempotency-Key": "k" * 257})
        assert response.status_code == 400
    assert await live_queue.client().get(length=5) == []


# -- remembered removals (QueueStore.lookup) ------------------------------------------------------


async def test_lookup_finds_an_item_on_the_queue_and_after_it_was_committed(live_queue: LiveQueue) -> None:
    queue = live_queue.client()
    assert await queue.lookup("r1") is None  # no queue yet
    for n in range(1, 6):
        await queue.put(f"item {n}", {"requestId": f"r{n}"})
    assert await queue.lookup("r1") == Seen(1, committed=False)
    await queue.commit([1])
    await queue.delete([2])
    await queue.get(3, 1, auto_delete=True)
    await queue.truncate(5)  # drops 4
    for n in range(1, 5):
        assert await queue.lookup(f"r{n}") == Seen(n, committed=True)
    assert await queue.lookup("r5") == Seen(5, committed=False)
    async with queue.watch(window=1, auto_commit=True) as frames:
        [frame] = await next_frames(frames, 1)
    assert frame.index == 5 and await queue.lookup("r5") == Seen(5, committed=True)
    assert await queue.lookup("never") is None
    async with httpx.AsyncClient(base_url=f"http://{live_queue.endpoint}") as http:
        response = await http.get("/api/predict/svc/sink", params={"_lookup_": "true"},
                                  headers={"Authorization": TOKEN})
        assert response.status_code == 400 and "requestId" in response.json()["error"]["message"]


async def test_remembered_removals_are_bounded_in_number_and_time(store_kind: str, request: pytest.FixtureRequest,
                                                                  tmp_path: Path) -> None:
    def open_store(**bounds: Any) -> QueueStore:
        if store_kind == "redis":
            return RedisStore(request.getfixturevalue("redis_url"), **bounds)
        return SQLiteStore(tmp_path / "queue.sqlite3", **bounds)

    store = open_store(committed_max=3)
    await store.open()
    try:
        indexes = [await store.put("q", b"x", f"r{n}", 0, 0) for n in range(5)]
        for index in indexes:
            await store.remove("q", [index])
        assert [await store.lookup("q", f"r{n}") for n in range(5)] == [
            None, None, Seen(3, True), Seen(4, True), Seen(5, True)]  # the oldest two are forgotten
    finally:
        await store.close()
    store = open_store(committed_ttl_s=0.2, committed_max=100)
    await store.open()
    try:
        index = await store.put("t", b"x", "soon-gone", 0, 0)
        await store.remove("t", [index])
        assert await store.lookup("t", "soon-gone") == Seen(index, True)
        await until(lambda: _forgotten(store, "t", "soon-gone"), timeout_s=10, what="the TTL forgets it")
    finally:
        await store.close()


async def _forgotten(store: QueueStore, queue: str, request_id: str) -> bool:
    return await store.lookup(queue, request_id) is None
