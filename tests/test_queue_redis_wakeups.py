"""The Redis store's wake-ups cost no more Redis work than they must (the queue service's hot path).

A change written by the process whose watchers wait wakes them without pub/sub; a watcher that
drained the queue goes back to waiting without asking Redis again; watchers of other processes
still wake at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub

from queue_service.protocol import encode_body
from queue_service.redis_store import CHANNEL, RedisStore
from queue_service.server import create_app
from queue_service.store import wait_event
from support.queue import TOKEN, settings_for

LEASE_S = 30.0


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def stores(redis_url: str) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """Two stores on one Redis: two service processes as far as Redis can tell."""
    pair = (RedisStore(redis_url), RedisStore(redis_url))
    for store in pair:
        await store.open()
    yield pair
    for store in pair:
        await store.close()


async def put(store: RedisStore, queue: str, data: bytes) -> int:
    return await store.put(queue, encode_body({"requestId": data.decode()}, data), data.decode(), 0, 0)


async def claim(store: RedisStore, queue: str, consumer: str = "g/c", session: str = "s") -> list[int]:
    items = await store.claim(queue, consumer, session, window=8, min_index=0, auto_commit=False, lease_s=LEASE_S)
    return [item.index for item in items]


async def first_notice(pubsub: PubSub) -> bytes:
    async for message in pubsub.listen():
        if message["type"] == "message":
            return message["data"]
    raise AssertionError("the subscription ended")


async def script_calls(admin: aioredis.Redis) -> int:
    return int((await admin.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0))


async def test_only_a_change_another_process_waits_for_is_published(
        stores: tuple[RedisStore, RedisStore], admin: aioredis.Redis) -> None:
    one, two = stores
    pubsub = admin.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(CHANNEL)
    try:
        # A watcher of process one drains "alone"; process one's own put wakes it without a notice.
        await one.open_session("alone", "g/c", "s", LEASE_S)
        assert await claim(one, "alone") == []
        changed = one.changes("alone")
        await put(one, "alone", b"a")
        assert changed.is_set()
        # Process two waits on "shared": process one's put there is published, and reaches two.
        await two.arm("shared")
        woken = two.changes("shared")
        await put(one, "shared", b"b")
        assert await wait_event(woken, 5.0)
        # Pub/sub keeps order: the first notice is the one for "shared" (none was sent for "alone").
        assert await asyncio.wait_for(first_notice(pubsub), 5.0) == b"shared"
    finally:
        await pubsub.aclose()


async def test_a_watcher_that_drained_the_queue_waits_without_asking_again(
        stores: tuple[RedisStore, RedisStore], admin: aioredis.Redis) -> None:
    one, two = stores
    await one.open_session("q", "g/c", "s", LEASE_S)
    first, second = await put(one, "q", b"a"), await put(one, "q", b"b")
    assert await claim(one, "q") == [first, second]  # fewer than the window: drained

    before = await script_calls(admin)
    assert await claim(one, "q") == []  # nothing changed since: answered without Redis
    assert await script_calls(admin) == before
    assert await claim(one, "q") == []  # only once: after a (timed-out) wait it asks Redis again
    assert await script_calls(admin) == before + 1

    # A put in this process or another one makes the next claim ask Redis and find it.
    assert await claim(one, "q") == [] and await script_calls(admin) == before + 2  # drained, nothing taken
    woken = one.changes("q")
    third = await put(two, "q", b"c")
    assert await wait_event(woken, 5.0)  # the notice from the other process
    assert await claim(one, "q") == [third]
    fourth = await put(one, "q", b"d")
    assert await claim(one, "q") == [fourth]


async def test_a_commit_does_not_make_a_drained_watcher_ask_again(
        stores: tuple[RedisStore, RedisStore], admin: aioredis.Redis) -> None:
    """A removal makes nothing ready: a watcher that drained the queue and is woken by a commit alone goes
    back to waiting without a claim (once per claim Redis answered: leases that ran out tell no one)."""
    one, two = stores
    await one.open_session("q", "g/c", "s", LEASE_S)
    first, second = await put(one, "q", b"a"), await put(one, "q", b"b")
    assert await claim(one, "q") == [first, second]  # fewer than the window: drained
    assert await claim(one, "q") == []  # nothing changed: answered without Redis

    before = await script_calls(admin)
    woken = one.changes("q")
    await one.remove("q", [first])  # the watcher's commit wakes it
    assert woken.is_set()
    assert await claim(one, "q") == []
    assert await script_calls(admin) == before + 1  # the commit alone
    await one.remove("q", [second])
    assert await claim(one, "q") == []  # the second wake-up since Redis answered asks again
    assert await script_calls(admin) == before + 3

    # A change after a removal is not missed: the removal's wake-up does not hide the next one.
    await one.remove("q", [second])
    woken = one.changes("q")
    third = await put(two, "q", b"c")
    assert await wait_event(woken, 5.0)
    assert await claim(one, "q") == [third]
    # Nor is one in this process.
    await one.remove("q", [third])
    fourth = await put(one, "q", b"d")
    assert await claim(one, "q") == [fourth]


async def test_a_redis_that_lost_its_scripts_gets_them_again(
        stores: tuple[RedisStore, RedisStore], admin: aioredis.Redis) -> None:
    """The scripts run by SHA; a restarted or flushed script cache costs one load, not a failure."""
    one, _ = stores
    await one.open_session("q", "g/c", "s", LEASE_S)
    first = await put(one, "q", b"a")
    await admin.script_flush()
    second = await put(one, "q", b"b")
    assert second == first + 1
    assert await claim(one, "q") == [first, second]


async def test_a_commit_is_one_redis_call(redis_url: str, tmp_path: Path, aiohttp_server: Any,
                                          admin: aioredis.Redis) -> None:
    """The hot path: a commit runs the removal script and nothing else; only a commit that removed
    nothing asks whether the queue exists (404 for a queue never put to)."""
    server = await aiohttp_server(create_app(settings_for("redis", tmp_path, redis_url)))
    base = f"http://127.0.0.1:{server.port}/api/predict"
    async with httpx.AsyncClient(headers={"Authorization": TOKEN}) as http:
        index = int((await http.post(f"{base}/q", content=b"a")).text)
        await admin.config_resetstat()
        assert (await http.put(f"{base}/q", params={"_indexes_": str(index)})).text == "OK"
        stats = await admin.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] == 1 and "cmdstat_exists" not in stats
        assert (await http.put(f"{base}/q", params={"_indexes_": str(index)})).text == "OK"  # already gone
        assert (await http.put(f"{base}/nobody", params={"_indexes_": "1"})).status_code == 404


async def test_one_removal_of_many_items_keeps_the_remembered_bound(redis_url: str, admin: aioredis.Redis) -> None:
    """Old removals are forgotten once per script, not once per removed item: the bound still holds."""
    store = RedisStore(redis_url, committed_max=3)
    await store.open()
    try:
        indexes = [await put(store, "q", f"r{n}".encode()) for n in range(5)]
        assert await store.remove("q", indexes) == 5
        assert await admin.zcard("cqs:{q}:done") == 3 and await admin.hlen("cqs:{q}:doneidx") == 3
        assert sum([await store.lookup("q", f"r{n}") is not None for n in range(5)]) == 3
    finally:
        await store.close()


async def commands_run(admin: aioredis.Redis) -> int:
    """The Redis commands run since the last reset, the scripts' own calls included (EVALSHA itself not)."""
    stats = await admin.info("commandstats")
    return sum(int(stat["calls"]) for name, stat in stats.items() if name not in ("cmdstat_evalsha", "cmdstat_info",
                                                                                  "cmdstat_config|resetstat"))


