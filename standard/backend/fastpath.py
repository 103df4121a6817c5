"""The fast path of the front: plain API requests relayed at the byte level.

A full aiohttp request + aiohttp client request per proxied call costs more
CPU than the backend spends answering it, which halves throughput on a small
machine. Most traffic through a front is API clients sending
``Authorization: <token>`` with small bodies, so ``FastProxySite`` reads the
head of each request itself and, when the request is plainly ordinary, writes
it (minus our credentials and hop-by-hop headers) to a pooled keep-alive
connection to the backend and streams the response back unchanged.

Anything else — no or wrong token (the 401 and login logic stay in the auth
middleware), cookies of ours, a ``token`` query, WebSocket upgrades, local
routes, ``%``-encoded paths, chunked or large request bodies, HTTP/1.0,
malformed heads, an https backend — is handed, with the bytes read so far,
to aiohttp's own protocol for that connection, which then serves it exactly
as the rest of this package does. The fast path never answers a request the
slow path would refuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from ..auth import SESSION_COOKIE, token_from_header, tokens_equal

log = logging.getLogger("comfyserve.backend")

MAX_HEAD_BYTES = 64 * 1024
MAX_FAST_BODY_BYTES = 1024 * 1024
IDLE_TIMEOUT_S = 75.0
FAST_METHODS = frozenset({b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"})
DROP_REQUEST = frozenset({b"authorization", b"connection", b"keep-alive", b"proxy-authorization",
                          b"proxy-connection", b"te", b"trailer", b"upgrade", b"x-forwarded-for",
                          b"x-forwarded-proto"})
HANDOFF_REQUEST = frozenset({b"transfer-encoding", b"expect", b"upgrade", b"cookie"})
DROP_RESPONSE = frozenset({b"connection", b"keep-alive", b"proxy-connection"})


@dataclass
class FastPathConfig:
    """What the fast path needs from the app; ``base_url()`` is asked per request."""

    token: str | None
    base_url: Callable[[], str | None]
    local_paths: frozenset[str]
    local_prefixes: tuple[str, ...]
    max_body_bytes: int
    stats: dict[str, int]


@dataclass
class Head:
    method: bytes
    target: bytes
    out: bytes  # the head to send upstream
    body_length: int
    close: bool


def parse_head(raw: bytes, config: FastPathConfig, peer: str | None) -> Head | None:
    """The request head if the fast path may relay it, else None (hand off)."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    if "\x00" in text or text.count("\n") != text.count("\r\n") or text.count("\r") != text.count("\r\n"):
        return None  # bare CR/LF could split headers differently upstream (smuggling)
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] != "HTTP/1.1" or parts[0].encode() not in FAST_METHODS:
        return None
    method, target = parts[0], parts[1]
    if not target.startswith("/") or target.startswith("//"):
        return None
    path, _, query = target.partition("?")
    if "%" in path or "\\" in path or path in config.local_paths or "/." in path:
        return None
    if config.local_prefixes and path.startswith(config.local_prefixes):
        return None
    if query and any(item.split("=", 1)[0] == "token" for item in query.split("&")):
        return None
    out = [f"{method} {target} HTTP/1.1"]
    authorization: str | None = None
    length: int | None = None
    close = False
    has_origin = False
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or line[0] in " \t":
            return None  # obs-fold or whitespace before the colon: let the strict parser refuse it
        lower = name.lower().encode()
        value = value.strip()
        if lower in HANDOFF_REQUEST:
            return None
        if lower == b"authorization":
            if authorization is not None:
                return None
            authorization = value
        elif lower == b"content-length":
            if length is not None or not value.isdigit():
                return None
            length = int(value)
        elif lower == b"connection":
            tokens = {t.strip().lower() for t in value.split(",")}
            close = "close" in tokens
            if tokens - {"close", "keep-alive", ""}:
                return None  # extra hop-by-hop headers named: the slow path strips them
        elif lower == b"origin":
            has_origin = True
        if lower not in DROP_REQUEST:
            out.append(line)
    if config.token is not None:
        given = token_from_header(authorization)
        if given is None or not tokens_equal(given, config.token):
            return None  # the auth middleware answers (401, login redirect, ...)
    elif has_origin or authorization is not None:
        return None  # the origin check (and what to do with a stray header) stays in one place
    length = length or 0
    if length > MAX_FAST_BODY_BYTES or length > config.max_body_bytes:
        return None
    if peer:
        out.append(f"X-Forwarded-For: {peer}")
    out.append("X-Forwarded-Proto: http")
    out.append("\r\n")
    return Head(method.encode(), target.encode(), "\r\n".join(out).encode(), length, close)


