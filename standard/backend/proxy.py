"""Forwarding HTTP requests and WebSockets to the backend ComfyUI, byte for byte.

The path goes through undecoded (``request.raw_path``), so ``%2F`` inside a
userdata path stays one path segment, as ComfyUI expects. Bodies stream both
ways (small ones are read whole: fewer writes, lower latency). Hop-by-hop
headers are dropped; our own credentials (the Authorization header, the
session cookie, a ``token`` query parameter) never reach the backend. The
original ``Host`` is kept so ComfyUI's own origin check sees what the browser
sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from ..auth import SESSION_COOKIE
from ..errors import BackendError
from ..http_util import JSONError, event_socket, json_error
from ..server.file_headers import apply_file_headers
from ..tasks import cancel_and_wait

log = logging.getLogger("comfyserve.backend")

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade",
    "expect",  # answered here (aiohttp sends the 100 Continue); the backend gets the body at once
})
WS_HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                          "sec-websocket-accept", "sec-websocket-protocol"})
SMALL_BODY_BYTES = 256 * 1024
CHUNK_BYTES = 64 * 1024


def _dropped(headers: MultiMapping[str] | web.BaseRequest) -> set[str]:
    names = set(HOP_BY_HOP)
    source = headers.headers if isinstance(headers, web.BaseRequest) else headers
    for value in source.getall("Connection", []):
        names.update(part.strip().lower() for part in value.split(",") if part.strip())
    return names


def _without_session_cookie(value: str) -> str:
    parts = [p for p in value.split(";") if p.strip() and p.strip().split("=", 1)[0] != SESSION_COOKIE]
    return ";".join(parts).strip()


def upstream_headers(request: web.Request, *, strip_auth: bool, websocket: bool = False) -> CIMultiDict[str]:
    drop = _dropped(request)
    if websocket:
        drop |= WS_HANDSHAKE
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        lower = name.lower()
        if lower in drop or lower == "content-length" and websocket:
            continue
        if strip_auth and lower == "authorization":
            continue
        if lower == "cookie":
            value = _without_session_cookie(value) if strip_auth else value
            if not value:
                continue
        headers.add(name, value)
    headers.popall("X-Forwarded-For", None)  # what a client claims about itself is not passed on
    if request.remote:
        headers["X-Forwarded-For"] = request.remote
    headers["X-Forwarded-Proto"] = request.scheme
    return headers


def upstream_url(base_url: str, request: web.Request, *, strip_token: bool) -> URL:
    """``base_url`` + the request's raw path and query, still percent-encoded."""
    raw = request.raw_path
    if not raw.startswith("/"):
        raw = "/" + raw
    if strip_token and "?" in raw:
        path, _, query = raw.partition("?")
        kept = [part for part in query.split("&") if part.split("=", 1)[0] != "token"]
        raw = path + ("?" + "&".join(kept) if kept else "")
    return URL(base_url + raw, encoded=True)


def downstream_headers(response: aiohttp.ClientResponse, *, keep_length: bool) -> CIMultiDict[str]:
    drop = _dropped(response.headers)
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in response.headers.items():
        lower = name.lower()
        if lower in drop or (lower == "content-length" and not keep_length):
            continue
        headers.add(name, value)
    return headers


FILE_ROUTES = frozenset({"/view", "/api/view"})


def relayed_headers(request: web.Request, response: aiohttp.ClientResponse, *,
                    keep_length: bool) -> CIMultiDict[str]:
    """``downstream_headers``; a file ComfyUI serves from ``/view`` gets our file header policy."""
    headers = downstream_headers(response, keep_length=keep_length)
    if request.path in FILE_ROUTES and 200 <= response.status < 300:
        apply_file_headers(headers, request.query.get("filename", ""))
    return headers


class BodyTooLarge(BackendError):
    pass


class BackendDown(BackendError):
    """The backend could not be reached, and nothing was sent back yet."""

    def __init__(self, detail: str, status: int) -> None:
        super().__init__(detail)
        self.status = status


