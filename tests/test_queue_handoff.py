"""Puts claim for this process's watchers in their own store round trip (``Handoff``), on both stores.

An item put while a watcher waits is pending on that watcher as soon as the put returns, and the
watcher's next claim gets it without another store call; the claim is the store's ordinary one,
so a reconnected consumer, the window, tags and a watcher that left all behave as before.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from queue_service.protocol import encode_body
from queue_service.redis_store import RedisStore
from queue_service.sqlite_store import SQLiteStore
from queue_service.store import Position, QueueStore, Superseded

LEASE_S = 30.0


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueStore]:
    opened: QueueStore
    if request.param == "redis":
        opened = RedisStore(request.getfixturevalue("redis_url"))
    else:
        opened = SQLiteStore(tmp_path / "queue.sqlite3")
    await opened.open()
    yield opened
    await opened.close()


async def put(store: QueueStore, queue: str, data: str, tags: dict[str, str] | None = None) -> int:
    return await store.put(queue, encode_body({"requestId": data, **(tags or {})}, data.encode()), data, 0, 0)


async def claim(store: QueueStore, queue: str, session: str = "s", *, window: int = 8, auto_commit: bool = False,
                tags: dict[str, str] | None = None) -> list[int]:
    items = await store.claim(queue, "g/c", session, window=window, min_index=0, auto_commit=auto_commit,
                              lease_s=LEASE_S, tags=tags)
    return [item.index for item in items]


async def script_calls(admin: aioredis.Redis | None) -> int | None:
    """Scripts Redis ran so far (each store call on Redis is one); None on SQLite."""
    if admin is None:
        return None
    return int((await admin.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0))


@pytest.fixture
async def admin(store: QueueStore, request: pytest.FixtureRequest) -> AsyncIterator[aioredis.Redis | None]:
    if not isinstance(store, RedisStore):
        yield None
        return
    client = aioredis.Redis.from_url(request.getfixturevalue("redis_url"))
    yield client
    await client.aclose()


async def test_a_put_claims_for_a_waiting_watcher_in_its_own_round_trip(store: QueueStore,
                                                                        admin: aioredis.Redis | None) -> None:
    await store.open_session("q", "g/c", "s", LEASE_S)
    assert await claim(store, "q") == []  # the watcher waits
    index = await put(store, "q", "a")
    # Claimed for the watcher by the put itself: pending before the watcher asks.
    assert await store.position("q", index) == Position(pending=True, waiting=0)
    before = await script_calls(admin)
    assert await claim(store, "q") == [index]
    assert await claim(store, "q") == []  # drained, nothing changed since: it waits again
    assert await script_calls(admin) == before  # neither claim asked Redis
    more = await put(store, "q", "b")
    assert await store.position("q", more) == Position(pending=True, waiting=0)
    assert await claim(store, "q") == [more]
    # Busy (it has not come back since it got b): puts leave the item to its own next claim.
    busy = await put(store, "q", "c")
    assert await store.position("q", busy) == Position(pending=False, waiting=0)
    assert await claim(store, "q") == [busy]
    assert [item.index for item in await store.pending("q", "g/c", "s")] == [index, more, busy]

async def test_puts_back_to_back_keep_claiming_for_a_watcher_that_has_not_taken_its_items(
        store: QueueStore, admin: aioredis.Redis | None) -> None:
    await store.open_session("q", "g/c", "s", LEASE_S)
    assert await claim(store, "q") == []  # the watcher waits
    first = await put(store, "q", "a")
    # The next batch of puts comes before the watcher took the first one's item (busy producers): it claims
    # for the watcher too, so the watcher finds both without a claim of its own.
    second = await put(store, "q", "b")
    assert await store.position("q", second) == Position(pending=True, waiting=0)
    before = await script_calls(admin)
    assert await claim(store, "q") == [first, second]
    assert await claim(store, "q") == []
    assert await script_calls(admin) == before


async def test_the_hand_off_keeps_the_window_and_the_tags(store: QueueStore) -> None:
    m1 = {"model": "m1"}
    await store.open_session("q", "g/c", "s", LEASE_S)
    assert await claim(store, "q", window=2, tags=m1) == []
    other = await put(store, "q", "a", {"model": "m2"})  # not this watcher's: stays ready, the watcher waits on
    assert await store.position("q", other) == Position(pending=False, waiting=0)
    first = await put(store, "q", "b", m1)
    assert await claim(store, "q", window=2, tags=m1) == [first]
    assert await claim(store, "q", window=2, tags=m1) == []
    second = await put(store, "q", "c", m1)
    assert await claim(store, "q", window=2, tags=m1) == [second]
    assert await claim(store, "q", window=2, tags=m1) == []  # its window of 2 is full
    third = await put(store, "q", "d", m1)  # so the put leaves it ready
    assert await store.position("q", third) == Position(pending=False, waiting=1)
    await store.remove("q", [first, second])
    assert await claim(store, "q", window=2, tags=m1) == [third]

async def test_a_put_does_not_claim_for_a_superseded_session(store: QueueStore) -> None:
    await store.open_session("q", "g/c", "old", LEASE_S)
    assert await claim(store, "q", "old") == []  # the old connection waits
    await store.open_session("q", "g/c", "new", LEASE_S)  # the consumer reconnects
    index = await put(store, "q", "a")  # the put's claim for the old session is refused
    with pytest.raises(Superseded):
        await claim(store, "q", "old")
    await store.forget("q", "g/c", "old")
    assert await claim(store, "q", "new") == [index]  # nothing lost to the stale session

async def test_what_was_handed_to_a_watcher_that_left_goes_back(store: QueueStore) -> None:
    await store.open_session("q", "g/c", "s", LEASE_S)
    assert await claim(store, "q") == []
    index = await put(store, "q", "a")
    await store.release("q", "g/c", "s")  # it left cleanly before taking the item
    await store.open_session("q", "g/other", "t", LEASE_S)
    items = await store.claim("q", "g/other", "t", window=8, min_index=0, auto_commit=False, lease_s=LEASE_S)
    assert [item.index for item in items] == [index]


async def test_an_auto_commit_watcher_gets_handed_items_removed(store: QueueStore) -> None:
    await store.open_session("q", "g/c", "s", LEASE_S)
    assert await claim(store, "q", auto_commit=True) == []
    index = await put(store, "q", "a")
    assert await store.position("q", index) is None  # claimed and committed by the put's round trip
    assert await claim(store, "q", auto_commit=True) == [index]
    assert (await store.stats("q")).length == 0


async def test_puts_hand_items_to_waiting_watchers_in_turn(store: QueueStore) -> None:
    for session in ("a", "b"):
        await store.open_session("q", f"g/{session}", session, LEASE_S)
        assert await store.claim("q", f"g/{session}", session, window=8, min_index=0, auto_commit=False,
                                 lease_s=LEASE_S) == []
    first, second = await put(store, "q", "1"), await put(store, "q", "2")
    got = {}
    for session in ("a", "b"):
        items = await store.claim("q", f"g/{session}", session, window=8, min_index=0, auto_commit=False,
                                  lease_s=LEASE_S)
        got[session] = [item.index for item in items]
    assert got == {"a": [first], "b": [second]}  # one put at a time: each waiting watcher's turn comes
