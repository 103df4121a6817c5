"""The queue service's put path at the byte level: plain ``POST /api/predict/{queue}`` read and answered here.

aiohttp's machinery around one request (request and payload objects, the middleware chain, routing, the response
object and its headers) costs the service more CPU than the put itself: about 40% of what an item cost it, put,
watched and committed, in ``bench/queue.py`` (about 155 -> 90 us of the service's CPU per item without it).
Producers mostly send plain puts, so ``FastPutSite`` reads the head of each request itself and, when it is plainly a
put the handler would take as it is, hands it to the store's put batch and writes the answer the handler would have
written, byte for byte.

Anything else — another method or route, a missing or wrong token, a Host not served or an address being slowed
(the auth middleware answers those), an ``Origin``, cookies, reserved (``_name_``) or ``%``-encoded query
parameters, a priority or an idempotency key, a chunked, unsized or large (over 64 KiB) body, HTTP/1.0, a
malformed head, a WebSocket upgrade — is handed, with the bytes read so far, to aiohttp's own protocol for that
connection, which serves it from then on exactly as the rest of the service does (as
``standard/backend/fastpath.py`` does for the front). The fast path never answers a request the slow path would
refuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, cast

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from standard.auth import AccessGuard, token_from_header, tokens_equal
from standard.http_util import json_error

from .ids import uuid4_str
from .params import MAX_KEY_CHARS
from .protocol import encode_body
from .settings import REQUEST_ID_HEADER, QueueSettings
from .store import FULL, QUEUE_NAME_RE, REQUEST_ID_TAG, HandoffStore, StoreUnavailable

log = logging.getLogger("comfyserve.queue")

ROUTE = "/api/predict/"
PUT_START = b"POST " + ROUTE.encode()
MAX_HEAD_BYTES = 8190  # aiohttp's own limit on a request line / header field
MAX_FAST_BODY_BYTES = 64 * 1024  # larger bodies go to aiohttp, which streams them instead of joining chunks
KEEPALIVE_TIMEOUT_S = 3630.0  # aiohttp's default for an idle keep-alive connection
# Headers that send the request to aiohttp: features the fast path leaves to the handler and the middleware.
HANDOFF_HEADERS = frozenset({b"transfer-encoding", b"expect", b"upgrade", b"cookie", b"origin", b"idempotency-key",
                             b"x-eas-queueservice-priority"})
# Query strings of only these characters mean what they say (nothing %-encoded, no '+' for a space).
_NOT_IN_HEAD = re.compile(r"[^\t\r\n\x20-\x7e]")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token: what a header name may be
_PLAIN_QUERY = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~=&")


@dataclass(frozen=True)
class FastPuts:
    """What the put path needs from the app (``create_app`` keeps one under ``FAST_PUTS_KEY``)."""

    guard: AccessGuard
    store: HandoffStore | None  # None: a store without ``submit_put``; every request goes to aiohttp
    settings: QueueSettings


FAST_PUTS_KEY = web.AppKey("queue_fast_puts", FastPuts)


@dataclass(frozen=True, slots=True)
class PlainPut:
    queue: str
    tags: dict[str, str]
    length: int
    close: bool


def plain_put(head: bytes, fast: FastPuts) -> PlainPut | None:
    """The put in this request head if the fast path may answer it, else None (hand off)."""
    if not head.startswith(PUT_START):
        return None
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return None
    if _NOT_IN_HEAD.search(text) or text.count("\n") != text.count("\r\n") or text.count("\r") != text.count("\r\n"):
        return None  # a control character, or a bare CR or LF: the strict parser decides what it means
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] != "HTTP/1.1":
        return None
    path, _, query = parts[1].partition("?")
    queue = path[len(ROUTE):]
    if not QUEUE_NAME_RE.match(queue):
        return None  # the handler's 400, or aiohttp's 404
    tags = _plain_tags(query)
    if tags is None:
        return None
    authorization: str | None = None
    length: int | None = None
    host: str | None = None
    close = False
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            return None  # obs-fold, whitespace before the colon, a name that is no token: the strict parser refuses it
        lower = name.lower().encode()
        value = value.strip()
        if lower in HANDOFF_HEADERS:
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
            tokens = {token.strip().lower() for token in value.split(",")}
            if tokens - {"close", "keep-alive", ""}:
                return None
            close = "close" in tokens
        elif lower == b"host":
            if host is not None:
                return None
            host = value
    if length is None or length > min(MAX_FAST_BODY_BYTES, fast.settings.max_payload_bytes):
        return None  # an unsized or large body, or the handler's 413
    guard = fast.guard
    if guard.token is not None:
        given = token_from_header(authorization)
        if given is None or not tokens_equal(given, guard.token):
            return None  # the middleware answers (401), and counts a wrong token against the address
    elif authorization is not None:
        return None  # what to make of a stray credential stays in one place
    if not guard.relay_allowed(host):
        return None  # the middleware answers (421 for a Host not served, 429 for an address being slowed)
    return PlainPut(queue, tags, length, close)


def _plain_tags(query: str) -> dict[str, str] | None:
    """The tags of a query string that says them plainly, else None: any reserved (``_name_``) parameter, any
    ``%``-encoding, an empty or repeated name or value, a requestId too long to echo in a header."""
    if not query:
        return {}
    if not _PLAIN_QUERY.issuperset(query.encode()):
        return None
    tags: dict[str, str] = {}
    for item in query.split("&"):
        key, sep, value = item.partition("=")
        if not sep or not key or not value or key.startswith("_") or key in tags:
            return None
        tags[key] = value
    request_id = tags.get(REQUEST_ID_TAG)
    if request_id is not None and len(request_id) > MAX_KEY_CHARS:
        return None  # the handler's 400
    return tags


class _Date:
    """The Date header's value, made once a second (as aiohttp does)."""

    def __init__(self) -> None:
        self._second = 0
        self._value = ""

    def __call__(self) -> str:
        now = int(time.time())
        if now != self._second:
            self._second, self._value = now, formatdate(now, usegmt=True)
        return self._value


