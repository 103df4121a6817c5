"""The front's fast path (byte-level relay of plain API requests) and its hand-off to aiohttp."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from standard.datadir import init_data_dir
from standard.ports import free_port
from support.backend import TOKEN, FastFront, start_front
from support.metrics import parse, value
from support.wait import until


async def raw_exchange(port: int, data: bytes, responses: int = 1, timeout_s: float = 10.0) -> bytes:
    """Send ``data`` on one connection and read until ``responses`` complete responses arrived."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    got = b""
    try:
        async with asyncio.timeout(timeout_s):
            for _ in range(responses):
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                got += head + await reader.readexactly(length)
    finally:
        writer.close()
    return got


def get(path: str, token: str | None = TOKEN, extra: str = "") -> bytes:
    auth = f"Authorization: {token}\r\n" if token else ""
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}{extra}\r\n".encode()


@pytest.fixture
async def fast_front(tmp_path: Path) -> Any:
    fronts: list[FastFront] = []

    async def factory(backend_url: str, **settings: Any) -> FastFront:
        front = await start_front(backend_url, init_data_dir(tmp_path / f"front{len(fronts)}").root, **settings)
        assert isinstance(front, FastFront)
        fronts.append(front)
        return front

    yield factory
    for front in fronts:
        await front.close()


async def test_plain_api_requests_stay_on_the_fast_path(backend, fast_front) -> None:
    front = await fast_front(backend.url, token=TOKEN)
    async with aiohttp.ClientSession(headers={"Authorization": TOKEN}) as http:
        for _ in range(3):
            async with http.get(f"http://127.0.0.1:{front.port}/queue") as resp:
                assert resp.status == 200
        assert front.site is not None and len(front.site.connections) == 1  # one keep-alive connection
        assert [s.raw_path for s in backend.seen] == ["/queue"] * 3
        assert all("Authorization" not in s.headers for s in backend.seen)
        async with http.get(f"http://127.0.0.1:{front.port}/metrics") as resp:
            metrics = parse(await resp.text())
    assert value(metrics, "comfyserve_proxied_requests_total") == 3


async def test_pipelined_requests_are_answered_in_order(backend, fast_front) -> None:
    front = await fast_front(backend.url, token=TOKEN)
    data = get("/history/a") + get("/queue") + get("/history/b")
    reply = await raw_exchange(front.port, data, responses=3)
    assert reply.count(b"HTTP/1.1 200 OK") == 3
    assert reply.index(b"{}") < reply.index(b"queue_running")
    assert [s.raw_path for s in backend.seen] == ["/history/a", "/queue", "/history/b"]


async def test_everything_unusual_is_handed_to_aiohttp(backend, fast_front) -> None:
    front = await fast_front(backend.url, token=TOKEN)
    assert b" 401 " in (await raw_exchange(front.port, get("/queue", token=None))).split(b"\r\n")[0]
    assert b" 401 " in (await raw_exchange(front.port, get("/queue", token="wrong"))).split(b"\r\n")[0]
    assert backend.seen == []
    # a bare LF could hide a header from one parser and show it to another: the strict parser decides
    smuggle = f"GET /queue HTTP/1.1\r\nHost: x\r\nAuthorization: {TOKEN}\r\nX-A: 1\nContent-Length: 5\r\n\r\n"
    first_line = (await raw_exchange(front.port, smuggle.encode())).split(b"\r\n")[0]
    assert b" 400 " in first_line or b" 200 " in first_line
    if b" 200 " in first_line:
        assert backend.seen[-1].headers.get("Content-Length") in (None, "0")
    # local routes, encoded paths, HEAD and HTTP/1.0 take the slow path and still work
    assert b"200 OK" in await raw_exchange(front.port, get("/healthz"))
    reply = await raw_exchange(front.port, get("/api/userdata/workflows%2Fnone.json"))
    assert reply.startswith(b"HTTP/1.1 404") and backend.seen[-1].raw_path == "/api/userdata/workflows%2Fnone.json"
    assert front.site is not None and not front.site.connections  # every one of those went to aiohttp
    reply = await raw_exchange(front.port, f"GET /queue HTTP/1.0\r\nAuthorization: {TOKEN}\r\n\r\n".encode())
    assert b" 200 " in reply.split(b"\r\n")[0]


async def test_a_dead_backend_gets_a_json_502(fast_front) -> None:
    front = await fast_front(f"http://127.0.0.1:{free_port()}", token=TOKEN)
    reply = await raw_exchange(front.port, get("/queue") + get("/queue"), responses=2)
    assert reply.count(b"HTTP/1.1 502 Bad Gateway") == 2
    assert b'"type": "backend_unavailable"' in reply
    # Both went to aiohttp's path (nothing to connect to): each is counted once, there.
    text = (await raw_exchange(front.port, get("/metrics"))).split(b"\r\n\r\n", 1)[1].decode()
    metrics = parse(text)
    assert value(metrics, "comfyserve_proxied_requests_total") == 2
    assert value(metrics, "comfyserve_backend_errors_total") == 2


