"""The fast path's side towards the backend: pooled keep-alive connections that relay responses.

``Upstream`` sends one request at a time and hands the response to its sink
(the client connection) as it arrives: the head rewritten without
hop-by-hop headers, the body unchanged (chunked bodies are followed only to
find their end). ``Pool`` keeps idle connections per backend address.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, cast
from urllib.parse import urlsplit

from ..errors import BackendError

MAX_HEAD_BYTES = 64 * 1024
DROP_RESPONSE = frozenset({b"connection", b"keep-alive", b"proxy-connection"})


class Sink(Protocol):
    """Where a response goes (``fastpath.Downstream``)."""

    def write(self, data: bytes) -> None: ...

    def response_done(self, conn: Upstream, client_keepalive: bool) -> None: ...

    def response_failed(self, conn: Upstream, exc: UpstreamFailed) -> None: ...


class UpstreamFailed(BackendError):
    def __init__(self, message: str, *, nothing_received: bool) -> None:
        super().__init__(message)
        self.nothing_received = nothing_received


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the backend; relays one response at a time to a sink."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = True
        self.sink: Sink | None = None  # set while a response is on its way
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
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
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

    def begin(self, sink: Sink, request: bytes) -> None:
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
