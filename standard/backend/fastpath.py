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
slow path would refuse. Reading the head, the token check, the hand-off and
the site are ``standard/fast_http.py``'s (shared with the queue service's put
path); what is left here is the relay's own: the upstream pools, the taps, and
the forwarding headers.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..errors import error_body
from ..fast_http import FastConnection, FastSite, credentials_pass, parse_head
from .metrics import BackendMetrics
from .upstream import MAX_HEAD_BYTES, Pool, Pools, Upstream, UpstreamFailed

log = logging.getLogger("comfyserve.backend")

MAX_FAST_BODY_BYTES = 1024 * 1024
MAX_TAPPED_BYTES = 1024 * 1024
IDLE_TIMEOUT_S = 75.0
FAST_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
# Our credentials and the hop-by-hop headers stay here; the forwarding headers are ours to write.
DROP_REQUEST = frozenset({"authorization", "connection", "keep-alive", "proxy-authorization", "proxy-connection",
                          "te", "trailer", "upgrade", "x-forwarded-for", "x-forwarded-proto"})


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
    method: str
    target: str
    out: bytes  # the head to send upstream
    body_length: int
    close: bool
    tap: Callable[[bytes, bytes], None] | None = None


def relay_head(raw: bytes, config: FastPathConfig, peer: str | None) -> Head | None:
    """The request head to send upstream if the fast path may relay it, else None (hand off)."""
    head = parse_head(raw, drop=DROP_REQUEST)
    if head is None or head.method not in FAST_METHODS:
        return None
    method, path, query = head.method, head.path, head.query
    if "%" in path or "\\" in path or path in config.local_paths or "/." in path:
        return None
    if config.local_prefixes and path.startswith(config.local_prefixes):
        return None
    if config.is_local(method, path):
        return None
    if query and any(item.split("=", 1)[0] == "token" for item in query.split("&")):
        return None
    if not credentials_pass(head, config.token, config.relay_allowed):
        return None  # the auth middleware and the guard answer (401, login redirect, 403, 421, 429)
    length = head.length or 0
    if length > MAX_FAST_BODY_BYTES or length > config.max_body_bytes:
        return None
    out = [f"{method} {head.target} HTTP/1.1", *head.lines]
    if peer:
        out.append(f"X-Forwarded-For: {peer}")
    out.append("X-Forwarded-Proto: http")
    out.append("\r\n")
    return Head(method, head.target, "\r\n".join(out).encode(), length, head.close, config.tap(method, path))


def error_response(status: int, reason: str, message: str, details: str) -> bytes:
    body = json.dumps({"error": error_body("backend_unavailable", message, details)}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class Downstream(FastConnection["FastProxySite"]):
    """A client connection: relays plain requests itself, hands anything else to aiohttp."""

    idle_timeout_s = IDLE_TIMEOUT_S
    max_head_bytes = MAX_HEAD_BYTES
    max_body_bytes = MAX_FAST_BODY_BYTES

    def __init__(self, site: FastProxySite) -> None:
        super().__init__(site)
        self.config = site.config
        self.busy = False
        self.upstream: Upstream | None = None
        self.paused_upstream = False
        self.peer: str | None = None
        # the exchange in flight: its pool, the bytes to send, the request head
        self.pool: Pool | None = None
        self.request = b""
        self.raw_request = b""  # as the client sent it, for a hand-off after a failed connect
        self.head: Head | None = None
        self.attempt = 0
        self.reused = False
        self.tapped: bytearray | None = None  # the response so far, for the exchange's tap

    def in_flight(self) -> bool:
        return self.busy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else None
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.reusable = False
            self.upstream.transport.close()  # mid-response: the rest has nowhere to go

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

    def _next(self) -> None:
        if self.closed or self.transport is None:
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > self.max_head_bytes:
                self._handoff()
            return
        base_url = self.config.base_url()
        pool = self.site.pools.get(base_url) if base_url else None
        head = relay_head(self.buffer[:end], self.config, self.peer) if pool is not None else None
        if head is None:
            self._handoff()
            return
        total = end + 4 + head.body_length
        if len(self.buffer) < total:
            return  # the body is still arriving
        body = bytes(self.buffer[end + 4:total])
        self.raw_request, self.buffer = self.buffer[:total], self.buffer[total:]
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
            self.buffer = self.raw_request + self.buffer
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
        if exc.nothing_received and head is not None and head.method in ("GET", "OPTIONS") and not self.closed:
            self.busy = False  # nothing came back and nothing changed: the slow path decides (and may wait)
            self.buffer = self.raw_request + self.buffer
            self._handoff()
            return
        method, target = (head.method, head.target[:200]) if head else ("?", "?")
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


class FastProxySite(FastSite[Downstream]):
    """A TCP site whose connections start on the fast path (see the module docstring)."""

    def __init__(self, runner: web.BaseRunner, host: str | None = None, port: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(runner, host, port, **kwargs)
        self.config: FastPathConfig = self.app_value(FAST_PATH, "a create_backend_app() app")
        self.pools = Pools()

    def connection(self) -> Downstream:
        return Downstream(self)

    async def stop(self) -> None:
        await super().stop()
        self.pools.close()


FAST_PATH = web.AppKey("backend_fast_path", FastPathConfig)