async def _limited(content: aiohttp.StreamReader, limit_bytes: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in content.iter_chunked(CHUNK_BYTES):
        seen += len(chunk)
        if seen > limit_bytes:
            raise BodyTooLarge()
        yield chunk


def backend_unavailable(detail: str, status: int = 502) -> JSONError:
    """The error to raise when the backend cannot answer (a 503 says when to retry)."""
    return json_error(status, "backend_unavailable", "The ComfyUI backend is not reachable", detail,
                      headers={"Retry-After": "1"} if status == 503 else None)


async def forward_http(request: web.Request, session: aiohttp.ClientSession, base_url: str, *,
                       strip_auth: bool, max_body_bytes: int, body: bytes | None = None) -> web.StreamResponse:
    """One request to the backend and its response back, streamed; ``BackendDown`` if unreachable.
    ``body``: the request's body, already read here."""
    length = request.content_length
    if length is not None and length > max_body_bytes:
        raise json_error(413, "request_too_large", "Request body too large",
                         f"{length} bytes > {max_body_bytes}")
    data: bytes | AsyncIterator[bytes] | None = body
    if body is None and request.body_exists:
        if length is not None and length <= SMALL_BODY_BYTES:
            data = await request.read()
        else:
            data = _limited(request.content, max_body_bytes)
    url = upstream_url(base_url, request, strip_token=strip_auth)
    headers = upstream_headers(request, strip_auth=strip_auth)
    response: web.StreamResponse | None = None
    try:
        async with session.request(request.method, url, headers=headers, data=data,
                                   allow_redirects=False) as upstream:
            body_length = upstream.content_length
            if request.method == "HEAD" or (body_length is not None and body_length <= SMALL_BODY_BYTES):
                body = await upstream.read()
                out_headers = relayed_headers(request, upstream, keep_length=request.method == "HEAD")
                if request.method == "HEAD":
                    head = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=out_headers)
                    await head.prepare(request)
                    return head
                return web.Response(status=upstream.status, reason=upstream.reason, body=body,
                                    headers=out_headers)
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                          headers=relayed_headers(request, upstream, keep_length=True))
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except BodyTooLarge:
        raise json_error(413, "request_too_large", "Request body too large",
                         f"more than {max_body_bytes} bytes") from None
    except (TimeoutError, aiohttp.ClientConnectionError, OSError) as exc:
        if response is not None and response.prepared:
            raise  # headers already sent: all we can do is drop the connection
        log.warning("%s %s: backend %s: %r", request.method, request.path, base_url, exc)
        raise BackendDown(repr(exc), 504 if isinstance(exc, asyncio.TimeoutError) else 502) from exc


async def forward_websocket(request: web.Request, session: aiohttp.ClientSession, base_url: str, *,
                            strip_auth: bool, max_msg_bytes: int,
                            sockets: set[web.WebSocketResponse] | None = None,
                            rewrite: Callable[[str], Awaitable[str]] | None = None) -> web.StreamResponse:
    """Open the backend socket first (a dead backend gets a 502, not a socket), then relay both ways
    (``rewrite`` changes the backend's text messages, in order, before the client gets them)."""
    url = upstream_url(base_url, request, strip_token=strip_auth)
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    try:
        upstream = await session.ws_connect(
            url, headers=upstream_headers(request, strip_auth=strip_auth, websocket=True),
            protocols=protocols, autoping=True, max_msg_size=0, compress=0,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
        )
    except aiohttp.WSServerHandshakeError as exc:
        raise json_error(exc.status if 400 <= exc.status < 600 else 502, "backend_refused",
                         "The ComfyUI backend refused the WebSocket", exc.message) from None
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise backend_unavailable(repr(exc)) from exc
    downstream = event_socket(protocols=[upstream.protocol] if upstream.protocol else (),
                              max_msg_size=max_msg_bytes, autoping=True)
    if sockets is not None:
        sockets.add(downstream)  # closed on shutdown, so a graceful stop does not wait for clients
    try:
        await downstream.prepare(request)
        relays = [
            asyncio.create_task(_relay(upstream, downstream, rewrite), name="ws-backend-to-client"),
            asyncio.create_task(_relay(downstream, upstream), name="ws-client-to-backend"),
        ]
        await asyncio.wait(relays, return_when=asyncio.FIRST_COMPLETED)
        with contextlib.suppress(Exception):
            await cancel_and_wait(*relays)
    finally:
        if sockets is not None:
            sockets.discard(downstream)
        code = upstream.close_code if upstream.closed and upstream.close_code else 1001
        if not downstream.closed and downstream.prepared:
            await downstream.close(code=code, message=b"backend closed")
        await upstream.close()
    return downstream


async def _relay(source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                 target: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                 rewrite: Callable[[str], Awaitable[str]] | None = None) -> None:
    async for msg in source:
        if target.closed:
            return
        if msg.type == WSMsgType.TEXT:
            await target.send_str(msg.data if rewrite is None else await rewrite(msg.data))
        elif msg.type == WSMsgType.BINARY:
            await target.send_bytes(msg.data)
        elif msg.type == WSMsgType.ERROR:
            return
