"""Plain puts answered at the byte level (``queue_service.fastput``) with the handler's bytes, and everything
else handed to aiohttp on the same connection, refused or served as before."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from queue_service.server import STORE_KEY
from queue_service.store import HandoffStore, PutRequest
from support.queue import TOKEN, LiveQueue, requires_sdk


class Raw:
    """One keep-alive connection speaking bytes to the service."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, live: LiveQueue) -> Raw:
        return cls(*await asyncio.open_connection("127.0.0.1", live.port))

    async def exchange(self, data: bytes, responses: int = 1) -> list[bytes]:
        self.writer.write(data)
        got = []
        async with asyncio.timeout(10):
            for _ in range(responses):
                head = await self.reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
                got.append(head + await self.reader.readexactly(length))
        return got

    async def closed_by_server(self) -> bool:
        async with asyncio.timeout(10):
            return await self.reader.read() == b""

    def close(self) -> None:
        self.writer.close()


def post(path: str, body: bytes = b"abc", token: str | None = TOKEN, extra: str = "") -> bytes:
    auth = f"Authorization: {token}\r\n" if token else ""
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Length: {len(body)}\r\n{extra}\r\n"
            ).encode() + body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {TOKEN}\r\n\r\n".encode()


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def without_date(response: bytes) -> bytes:
    return re.sub(rb"Date: [^\r]*\r\n", b"", response)