def response_bytes(status: int, reason: str, headers: Iterable[tuple[str, str]], body: bytes, date: str,
                   close: bool) -> bytes:
    """An HTTP/1.1 response with aiohttp's headers in aiohttp's order (the handler's, then Content-Length, Date,
    Server, Connection)."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines += [f"Content-Length: {len(body)}", f"Date: {date}", f"Server: {SERVER_SOFTWARE}"]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class PutConnection(asyncio.Protocol):
    """A client connection: answers plain puts itself, one at a time, and hands anything else to aiohttp."""

    def __init__(self, site: FastPutSite) -> None:
        self.site = site
        self.fast = site.fast
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.busy: asyncio.Future[int] | None = None  # the put being answered
        self.closed = False
        self.eof = False
        self.closing = False  # the site stops: close once the put in flight is answered
        self.write_paused = False  # the client does not read its answers: read no more requests until it does
        self.idle_handle: asyncio.TimerHandle | None = None
        self.last_active = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
        self.site.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.site.connections.discard(self)
        if self.idle_handle is not None:
            self.idle_handle.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer = self.buffer + data if self.buffer else data
        if self.busy is None and not self.write_paused:
            self._next()
        elif len(self.buffer) > MAX_HEAD_BYTES + MAX_FAST_BODY_BYTES and self.transport is not None:
            self.transport.pause_reading()  # a pipelining client waits for the answer in flight

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and self.busy is None:
            self.transport.resume_reading()
            if self.buffer:
                self._next()

    def eof_received(self) -> bool | None:
        self.eof = True  # the client sends no more: close once the answer in flight is out
        if self.busy is None and self.transport is not None:
            self.transport.close()
        return True

    def _arm_idle(self) -> None:
        """One timer per connection, re-armed lazily from the time of the last request."""
        loop = asyncio.get_running_loop()
        self.last_active = loop.time()
        if self.idle_handle is None:
            self.idle_handle = loop.call_at(self.last_active + KEEPALIVE_TIMEOUT_S, self._idle)

    def _idle(self) -> None:
        self.idle_handle = None
        if self.busy is not None or self.transport is None or self.closed:
            return
        due = self.last_active + KEEPALIVE_TIMEOUT_S
        loop = asyncio.get_running_loop()
        if loop.time() < due:
            self.idle_handle = loop.call_at(due, self._idle)
            return
        self.transport.close()

    def _next(self) -> None:
        if self.closed or self.transport is None:
            return
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD_BYTES or not buffer.startswith(PUT_START[:len(buffer)]):
                self._handoff()  # too long, or not a put: aiohttp reads the rest
            return
        store = self.fast.store
        put = plain_put(buffer[:end], self.fast) if store is not None else None
        if put is None or store is None:
            self._handoff()
            return
        total = end + 4 + put.length
        if len(buffer) < total:
            return  # the body is still arriving
        data, self.buffer = buffer[end + 4:total], buffer[total:]
        tags = put.tags
        request_id = tags.get(REQUEST_ID_TAG) or uuid4_str()
        tags[REQUEST_ID_TAG] = request_id
        settings = self.fast.settings
        future = self.busy = store.submit_put(put.queue, encode_body(tags, data), request_id, 0, settings.max_length)
        future.add_done_callback(lambda done: self._answer(done, put, request_id))

    def _answer(self, done: asyncio.Future[int], put: PlainPut, request_id: str) -> None:
        """Write what the handler would have answered for this put."""
        self.busy = None
        self.site.answered += 1
        close = put.close or self.eof or self.closing
        index = None if done.cancelled() or done.exception() is not None else done.result()
        if index is not None and index != FULL:
            body = str(index).encode()
            headers = ((REQUEST_ID_HEADER, request_id), ("Content-Type", "text/plain; charset=utf-8"))
            answer = response_bytes(200, "OK", headers, body, self.site.date(), close)
        else:
            answer = self._refusal(done, put, request_id, close)
        if self.closed or self.transport is None:
            return  # the client left; the put was written all the same (exactly once)
        self.transport.write(answer)
        if close:
            self.transport.close()
            return
        self._arm_idle()
        if self.write_paused:
            return  # resume_writing goes on
        self.transport.resume_reading()
        if self.buffer:
            self._next()

    def _refusal(self, done: asyncio.Future[int], put: PlainPut, request_id: str, close: bool) -> bytes:
        """The handler's refusal for a put that failed: 429 for a full queue, 503 when the store did not answer."""
        error = None if done.cancelled() else done.exception()
        if error is None:
            refusal = json_error(429, "queue_full", f"queue {put.queue!r} is full ({self.fast.settings.max_length} "
                                                    "items)")
        elif isinstance(error, StoreUnavailable):
            refusal = json_error(503, "store_unavailable", f"{error}; the item may have been stored all the same: "
                                                           f"look for requestId {request_id} before putting it again",
                                 headers={REQUEST_ID_HEADER: request_id})
        else:
            log.error("a put on %s failed", put.queue, exc_info=error)
            refusal = json_error(500, "internal_error", "the put failed", repr(error))
        body = refusal.body if isinstance(refusal.body, bytes) else b""
        return response_bytes(refusal.status, refusal.reason, refusal.headers.items(), body, self.site.date(), close)

    def _handoff(self) -> None:
        """From here on this connection is aiohttp's, starting with the bytes read so far."""
        assert self.transport is not None
        self.site.connections.discard(self)
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        protocol = self.site.aiohttp_protocol()
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        data, self.buffer = self.buffer, b""
        self.transport.resume_reading()
        if data:
            protocol.data_received(data)
        if self.eof:
            protocol.eof_received()


