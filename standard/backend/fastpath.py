"""The fast path of the front: plain API requests relayed at the byte level.

A full aiohttp request + aiohttp client request per proxied call costs more
CPU than the backend spends answering it, which halves throughput on a small
machine. Most traffic through a front is API clients sending
``Authorization: <token>`` with small bodies, so ``FastProxySite`` reads the
head of each request itself and, when the request is plainly ordinary, writes
it (minus our credentials and hop-by-hop headers) to a pooled keep-alive
connection to the backend and streams the response back unchanged.

Anything else — no or wrong token (the 401 and login logic stay in the auth
middleware), requests with cookies, a ``token`` query, WebSocket upgrades, local
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
from typing import Any, cast

from aiohttp import web

from ..auth import token_from_header, tokens_equal
from ..errors import error_body
from .metrics import BackendMetrics
from .upstream import MAX_HEAD_BYTES, Pool, Pools, Upstream, UpstreamFailed

log = logging.getLogger("comfyserve.backend")

MAX_FAST_BODY_BYTES = 1024 * 1024
MAX_TAPPED_BYTES = 1024 * 1024
IDLE_TIMEOUT_S = 75.0
FAST_METHODS = frozenset({b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"})
DROP_REQUEST = frozenset({b"authorization", b"connection", b"keep-alive", b"proxy-authorization",
                          b"proxy-connection", b"te", b"trailer", b"upgrade", b"x-forwarded-for",
                          b"x-forwarded-proto"})
HANDOFF_REQUEST = frozenset({b"transfer-encoding", b"expect", b"upgrade", b"cookie"})


@dataclass
class FastPathConfig:
    """What the fast path needs from the app; ``base_url()`` is asked per request."""

    token: str | None
    base_url: Callable[[], str | None]
    local_paths: frozenset[str]
    local_prefixes: tuple[str, ...]
    max_body_bytes: int
    metrics: BackendMetrics
    # AccessGuard.relay_allowed(Host): False while wrong tokens are being slowed, or for a Host not served.
    relay_allowed: Callable[[str | None], bool] = lambda host: True
    # (method, path) -> True for a request the app must see although its path is not local (the journal's).
    is_local: Callable[[str, str], bool] = lambda method, path: False
    # (method, path) -> a callback given (request, response) bytes of that exchange once relayed whole
    # (the journal records POST /prompt this way), or None: most requests are not watched.
    tap: Callable[[str, str], Callable[[bytes, bytes], None] | None] = lambda method, path: None


@dataclass
class Head:
    method: bytes
    target: bytes
    out: bytes  # the head to send upstream
    body_length: int
    close: bool
    tap: Callable[[bytes, bytes], None] | None = None


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
    if config.is_local(method, path):
        return None
    if query and any(item.split("=", 1)[0] == "token" for item in query.split("&")):
        return None
    out = [f"{method} {target} HTTP/1.1"]
    authorization: str | None = None
    length: int | None = None
    close = False
    has_origin = False
    host: str | None = None
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
        elif lower == b"host":
            if host is not None:
                return None
            host = value
        if lower not in DROP_REQUEST:
            out.append(line)
    if config.token is not None:
        given = token_from_header(authorization)
        if given is None or not tokens_equal(given, config.token):
            return None  # the auth middleware answers (401, login redirect, ...)
    elif has_origin or authorization is not None:
        return None  # the origin check (and what to do with a stray header) stays in one place
    if not config.relay_allowed(host):
        return None  # the guard answers (421 for a Host not served, 429 for a guesser)
    length = length or 0
    if length > MAX_FAST_BODY_BYTES or length > config.max_body_bytes:
        return None
    if peer:
        out.append(f"X-Forwarded-For: {peer}")
    out.append("X-Forwarded-Proto: http")
    out.append("\r\n")
    return Head(method.encode(), target.encode(), "\r\n".join(out).encode(), length, close, config.tap(method, path))


def error_response(status: int, reason: str, message: str, details: str) -> bytes:
    body = json.dumps({"error": error_body("backend_unavailable", message, details)}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class Downstream(asyncio.Protocol):
    """A client connection: relays plain requests itself, hands anything else to aiohttp."""

    def __init__(self, site: FastProxySite) -> None:
        self.site = site
        self.config = site.config
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy = False
        self.closed = False
        self.eof = False
        self.upstream: Upstream | None = None
        self.paused_upstream = False
        self.idle_handle: asyncio.TimerHandle | None = None
        self.last_active = 0.0
        self.peer: str | None = None
        # the exchange in flight: its pool, the bytes to send, the request head
        self.pool: Pool | None = None
        self.request = b""
        self.raw_request = b""  # as the client sent it, for a hand-off after a failed connect
        self.head: Head | None = None
        self.attempt = 0
        self.reused = False
        self.tapped: bytearray | None = None  # the response so far, for the exchange's tap

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
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
        if self.tapped is not None:
            self.tapped += data
            if len(self.tapped) > MAX_TAPPED_BYTES:
                log.warning("a watched response is larger than %d bytes: not recorded", MAX_TAPPED_BYTES)
                self.tapped = None
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._next()
        elif len(self.buffer) > MAX_HEAD_BYTES + MAX_FAST_BODY_BYTES and self.transport is not None:
            self.transport.pause_reading()  # a pipelining client waits for the response in flight

    def eof_received(self) -> bool | None:
        self.eof = True  # the client sends no more: close once the response in flight is out
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
        self.raw_request = bytes(self.buffer[:total])
        del self.buffer[:total]
        self.busy = True
        self.pool, self.request, self.head = pool, head.out + body, head
        self.tapped = bytearray() if head.tap is not None else None
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
        except OSError:
            # Nothing was sent anywhere: aiohttp's path takes the request as it came (it waits
            # for a restarting child, or answers the 502 itself).
            self.busy = False
            self.buffer[:0] = self.raw_request
            if not self.closed:
                self._handoff()
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
        if self.tapped is not None and self.head is not None and self.head.tap is not None:
            try:
                self.head.tap(self.request, bytes(self.tapped))
            except Exception:  # a watcher's bug must not break the relay
                log.exception("the tap of %s failed", self.head.target[:200])
            self.tapped = None
        if self.paused_upstream and conn.transport is not None:
            conn.transport.resume_reading()  # it goes back to the pool: it must read again
            self.paused_upstream = False
        if self.pool is not None:
            self.pool.release(conn)
        self._exchange_over(client_keepalive)

    def response_failed(self, conn: Upstream, exc: UpstreamFailed) -> None:
        self.upstream = None
        if self.tapped is not None:
            self.tapped = bytearray()  # a retry starts over
        if self.pool is not None:
            self.pool.release(conn)
        if exc.nothing_received and self.reused and self.attempt == 0 and not self.closed:
            self.attempt = 1  # a pooled connection the backend had closed: once more on a fresh one
            self._send()
            return
        head = self.head
        if exc.nothing_received and head is not None and head.method in (b"GET", b"OPTIONS") and not self.closed:
            self.busy = False  # nothing came back and nothing changed: the slow path decides (and may wait)
            self.buffer[:0] = self.raw_request
            self._handoff()
            return
        method, target = (head.method.decode(), head.target.decode()[:200]) if head else ("?", "?")
        log.warning("%s %s: %s", method, target, exc)
        if exc.nothing_received:
            self.config.metrics.errors.inc()
            self.write(error_response(502, "Bad Gateway", "The ComfyUI backend is not reachable", str(exc)))
            self._exchange_over(True)
        else:
            self._exchange_over(False)  # part of a response went out: the connection cannot go on

    def _exchange_over(self, keep_alive: bool) -> None:
        # Counted here, once per exchange: a request handed to aiohttp's path is counted there instead.
        self.config.metrics.requests.inc()
        self.paused_upstream = False
        self.busy = False
        if self.closed or self.transport is None:
            return
        if not keep_alive or self.head is None or self.head.close or self.eof:
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