def error_response(status: int, reason: str, message: str, details: str) -> bytes:
    body = json.dumps({"error": {"type": "backend_unavailable", "message": message, "details": details,
                                 "extra_info": {}}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class UpstreamFailed(Exception):
    def __init__(self, message: str, *, nothing_received: bool) -> None:
        super().__init__(message)
        self.nothing_received = nothing_received


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the backend; relays one response at a time to a sink."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = True
        self.sink: Downstream | None = None  # set while a response is on its way
        self.used = 0
        self.pending_head = b""
        self._reset()

    def _reset(self) -> None:
        self.head = bytearray()
        self.in_head = True
        self.received = 0
        self.remaining = -1  # body bytes left; -1 chunked, -2 until EOF
        self.chunk_line = bytearray()
        self.chunk_left = 0
        self.in_trailer = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        if self.sink is not None:
            if self.remaining == -2 and not self.in_head:
                self._finish(client_keepalive=False)  # the body ended with the connection
            else:
                sink, self.sink = self.sink, None
                sink.response_failed(self, UpstreamFailed(f"backend closed the connection ({exc!r})",
                                                          nothing_received=self.received == 0))

    def pause_writing(self) -> None:  # requests are small; nothing to pause
        pass

    def begin(self, sink: Downstream, request: bytes) -> None:
        """Send one request; the sink hears ``response_done`` or ``response_failed``."""
        assert self.transport is not None
        self._reset()
        self.sink = sink
        self.used += 1
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        if self.sink is None:
            self.reusable = False  # bytes nobody asked for: this connection is out of step
            if self.transport is not None:
                self.transport.close()
            return
        self.received += len(data)
        if not self.in_head:
            self._body(data)
            return
        self.head += data
        while True:
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > MAX_HEAD_BYTES:
                    self._fail("response head too large")
                return
            raw, rest = bytes(self.head[:end]), bytes(self.head[end + 4:])
            self.head = bytearray(rest)
            started = self._start_response(raw)
            if started is None:
                return  # failed
            if started:
                break
            # an interim (1xx) response: the final head follows
        self.head = bytearray()
        if rest:
            self._body(rest)  # goes out in one write with the head
        else:
            self._flush_head()
            if self.remaining == 0:
                self._finish()

    def _start_response(self, raw: bytes) -> bool | None:
        """Relay the response head; False for an interim 1xx head, None on failure."""
        lines = raw.split(b"\r\n")
        status_parts = lines[0].split(b" ", 2)
        try:
            status = int(status_parts[1])
        except (IndexError, ValueError):
            self._fail("malformed response status line")
            return None
        assert self.sink is not None
        if 100 <= status < 200:
            self.sink.write(raw + b"\r\n\r\n")
            return False
        out = [lines[0]]
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            lower = name.strip().lower()
            if lower in DROP_RESPONSE:
                if lower == b"connection" and b"close" in value.lower():
                    self.reusable = False
                continue
            if lower == b"content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    self._fail("malformed Content-Length")
                    return None
            elif lower == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            out.append(line)
        self.in_head = False
        if status in (204, 304):
            self.remaining = 0
        elif chunked:
            self.remaining = -1  # relayed as is, with its header
        elif length is not None:
            self.remaining = length
        else:
            self.remaining = -2
            self.reusable = False
            out.append(b"Connection: close")
        self.pending_head = b"\r\n".join(out) + b"\r\n\r\n"
        return True

    def _flush_head(self, body: bytes = b"") -> None:
        if self.pending_head:
            body, self.pending_head = self.pending_head + body, b""
        if body and self.sink is not None:
            self.sink.write(body)

    def _body(self, data: bytes) -> None:
        assert self.sink is not None
        if self.remaining >= 0:
            if len(data) > self.remaining:
                self.reusable = False
                data = data[: self.remaining]
            self._flush_head(data)
            self.remaining -= len(data)
            if self.remaining == 0:
                self._finish()
        elif self.remaining == -1:
            self._flush_head(data)
            if self._chunked_done(data):
                self._finish()
        else:
            self._flush_head(data)

    def _chunked_done(self, data: bytes) -> bool:
        """Follow the chunk framing (sizes, data, trailers) to see where the body ends."""
        pos, size = 0, len(data)
        while pos < size:
            if self.chunk_left:
                step = min(self.chunk_left, size - pos)
                pos += step
                self.chunk_left -= step
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self.chunk_line += data[pos:]
                return False
            line = bytes(self.chunk_line) + data[pos:newline]
            self.chunk_line = bytearray()
            pos = newline + 1
            if self.in_trailer:
                if not line.strip():
                    if pos < size:
                        self.reusable = False
                    return True
                continue
            try:
                chunk = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self._fail("malformed chunk size")
                return False
            if chunk == 0:
                self.in_trailer = True
            else:
                self.chunk_left = chunk + 2  # the data and its CRLF
        return False

    def _finish(self, client_keepalive: bool = True) -> None:
        self._flush_head()
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.response_done(self, client_keepalive)

    def _fail(self, message: str) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.response_failed(self, UpstreamFailed(message, nothing_received=False))


class Pool:
    """Idle keep-alive connections to one backend address."""

    def __init__(self, host: str, port: int, max_idle: int = 64) -> None:
        self.host, self.port, self.max_idle = host, port, max_idle
        self.idle: list[Upstream] = []
        self.retired = False  # the backend moved (a restarted child): connections in flight close

    def take_idle(self) -> Upstream | None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def connect(self) -> Upstream:
        _, conn = await asyncio.get_running_loop().create_connection(Upstream, self.host, self.port)
        return conn

    def release(self, conn: Upstream) -> None:
        if conn.reusable and not conn.closed and not self.retired and len(self.idle) < self.max_idle:
            self.idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()

    def close(self) -> None:
        self.retired = True
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()


class Pools:
    """One pool per backend address (a restarted child listens on a new port)."""

    def __init__(self) -> None:
        self.by_url: dict[str, Pool] = {}

    def get(self, base_url: str) -> Pool | None:
        pool = self.by_url.get(base_url)
        if pool is None:
            parts = urlsplit(base_url)
            if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
                return None
            for old in self.by_url.values():
                old.close()
            self.by_url = {base_url: Pool(parts.hostname, parts.port or 80)}
            pool = self.by_url[base_url]
        return pool

    def close(self) -> None:
        for pool in self.by_url.values():
            pool.close()
        self.by_url.clear()


class Downstream(asyncio.Protocol):
    """A client connection: relays plain requests itself, hands anything else to aiohttp."""

    def __init__(self, site: FastProxySite) -> None:
        self.site = site
        self.config = site.config
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy = False
        self.closed = False
        self.upstream: Upstream | None = None
        self.paused_upstream = False
        self.idle_handle: asyncio.TimerHandle | None = None
        self.last_active = 0.0
        self.peer: str | None = None
        # the exchange in flight: its pool, the bytes to send, the request head
        self.pool: Pool | None = None
        self.request = b""
        self.head: Head | None = None
        self.attempt = 0
        self.reused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else None
        self.site.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.site.connections.discard(self)
        if self.idle_handle is not None:
            self.idle_handle.cancel()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.reusable = False
            self.upstream.transport.close()  # mid-response: the rest has nowhere to go

    def _arm_idle(self) -> None:
        """One timer per connection, re-armed lazily from the time of the last request."""
        loop = asyncio.get_running_loop()
        self.last_active = loop.time()
        if self.idle_handle is None:
            self.idle_handle = loop.call_at(self.last_active + IDLE_TIMEOUT_S, self._idle)

    def _idle(self) -> None:
        self.idle_handle = None
        if self.busy or self.transport is None or self.closed:
            return
        loop = asyncio.get_running_loop()
        due = self.last_active + IDLE_TIMEOUT_S
        if loop.time() < due:
            self.idle_handle = loop.call_at(due, self._idle)
            return
        self.transport.close()

    def pause_writing(self) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.pause_reading()
            self.paused_upstream = True

    def resume_writing(self) -> None:
        upstream = self.upstream
        if self.paused_upstream and upstream is not None and upstream.transport is not None:
            upstream.transport.resume_reading()
        self.paused_upstream = False

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._next()
        elif len(self.buffer) > MAX_HEAD_BYTES + MAX_FAST_BODY_BYTES and self.transport is not None:
            self.transport.pause_reading()  # a pipelining client waits for the response in flight

    def eof_received(self) -> bool | None:
        if not self.busy and self.transport is not None:
            self.transport.close()
        return True

    def _next(self) -> None:
        if self.closed or self.transport is None:
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD_BYTES:
                self._handoff()
            return
        base_url = self.config.base_url()
        pool = self.site.pools.get(base_url) if base_url else None
        head = parse_head(bytes(self.buffer[:end]), self.config, self.peer) if pool is not None else None
        if head is None:
            self._handoff()
            return
        total = end + 4 + head.body_length
        if len(self.buffer) < total:
            return  # the body is still arriving
        body = bytes(self.buffer[end + 4:total])
        del self.buffer[:total]
        self.busy = True
        self.config.stats["proxied_requests_total"] += 1
        self.pool, self.request, self.head = pool, head.out + body, head
        self.attempt = 0
        self._send()

    def _send(self) -> None:
        pool = self.pool
        assert pool is not None
        conn = pool.take_idle()
        if conn is None:
            asyncio.get_running_loop().create_task(self._connect_and_send(pool))
            return
        self.upstream = conn
        self.reused = True
        conn.begin(self, self.request)

    async def _connect_and_send(self, pool: Pool) -> None:
        try:
            conn = await pool.connect()
        except OSError as exc:
            self.config.stats["backend_errors_total"] += 1
            self.write(error_response(502, "Bad Gateway", "The ComfyUI backend is not reachable", repr(exc)))
            self._exchange_over(True)
            return
        if self.closed:
            pool.release(conn)
            self._exchange_over(False)
            return
        self.upstream = conn
        self.reused = False
        conn.begin(self, self.request)

    def response_done(self, conn: Upstream, client_keepalive: bool) -> None:
        self.upstream = None
        if self.paused_upstream and conn.transport is not None:
            conn.transport.resume_reading()  # it goes back to the pool: it must read again
            self.paused_upstream = False
        if self.pool is not None:
            self.pool.release(conn)
        self._exchange_over(client_keepalive)

    def response_failed(self, conn: Upstream, exc: UpstreamFailed) -> None:
        self.upstream = None
        if self.pool is not None:
            self.pool.release(conn)
        if exc.nothing_received and self.reused and self.attempt == 0 and not self.closed:
            self.attempt = 1  # a pooled connection the backend had closed: once more on a fresh one
            self._send()
            return
        head = self.head
        log.warning("%s %s: %s", head.method.decode() if head else "?", head.target.decode()[:200] if head else "?", exc)
        if exc.nothing_received:
            self.config.stats["backend_errors_total"] += 1
            self.write(error_response(502, "Bad Gateway", "The ComfyUI backend is not reachable", str(exc)))
            self._exchange_over(True)
        else:
            self._exchange_over(False)  # part of a response went out: the connection cannot go on

    def _exchange_over(self, keep_alive: bool) -> None:
        self.paused_upstream = False
        self.busy = False
        if self.closed or self.transport is None:
            return
        if not keep_alive or self.head is None or self.head.close:
            self.transport.close()
            return
        self.transport.resume_reading()
        self._arm_idle()
        if self.buffer:
            self._next()

    def _handoff(self) -> None:
        """From here on this connection is aiohttp's, starting with the bytes read so far."""
        assert self.transport is not None
        self.site.connections.discard(self)
        if self.idle_handle is not None:
            self.idle_handle.cancel()
        protocol = self.site.aiohttp_protocol()
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        data, self.buffer = bytes(self.buffer), bytearray()
        self.transport.resume_reading()
        if data:
            protocol.data_received(data)


class FastProxySite(web.TCPSite):
    """A TCP site whose connections start on the fast path (see the module docstring)."""

    def __init__(self, runner: web.BaseRunner, host: str | None = None, port: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(runner, host, port, **kwargs)
        app = getattr(runner, "app", None)
        if app is None or FAST_PATH not in app:
            raise RuntimeError("FastProxySite needs the runner of a create_backend_app() app")
        self.config: FastPathConfig = app[FAST_PATH]
        self.pools = Pools()
        self.connections: set[Downstream] = set()

    def aiohttp_protocol(self) -> asyncio.Protocol:
        server = self._runner.server
        assert server is not None
        return server()

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Downstream(self), self._host, self._port, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port,
        )
        if self._server.sockets:
            self._bound_port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        await super().stop()
        for conn in list(self.connections):
            if conn.transport is not None:
                with contextlib.suppress(Exception):
                    conn.transport.close()
        self.pools.close()


FAST_PATH = web.AppKey("backend_fast_path", FastPathConfig)
