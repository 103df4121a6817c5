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
connection, which serves it from then on exactly as the rest of the service does. Reading the head, the token
check, the hand-off and the site are ``standard/fast_http.py``'s, shared with the front's relay; what is left here is
the put's own: its route, queue and tags, and the handler's answer bytes. The fast path never answers a request the
slow path would refuse.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from standard.auth import AccessGuard
from standard.fast_http import HANDOFF_HEADERS, FastConnection, FastSite, credentials_pass, parse_head
from standard.http_util import json_error

from .ids import uuid4_str
from .params import MAX_KEY_CHARS
from .protocol import encode_body
from .settings import REQUEST_ID_HEADER, QueueSettings
from .store import FULL, QUEUE_NAME_RE, REQUEST_ID_TAG, HandoffStore, StoreUnavailable

log = logging.getLogger("comfyserve.queue")

ROUTE = "/api/predict/"
PUT_START = b"POST " + ROUTE.encode()
MAX_FAST_BODY_BYTES = 64 * 1024  # larger bodies go to aiohttp, which streams them instead of joining chunks
# Headers that send the request to aiohttp: features the fast path leaves to the handler and the middleware.
PUT_HANDOFF_HEADERS = HANDOFF_HEADERS | {"origin", "idempotency-key", "x-eas-queueservice-priority"}
# Query strings of only these characters mean what they say (nothing %-encoded, no '+' for a space).
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
    request = parse_head(head, PUT_HANDOFF_HEADERS)
    if request is None:
        return None
    queue = request.path[len(ROUTE):]
    if not QUEUE_NAME_RE.match(queue):
        return None  # the handler's 400, or aiohttp's 404
    tags = _plain_tags(request.query)
    if tags is None:
        return None
    length = request.length
    if length is None or length > min(MAX_FAST_BODY_BYTES, fast.settings.max_payload_bytes):
        return None  # an unsized or large body, or the handler's 413
    if not credentials_pass(request, fast.guard.token, fast.guard.relay_allowed):
        return None  # the middleware answers (401, 421, 429), and counts a wrong token against the address
    return PlainPut(queue, tags, length, request.close)


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


class PutConnection(FastConnection["FastPutSite"]):
    """A client connection: answers plain puts itself, one at a time, and hands anything else to aiohttp."""

    max_body_bytes = MAX_FAST_BODY_BYTES  # the head's limit and the idle timeout: aiohttp's (FastConnection's)

    def __init__(self, site: FastPutSite) -> None:
        super().__init__(site)
        self.fast = site.fast
        self.busy: asyncio.Future[int] | None = None  # the put being answered
        self.closing = False  # the site stops: close once the put in flight is answered
        self.write_paused = False  # the client does not read its answers: read no more requests until it does

    def in_flight(self) -> bool:
        return self.busy is not None

    def accepting(self) -> bool:
        return self.busy is None and not self.write_paused

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

    def _next(self) -> None:
        if self.closed or self.transport is None:
            return
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > self.max_head_bytes or not buffer.startswith(PUT_START[:len(buffer)]):
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


class FastPutSite(FastSite[PutConnection]):
    """A TCP site whose connections start on the byte-level put path (see the module docstring)."""

    def __init__(self, runner: web.BaseRunner, host: str | None = None, port: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(runner, host, port, **kwargs)
        self.fast: FastPuts = self.app_value(FAST_PUTS_KEY, "a queue_service.server.create_app() app")
        self.date = _Date()
        self.answered = 0  # puts answered here (the rest of the service's requests are aiohttp's)

    def connection(self) -> PutConnection:
        return PutConnection(self)

    async def drain(self) -> None:
        """Answer the puts in flight (up to the shutdown timeout); close the idle connections at once."""
        in_flight = [conn.busy for conn in self.connections if conn.busy is not None]
        for conn in list(self.connections):
            conn.closing = True
            if conn.busy is None and conn.transport is not None:
                conn.transport.close()
        if in_flight:
            await asyncio.wait(in_flight, timeout=self.fast.settings.shutdown_timeout_s)
