"""The hand-back (``queue_service.handback``): an idle prefetching watch gets a peer's queued-ahead item.

Raw WebSocket clients speak the protocol: the service asks the peer with ``{"give_back": INDEX}``, the peer
answers ``{"release": INDEX}``; anything else changes nothing. On both stores.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import WSMsgType

from queue_service.client import Control
from queue_service.handback import control_of
from queue_service.protocol import decode_frame, encode_body
from queue_service.server import STORE_KEY, WATCHERS_KEY
from queue_service.settings import GROUP_HEADER, USER_HEADER
from support.queue import TOKEN, LiveQueue
from support.wait import until

QUEUE = "svc"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers={"Authorization": TOKEN}) as session:
        yield session


async def put(http: aiohttp.ClientSession, live: LiveQueue, name: str) -> int:
    async with http.post(f"http://{live.endpoint}/api/predict/{QUEUE}", data=name.encode()) as response:
        assert response.status == 200, await response.text()
        return int(await response.text())


async def commit(http: aiohttp.ClientSession, live: LiveQueue, index: int) -> None:
    async with http.put(f"http://{live.endpoint}/api/predict/{QUEUE}", params={"_indexes_": str(index)}) as response:
        assert response.status == 200, await response.text()


async def pending(live: LiveQueue, index: int) -> bool:
    position = await live.app[STORE_KEY].position(QUEUE, index)
    assert position is not None
    return position.pending


def idle_watches(live: LiveQueue) -> int:
    """Prefetching watches holding nothing."""
    return sum(map(len, live.app[WATCHERS_KEY].passed.idle.values()))


def watch(http: aiohttp.ClientSession, live: LiveQueue, uid: str, *, window: int = 2, prefetch: bool = True,
          options: dict[str, str] | None = None) -> aiohttp.client._WSRequestContextManager:
    params = {"_watch_": "true", "_window_": str(window), **({"_prefetch_": "true"} if prefetch else {}),
              **(options or {})}
    return http.ws_connect(f"http://{live.endpoint}/api/predict/{QUEUE}", params=params,
                           headers={USER_HEADER: uid, GROUP_HEADER: "eas"})


async def next_item(ws: aiohttp.ClientWebSocketResponse) -> tuple[int, bytes]:
    message = await asyncio.wait_for(ws.receive(), 10)
    assert message.type == WSMsgType.BINARY, message
    index, _, data, _ = decode_frame(message.data)
    return index, data


async def next_text(ws: aiohttp.ClientWebSocketResponse) -> dict[str, object]:
    message = await asyncio.wait_for(ws.receive(), 10)
    assert message.type == WSMsgType.TEXT, message
    return json.loads(message.data)


async def test_an_idle_watch_gets_the_queued_ahead_item_its_peer_gives_back(live_queue: LiveQueue,
                                                                         http: aiohttp.ClientSession) -> None:
    one, two = await put(http, live_queue, "one"), await put(http, live_queue, "two")
    async with watch(http, live_queue, "a") as a:
        assert [await next_item(a), await next_item(a)] == [(one, b"one"), (two, b"two")]  # nobody idle: 2 ahead
        async with watch(http, live_queue, "b") as b:
            assert await next_text(a) == {"give_back": two}  # b opened holding nothing: the newest is asked for
            await a.send_str(json.dumps({"release": two}))
            assert await next_item(b) == (two, b"two")
            assert await pending(live_queue, two) and await pending(live_queue, one)
            # a did not take it back into its own slot: its next item is a new one, once it is idle.
            await commit(http, live_queue, one)
            await until(lambda: idle_watches(live_queue) == 1, what="a holding nothing")
            three = await put(http, live_queue, "three")
            assert await next_item(a) == (three, b"three")


async def test_a_release_of_an_item_not_asked_for_or_not_held_changes_nothing(
        live_queue: LiveQueue, http: aiohttp.ClientSession) -> None:
    one, two = await put(http, live_queue, "one"), await put(http, live_queue, "two")
    async with watch(http, live_queue, "a") as a:
        assert [index for index, _ in (await next_item(a), await next_item(a))] == [one, two]
        async with watch(http, live_queue, "c", window=1, prefetch=False) as c:
            other = await put(http, live_queue, "other")
            assert await next_item(c) == (other, b"other")
            # Releases a may not make (nothing asked; another consumer's item; no such item), then junk.
            for message in [{"release": two}, {"release": one}, {"release": other}, {"release": 10**6},
                            {"release": str(two)}, {"release": True}, {"release": float(two)}, {"release": -two},
                            {"release": two, "also": 1}, [two], {"release": [[[[two]]]]}]:
                await a.send_str(json.dumps(message))
            for junk in ["not json", "{" * 60_000, "[" * 100 + "]" * 100, '{"release": ' + "[" * 50 + "]" * 50 + "}",
                         "x" * 60_000, '{"release": 1e999}', '{"release": NaN}']:
                await a.send_str(junk)
            await a.send_bytes(json.dumps({"release": two}).encode())
            async with watch(http, live_queue, "b") as b:
                # The first thing a hears of since is the ask: nothing was released (it would be sent again).
                assert await next_text(a) == {"give_back": two}
                await a.send_str(json.dumps({"release": two}))
                assert await next_item(b) == (two, b"two")
                assert await pending(live_queue, one) and await pending(live_queue, other)
                await a.send_str(json.dumps({"release": two}))  # twice: b's now, nothing changes
                await c.send_str(json.dumps({"release": other}))  # not a prefetching watch: ignored
                await commit(http, live_queue, one)
                await until(lambda: idle_watches(live_queue) == 1, what="a holding nothing")
                three = await put(http, live_queue, "three")
                assert await next_item(a) == (three, b"three")
                assert await pending(live_queue, two) and await pending(live_queue, other)
                assert not a.closed and not c.closed


async def test_one_item_is_released_only_for_its_consumers_live_session(live_queue: LiveQueue) -> None:
    store = live_queue.app[STORE_KEY]
    await store.open_session(QUEUE, "eas/a", "old", 30.0)
    index = await store.put(QUEUE, encode_body({}, b"one"), "r1", 0, 0)
    [item] = await store.claim(QUEUE, "eas/a", "old", window=1, min_index=0, auto_commit=False, lease_s=30.0)
    assert item.index == index
    await store.open_session(QUEUE, "eas/a", "new", 30.0)  # a reconnected: "old" is superseded
    assert not await store.release_one(QUEUE, "eas/a", "old", index)
    assert not await store.release_one(QUEUE, "eas/b", "new", index)
    assert not await store.release_one(QUEUE, "eas/a", "new", index + 1)
    assert await pending(live_queue, index)
    changed = store.changes(QUEUE)
    assert await store.release_one(QUEUE, "eas/a", "new", index)
    assert changed.is_set()  # watchers wake for it at once
    assert not await pending(live_queue, index)
    assert not await store.release_one(QUEUE, "eas/a", "new", index)
    await store.open_session(QUEUE, "eas/b", "s", 30.0)
    [again] = await store.claim(QUEUE, "eas/b", "s", window=1, min_index=0, auto_commit=False, lease_s=30.0)
    assert again.index == index


async def test_a_watch_without_prefetch_is_never_asked(live_queue: LiveQueue, http: aiohttp.ClientSession) -> None:
    one, two = await put(http, live_queue, "one"), await put(http, live_queue, "two")
    async with watch(http, live_queue, "plain", prefetch=False) as plain:
        assert [index for index, _ in (await next_item(plain), await next_item(plain))] == [one, two]
        async with watch(http, live_queue, "b"):
            await until(lambda: idle_watches(live_queue) == 1, what="b holding nothing")
        await commit(http, live_queue, one)
        three = await put(http, live_queue, "three")
        assert await next_item(plain) == (three, b"three")  # no text frame came before it


async def test_the_python_client_hands_its_control_messages_aside_and_answers_on_the_same_connection(
        live_queue: LiveQueue) -> None:
    busy, idle = live_queue.client(QUEUE, uid="busy"), live_queue.client(QUEUE, uid="idle")
    one, _ = await busy.put(b"one")
    two, _ = await busy.put(b"two")
    controls: list[Control] = []
    async with busy.watch(window=2, options={"_prefetch_": "true"}, on_control=controls.append) as frames:
        assert [(await anext(frames)).index, (await anext(frames)).index] == [one, two]
        async with idle.watch(window=2, options={"_prefetch_": "true"}) as other:
            given = asyncio.ensure_future(anext(other))  # connects: the idle watch
            reading = asyncio.ensure_future(anext(frames))  # text messages are read along with the frames
            await until(lambda: controls, what="the ask")
            [control] = controls
            assert control.message == {"give_back": two} and control.connection == frames.connection == 1
            assert not await frames.send({"release": two}, connection=control.connection + 1)  # another session's
            assert await frames.send({"release": two}, connection=control.connection)
            assert (await given).index == two
            assert not reading.done()
            reading.cancel()


async def test_only_a_prefetching_watch_is_told_its_extensions(live_queue: LiveQueue) -> None:
    client = live_queue.client(QUEUE, uid="w")
    async with client.watch(window=2, options={"_prefetch_": "true"}) as frames:
        await frames.open()
        assert frames.extensions == {"prefetch", "handback"}
    async with live_queue.client(QUEUE, uid="plain").watch(window=2) as frames:
        await frames.open()
        assert frames.extensions == frozenset()


async def test_a_slot_behind_an_item_said_to_be_finishing_takes_an_item_of_other_models(
        live_queue: LiveQueue, http: aiohttp.ClientSession) -> None:
    client = live_queue.client(QUEUE, uid="p")
    y1, _ = await client.put(b"y1", {"models": "y"})
    x1, _ = await client.put(b"x1", {"models": "x"})
    options = {"_affinity_": "models", "_affinity_wait_": "60s"}
    async with watch(http, live_queue, "a", options=options) as a:
        assert await next_item(a) == (y1, b"y1")
        holder = next(iter(live_queue.app[WATCHERS_KEY].passed.holders[(QUEUE, frozenset())]))
        await until(lambda: holder.held == [y1], what="a holding y1")
        assert not await pending(live_queue, x1)  # the slot waits for y
        for wrong in (x1, 10**6):  # not what a holds: nothing changes
            await a.send_str(json.dumps({"finishing": wrong}))
        await a.send_str(json.dumps({"finishing": y1}))
        assert await next_item(a) == (x1, b"x1")


@pytest.mark.parametrize("text", [
    "", "null", "[]", "{}", '{"release": 1, "finishing": 1}', '{"give_back": 1}', '{"release": "1"}',
    '{"release": true}', '{"release": 1.0}', '{"release": 0}', '{"release": -1}', '{"release": 9223372036854775808}',
    '{"finishing": null}', '{"release": 1e999}', '{"release": NaN}', '{"release": ' + "[" * 40 + "]" * 40 + "}",
    "[" * 64 + "]" * 64, '{"release": 1' + " " * 200 + "}", "\ud800", "{" * 100_000])
def test_malformed_controls_are_not_read(text: str) -> None:
    assert control_of(text) is None


def test_well_formed_controls_are_read() -> None:
    assert control_of('{"release": 7}') == ("release", 7)
    assert control_of('{"finishing":9223372036854775807}') == ("finishing", 2**63 - 1)


async def test_a_watch_at_its_last_step_with_an_empty_slot_gets_back_an_item_of_its_models_queued_on_a_peer(
        live_queue: LiveQueue, http: aiohttp.ClientSession) -> None:
    client = live_queue.client(QUEUE, uid="p")
    options = {"_affinity_": "models", "_affinity_wait_": "60s", "_affinity_prefer_": "b"}
    w0, _ = await client.put(b"w0", {"models": "b"})
    w1, _ = await client.put(b"w1", {"models": "b"})
    async with watch(http, live_queue, "w", options=options) as w:
        assert [await next_item(w), await next_item(w)] == [(w0, b"w0"), (w1, b"w1")]
        async with watch(http, live_queue, "p", options=options) as p:
            assert await next_text(w) == {"give_back": w1}  # p opened idle; w keeps w1 (it does not answer)
            a, _ = await client.put(b"a", {"models": "b"})
            assert await next_item(p) == (a, b"a")
            b1, _ = await client.put(b"b1", {"models": "b"})
            assert await next_item(p) == (b1, b"b1")  # queued ahead on p: w's slots are full
            await commit(http, live_queue, w0)  # w runs w1 now, its slot ahead is empty
            await w.send_str(json.dumps({"finishing": w1}))
            # At once, not once w1 has ended: p is asked for the item with w's models it holds ahead.
            assert await next_text(p) == {"give_back": b1}
            await p.send_str(json.dumps({"release": b1}))
            assert await next_item(w) == (b1, b"b1")  # w's, not p's again
            assert await pending(live_queue, b1) and await pending(live_queue, a)