async def test_the_scripts_cost_redis_a_few_commands_per_batch_not_per_item(
        redis_url: str, admin: aioredis.Redis) -> None:
    """Puts, claims and removals of many items write them with one command per structure, not a dozen per
    item: Redis's CPU per item is shared with the service's on a small machine."""
    store = RedisStore(redis_url)
    await store.open()
    try:
        await store.open_session("q", "g/c", "s", LEASE_S)
        await admin.config_resetstat()
        indexes = await asyncio.gather(*(put(store, "q", f"r{n}".encode()) for n in range(64)))
        assert sorted(indexes) == list(range(1, 65))
        items = await store.claim("q", "g/c", "s", window=64, min_index=0, auto_commit=False, lease_s=LEASE_S)
        assert [item.index for item in items] == list(range(1, 65))
        assert await store.remove("q", [*indexes, indexes[0]]) == 64  # an index named twice counts once
        assert await commands_run(admin) < 120  # a dozen calls per item before
        assert (await store.stats("q")).length == 0
        assert await admin.hlen("cqs:{q}:owner") == 0 and await admin.zcard("cqs:{q}:pend") == 0
        assert await admin.zcard("cqs:{q}:pc:g/c") == 0 and await admin.hlen("cqs:{q}:byrid") == 0
        assert await store.lookup("q", "r7") is not None
    finally:
        await store.close()


async def test_a_truncate_of_more_items_than_one_command_takes(redis_url: str, admin: aioredis.Redis) -> None:
    """Lua passes at most a few thousand arguments to one command: a long removal goes in chunks."""
    store = RedisStore(redis_url)
    await store.open()
    try:
        await asyncio.gather(*(put(store, "big", f"r{n}".encode()) for n in range(2500)))
        assert await store.truncate("big", 2401) == 2400
        assert (await store.stats("big")).length == 100
        assert await admin.zcard("cqs:{big}:ready") == 100 and await admin.hlen("cqs:{big}:rid") == 100
        found = await store.lookup("big", "r5")
        assert found is not None and found.committed
    finally:
        await store.close()
