"""The one way to read HTTP/1.1 request heads at the byte level, and to hand a connection to aiohttp.

Two paths serve their commonest requests without aiohttp's per-request machinery, because it costs more CPU than the
work itself: the front's relay (``standard/backend/fastpath.py``) and the queue service's put path
(``queue_service/fastput.py``). Both read each request head here and hand anything unusual, with the bytes read so
far, to aiohttp's own protocol on the same connection, which serves it from then on. So what "unusual" means is
decided here once, as strictly as either path needs:

- ``parse_head`` refuses (None: hand off) a head that is not plainly ``METHOD /target HTTP/1.1`` followed by
  ``token: value`` lines of printable ASCII (a tab is allowed in values): no other control character, no NUL, no
  bare CR or LF, no obs-fold, no whitespace before the colon, no header name that is not an RFC 9110 token. A head
  two parsers could read differently (request smuggling) is left to aiohttp's strict parser. It also refuses a
  repeated Authorization, Host or Content-Length, a Content-Length that is not plain digits, a Connection naming
  more than close/keep-alive (the slow path strips what it names), and the features in ``HANDOFF_HEADERS``.
- ``credentials_pass`` is the auth middleware's verdict for the requests the fast path may answer: the right token,
  or no token configured and neither a credential nor an Origin sent; then ``AccessGuard.relay_allowed(Host)``.
- ``FastConnection`` is the per-connection protocol's common part (buffer, lazy idle timer, EOF, hand-off) and
  ``FastSite`` the TCP site that starts every connection on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from aiohttp import web

from .auth import token_from_header, tokens_equal

# Features either path leaves to aiohttp (chunked bodies, 100-continue, upgrades, cookie logins).
HANDOFF_HEADERS = frozenset({"transfer-encoding", "expect", "upgrade", "cookie"})
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # RFC 9110 token: what a method and a header name may be
# The whole head in one pass: request line, then header lines; anything else goes to the strict parser.
_HEAD = re.compile(rf"({_TOKEN}) (/[\x21-\x7e]*) HTTP/1\.1((?:\r\n{_TOKEN}:[\t\x20-\x7e]*)*)")
_T = TypeVar("_T")


@dataclass(slots=True)
class RequestHead:
    """A plain request head, as ``parse_head`` read it."""

    method: str
    target: str  # as sent: path and query
    path: str
    query: str
    lines: list[str]  # the header lines whose names were not in ``drop`` (none when ``drop`` was None)
    authorization: str | None
    host: str | None
    length: int | None  # Content-Length, None when not sent
    close: bool  # Connection: close
    origin: bool  # an Origin header was sent


def parse_head(raw: bytes, handoff: frozenset[str] = HANDOFF_HEADERS,
               drop: frozenset[str] | None = None) -> RequestHead | None:
    """The head (``raw``: up to, not including, the blank line) if a fast path may take it, else None (hand off).

    ``handoff``: lower-case header names that send the request to aiohttp. ``drop``: lower-case names left out of
    ``RequestHead.lines``; None to collect no lines at all (cheaper, for a path that does not forward them)."""
    text = raw.decode("latin-1")  # every byte is a char: the pattern then refuses whatever is not ASCII
    match = _HEAD.fullmatch(text)
    if match is None:
        return None
    method, target, block = match.groups()
    if target.startswith("//"):
        return None  # a scheme-relative look-alike: what it means is aiohttp's to say
    path, _, query = target.partition("?")
    lines: list[str] = []
    authorization: str | None = None
    length: int | None = None
    host: str | None = None
    close = origin = False
    for line in block.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        lower = name.lower()
        if lower in handoff:
            return None
        if lower == "authorization":
            if authorization is not None:
                return None
            authorization = value.strip()
        elif lower == "content-length":
            value = value.strip()
            if length is not None or not value.isdigit():
                return None
            length = int(value)
        elif lower == "connection":
            tokens = {token.strip().lower() for token in value.split(",")}
            if tokens - {"close", "keep-alive", ""}:
                return None  # extra hop-by-hop headers named: the slow path strips them
            close = "close" in tokens
        elif lower == "host":
            if host is not None:
                return None
            host = value.strip()
        elif lower == "origin":
            origin = True
        if drop is not None and lower not in drop:
            lines.append(line)
    return RequestHead(method, target, path, query, lines, authorization, host, length, close, origin)


def credentials_pass(head: RequestHead, token: str | None, relay_allowed: Callable[[str | None], bool]) -> bool:
    """Whether the auth middleware would let this request through untouched; if not, it answers (hand off).

    ``relay_allowed`` is ``AccessGuard.relay_allowed``: False for a Host not served (421) or while wrong tokens
    are being slowed (429)."""
    if token is not None:
        if not tokens_equal(token_from_header(head.authorization), token):
            return False  # 401, a login redirect, and counting the wrong token against the address
    elif head.origin or head.authorization is not None:
        return False  # the Origin check, and what to make of a stray credential, stay in one place
    return relay_allowed(head.host)


SiteT = TypeVar("SiteT", bound="FastSite[Any]")
ConnT = TypeVar("ConnT", bound="FastConnection[Any]")


class FastConnection(asyncio.Protocol, Generic[SiteT]):
    """A client connection on a fast path until ``_handoff`` gives it to aiohttp; subclasses serve ``_next``."""

    idle_timeout_s = 3630.0  # aiohttp's default: an idle keep-alive connection is closed after this
    max_head_bytes = 8190  # aiohttp's limit on a line: a longer head (its end not seen yet) goes to aiohttp
    max_body_bytes = 64 * 1024  # the path's largest body: read no more while a head and this much wait

    def __init__(self, site: SiteT) -> None:
        self.site = site
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.closed = False
        self.eof = False
        self.idle_handle: asyncio.TimerHandle | None = None
        self.last_active = 0.0

    def in_flight(self) -> bool:
        """A request is being served: idling and EOF wait for it."""
        raise NotImplementedError

    def accepting(self) -> bool:
        """New bytes may start the next request now."""
        return not self.in_flight()

    def _next(self) -> None:
        """Serve the request at the head of the buffer if it is whole, or hand off."""
        raise NotImplementedError

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
        self.buffer = self.buffer + data if self.buffer else data  # most requests come whole: no copy
        if self.accepting():
            self._next()
        elif len(self.buffer) > self.max_head_bytes + self.max_body_bytes and self.transport is not None:
            self.transport.pause_reading()  # a pipelining client waits for the answer in flight

    def eof_received(self) -> bool | None:
        self.eof = True  # the client sends no more: close once the answer in flight is out
        if not self.in_flight() and self.transport is not None:
            self.transport.close()
        return True

    def _arm_idle(self) -> None:
        """One timer per connection, re-armed lazily from the time of the last request."""
        loop = asyncio.get_running_loop()
        self.last_active = loop.time()
        if self.idle_handle is None:
            self.idle_handle = loop.call_at(self.last_active + self.idle_timeout_s, self._idle)

    def _idle(self) -> None:
        self.idle_handle = None
        if self.in_flight() or self.transport is None or self.closed:
            return
        loop = asyncio.get_running_loop()
        due = self.last_active + self.idle_timeout_s
        if loop.time() < due:
            self.idle_handle = loop.call_at(due, self._idle)
            return
        self.transport.close()

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


class FastSite(web.TCPSite, Generic[ConnT]):
    """A TCP site whose connections start on a fast path (``connection()``) instead of aiohttp's protocol."""

    def __init__(self, runner: web.BaseRunner, host: str | None = None, port: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(runner, host, port, **kwargs)
        self.connections: set[ConnT] = set()  # those still on the fast path

    def app_value(self, key: web.AppKey[_T], needs: str) -> _T:
        """What the fast path needs from the runner's app, kept there under ``key`` by the app's factory."""
        app = getattr(self._runner, "app", None)
        if app is None or key not in app:
            raise RuntimeError(f"{type(self).__name__} needs the runner of {needs}")
        return cast(_T, app[key])

    def connection(self) -> ConnT:
        """The protocol of a new connection."""
        raise NotImplementedError

    def aiohttp_protocol(self) -> asyncio.Protocol:
        server = self._runner.server
        assert server is not None
        return server()

    async def start(self) -> None:
        await web.BaseSite.start(self)
        self._server = await asyncio.get_running_loop().create_server(
            self.connection, self._host, self._port, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port)
        if self._server.sockets:
            self._bound_port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, let ``drain`` finish what is in flight, close the connections still on the fast path."""
        await super().stop()
        await self.drain()
        for conn in list(self.connections):
            if conn.transport is not None:
                with contextlib.suppress(Exception):
                    conn.transport.close()

    async def drain(self) -> None:
        """Before the connections close: nothing to wait for unless a subclass says so."""