async def test_a_plain_put_gets_the_handlers_bytes_and_anything_else_goes_to_aiohttp(live_queue: LiveQueue) -> None:
    assert live_queue.site is not None
    fast = await Raw.open(live_queue)
    try:
        [first] = await fast.exchange(post("/api/predict/q?requestId=r1&task=t"))
        assert len(live_queue.site.connections) == 1  # answered on the fast path, which keeps the connection
        # A Cookie sends the next put to aiohttp's handler (which ignores it): the same answer, but for the index.
        [second] = await fast.exchange(post("/api/predict/q?requestId=r1&task=t", extra="Cookie: a=b\r\n"))
        assert not live_queue.site.connections  # handed off for good
        assert without_date(first).replace(b"\r\n\r\n1", b"\r\n\r\n2") == without_date(second)
        assert first.startswith(b"HTTP/1.1 200 OK\r\nX-Eas-Queueservice-Request-Id: r1\r\n"
                                b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 1\r\n")
        [count] = await fast.exchange(get("/api/predict/q?_count_=true"))
        assert count.endswith(b"\r\n\r\n2")
    finally:
        fast.close()
    client = live_queue.client("q")
    items = await client.get(0, length=5)
    assert [(i.index, i.tags, i.data) for i in items] == [(1, {"requestId": "r1", "task": "t"}, b"abc"),
                                                          (2, {"requestId": "r1", "task": "t"}, b"abc")]


@pytest.mark.parametrize("store_kind", ["sqlite"])
async def test_what_the_fast_path_does_not_take_is_refused_or_served_as_before(
        make_live_queue: Callable[..., Awaitable[LiveQueue]], tmp_path: Path) -> None:
    live = await make_live_queue(max_payload_bytes=16)
    cases = [
        (post("/api/predict/q", token=None), 401),
        (post("/api/predict/q", token="wrong-token"), 401),
        (post("/api/predict/q", body=b"x" * 17), 413),
        (post("/api/predict/-bad"), 400),
        (post("/api/predict/a/b/c"), 404),
        (post("/api/predict/q?_eos_=true"), 400),
        (post("/api/predict/q?requestId=" + "r" * 300), 400),
        (post("/api/predict/q", extra="Origin: http://elsewhere.example\r\n"), 200),  # a token: no Origin rule
        (post("/api/predict/q?requestId=a%20b"), 200),
        (post("/api/predict/q?_priority_=1"), 200),
        (post("/api/predict/q", extra="Bad Name: 1\r\n"), 400),  # the strict parser refuses what we would not
        (post("/api/predict/q", extra="X-A: \x01\r\n"), 400),
    ]
    large = await make_live_queue(max_payload_bytes=100_000, sqlite_path=tmp_path / "large.sqlite3")
    conn = await Raw.open(large)
    try:  # a large body is aiohttp's to read (it streams it)
        [response] = await conn.exchange(post("/api/predict/q", body=b"y" * 70_000))
        assert status(response) == 200 and large.site is not None and not large.site.connections
    finally:
        conn.close()
    for request, expected in cases:
        conn = await Raw.open(live)
        try:
            [response] = await conn.exchange(request)
            assert status(response) == expected, (request, response)
            assert live.site is not None and not live.site.connections, request
        finally:
            conn.close()
    items = await live.client("q").get(0, length=5)
    assert len(items) == 3 and items[1].tags["requestId"] == "a b"  # %-encoded: decoded by aiohttp's parser


async def test_pipelined_puts_are_answered_in_order_and_connection_close_is_kept(live_queue: LiveQueue) -> None:
    conn = await Raw.open(live_queue)
    try:
        answers = await conn.exchange(b"".join(post(f"/api/predict/p?requestId=r{n}") for n in range(3)), 3)
        assert [a.rsplit(b"\r\n\r\n", 1)[1] for a in answers] == [b"1", b"2", b"3"]
        assert [re.search(rb"Request-Id: (\w+)", a).group(1) for a in answers] == [b"r0", b"r1", b"r2"]  # type: ignore[union-attr]
        [last] = await conn.exchange(post("/api/predict/p", extra="Connection: close\r\n"))
        assert b"\r\nConnection: close\r\n" in last and last.endswith(b"\r\n\r\n4")
        assert await conn.closed_by_server()
    finally:
        conn.close()


async def test_a_full_queue_refuses_a_plain_put_as_the_handler_does(
        make_live_queue: Callable[..., Awaitable[LiveQueue]]) -> None:
    live = await make_live_queue(max_length=1)
    conn = await Raw.open(live)
    try:
        [ok] = await conn.exchange(post("/api/predict/f"))
        [full] = await conn.exchange(post("/api/predict/f"))
        [slow] = await conn.exchange(post("/api/predict/f", extra="Cookie: a=b\r\n"))  # the handler's answer
    finally:
        conn.close()
    assert status(ok) == 200
    assert without_date(full) == without_date(slow)
    assert full.startswith(b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json; charset=utf-8\r\n")
    assert b'"type": "queue_full"' in full


@pytest.mark.parametrize("store_kind", ["redis"])
async def test_concurrent_plain_puts_share_script_calls(live_queue: LiveQueue, redis_url: str) -> None:
    admin = aioredis.Redis.from_url(redis_url)
    conns = [await Raw.open(live_queue) for _ in range(40)]
    try:
        # A lone put is answered at once (no batch to wait for).
        [alone] = await conns[0].exchange(post("/api/predict/b"))
        assert alone.endswith(b"\r\n\r\n1")
        await admin.config_resetstat()
        answers = await asyncio.gather(*(conn.exchange(post("/api/predict/b")) for conn in conns))
        stats = await admin.info("commandstats")
        assert live_queue.site is not None and len(live_queue.site.connections) == 40  # all on the fast path
    finally:
        for conn in conns:
            conn.close()
        await admin.aclose()
    assert sorted(int(a.rsplit(b"\r\n\r\n", 1)[1]) for [a] in answers) == list(range(2, 42))
    assert stats["cmdstat_evalsha"]["calls"] < 40  # puts that came in together went in fewer script calls


@pytest.mark.parametrize("store_kind", ["sqlite"])
async def test_a_put_in_flight_when_the_service_stops_is_answered(live_queue: LiveQueue) -> None:
    store, runner = live_queue.app[STORE_KEY], live_queue.runner
    assert isinstance(store, HandoffStore) and runner is not None
    entered, release = asyncio.Event(), asyncio.Event()
    flush = store._batcher._flush

    async def held(queue: str, requests: list[PutRequest]) -> list[int]:
        entered.set()
        await release.wait()
        return await flush(queue, requests)

    store._batcher._flush = held
    conn, idle = await Raw.open(live_queue), await Raw.open(live_queue)
    try:
        answer = asyncio.create_task(conn.exchange(post("/api/predict/s")))
        await entered.wait()
        stopping = asyncio.create_task(runner.cleanup())
        assert await idle.closed_by_server()  # an idle connection closes at once; the busy one waits for its put
        assert not answer.done()
        release.set()
        [response] = await answer
        assert response.startswith(b"HTTP/1.1 200 OK") and response.endswith(b"\r\n\r\n1")
        assert b"\r\nConnection: close\r\n" in response
        assert await conn.closed_by_server()
        await stopping
    finally:
        conn.close()
        idle.close()


@requires_sdk
async def test_the_official_sdks_puts_are_answered_on_the_fast_path(live_queue: LiveQueue) -> None:
    out = await live_queue.sdk("put", args={"items": ["a", "b", "c"], "tags": {"task_id": "t1"}})
    assert [index for index, _ in out["put"]] == [1, 2, 3]
    assert live_queue.site is not None and live_queue.site.answered == 3
    items = await live_queue.client().get(0, length=5)
    assert [(item.data, item.tags["task_id"], item.tags["requestId"]) for item in items] == [
        (data.encode(), "t1", request_id) for data, (_, request_id) in zip("abc", out["put"], strict=True)]