class FastPutSite(web.TCPSite):
    """A TCP site whose connections start on the byte-level put path (see the module docstring)."""

    def __init__(self, runner: web.BaseRunner, host: str | None = None, port: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(runner, host, port, **kwargs)
        app = getattr(runner, "app", None)
        if app is None or FAST_PUTS_KEY not in app:
            raise RuntimeError("FastPutSite needs the runner of a queue_service.server.create_app() app")
        self.fast: FastPuts = app[FAST_PUTS_KEY]
        self.connections: set[PutConnection] = set()
        self.date = _Date()
        self.answered = 0  # puts answered here (the rest of the service's requests are aiohttp's)

    def aiohttp_protocol(self) -> asyncio.Protocol:
        server = self._runner.server
        assert server is not None
        return server()

    async def start(self) -> None:
        await web.BaseSite.start(self)
        self._server = await asyncio.get_running_loop().create_server(
            lambda: PutConnection(self), self._host, self._port, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port)
        if self._server.sockets:
            self._bound_port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, answer the puts in flight (up to the shutdown timeout), close the connections."""
        await super().stop()
        in_flight = [conn.busy for conn in self.connections if conn.busy is not None]
        for conn in list(self.connections):
            conn.closing = True
            if conn.busy is None and conn.transport is not None:
                conn.transport.close()
        if in_flight:
            await asyncio.wait(in_flight, timeout=self.fast.settings.shutdown_timeout_s)
        for conn in list(self.connections):
            if conn.transport is not None:
                with contextlib.suppress(Exception):
                    conn.transport.close()