@dataclass
class OddBackend:
    url: str
    runner: web.AppRunner

    def idle(self) -> bool:
        """The backend holds no connection open (its keep-alive timeout closed the pooled ones)."""
        assert self.runner.server is not None
        return not self.runner.server.connections


@pytest.fixture
async def odd_backend() -> Any:
    """A real aiohttp server with the response shapes ComfyUI's routes never use but HTTP allows."""

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in (b"alpha-", b"beta-", b"gamma"):
            await response.write(part)
        await response.write_eof()
        return response

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(8 * 1024 * 1024)})
        await response.prepare(request)
        block = b"z" * (1024 * 1024)
        for _ in range(8):
            await response.write(block)
        return response

    async def no_content(request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read(), headers={"X-Seen-Forwarded": request.headers.get(
            "X-Forwarded-For", "")})

    app = web.Application()
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/big", big)
    app.router.add_get("/empty", no_content)
    app.router.add_post("/echo", echo)
    runner = web.AppRunner(app, keepalive_timeout=0.2)  # it drops idle connections quickly
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield OddBackend(f"http://127.0.0.1:{site.port}", runner)
    await runner.cleanup()


async def test_chunked_big_empty_and_bodies_relay_unchanged(odd_backend: OddBackend, fast_front) -> None:
    front = await fast_front(odd_backend.url)
    base = f"http://127.0.0.1:{front.port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/chunked") as resp:
            assert resp.status == 200 and await resp.read() == b"alpha-beta-gamma"
        async with http.get(f"{base}/empty") as resp:
            assert resp.status == 204 and await resp.read() == b""
        async with http.post(f"{base}/echo", data=b"x" * 70000) as resp:
            assert await resp.read() == b"x" * 70000
            assert resp.headers["X-Seen-Forwarded"] == "127.0.0.1"
        async with http.get(f"{base}/big") as resp:
            total = 0
            async for chunk in resp.content.iter_chunked(65536):
                total += len(chunk)
                await asyncio.sleep(0.001)  # a slow reader: the front must hold the backend back, not buffer it all
            assert total == 8 * 1024 * 1024
        async with http.get(f"{base}/chunked") as resp:  # the connection that was held back is reused
            assert await resp.read() == b"alpha-beta-gamma"
        await until(odd_backend.idle, what="the backend closing the front's idle pooled connections")
        for _ in range(2):
            async with http.get(f"{base}/chunked") as resp:
                assert await resp.read() == b"alpha-beta-gamma"


async def test_a_client_leaving_mid_download_does_not_hurt_the_front(odd_backend: OddBackend,
                                                                     fast_front) -> None:
    front = await fast_front(odd_backend.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
    writer.write(get("/big", token=None))
    await reader.readexactly(100000)
    writer.close()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{front.port}/chunked") as resp:
            assert await resp.read() == b"alpha-beta-gamma"


async def test_expect_100_continue_is_answered_by_the_front(backend, fast_front) -> None:
    front = await fast_front(backend.url, token=TOKEN)
    body = b'{"clear": true}'
    reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
    try:
        writer.write(f"POST /queue HTTP/1.1\r\nHost: x\r\nAuthorization: {TOKEN}\r\nExpect: 100-continue\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim.startswith(b"HTTP/1.1 100")
        writer.write(body)
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert final.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    assert "Expect" not in backend.seen[-1].headers


async def test_a_half_closed_client_gets_its_answer_and_the_connection_ends(backend, fast_front) -> None:
    front = await fast_front(backend.url, token=TOKEN)
    reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
    writer.write(get("/queue"))
    writer.write_eof()
    reply = await asyncio.wait_for(reader.read(), 10)  # read() returns only once the front closes
    writer.close()
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b'"queue_pending": []}')


@pytest.mark.parametrize("request_bytes", [get("/queue", extra="Bad@Name: 1\r\n"), get("/queue", extra="X-A: \x01\r\n"),
                                           get("/queue", extra="X-A: a\x7fb\r\n"), get("/queue\x01")],
                         ids=["name-not-a-token", "control-in-value", "del-in-value", "control-in-target"])
async def test_a_head_the_strict_parser_refuses_is_not_relayed(backend, fast_front, request_bytes: bytes) -> None:
    # A header name that is no token, or a control character in a value or the target: two parsers may read such
    # a head differently, so the front hands it to aiohttp's strict parser (as the queue service's put path does).
    front = await fast_front(backend.url, token=TOKEN)
    reply = await raw_exchange(front.port, request_bytes)
    assert reply.split(b" ", 2)[1] == b"400"  # aiohttp's parser refuses it (the backend never saw it)
    assert backend.seen == []
    assert front.site is not None and not front.site.connections  # handed off
