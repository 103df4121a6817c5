"""Async client for the queue service (and the platform's): httpx for calls, websockets for watch.

    async with QueueClient("127.0.0.1:9000", "svc/sink", token=T) as queue:
        index, request_id = await queue.put(b"...", tags={"task_id": "t1"})
        async with queue.watch(window=5) as frames:
            async for frame in frames:
                ...
                await queue.commit([frame.index])

One client is one consumer (its ``uid``), like the SDK's ``QueueClient``. A
watch reconnects by itself when the connection drops; the service sends the
consumer's uncommitted items again, so commit what you have finished.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from standard.http_util import BadJSON, parse_json
from standard.retry import RECONNECT, RetryPolicy

from .protocol import decode_frame, decode_frame_list
from .settings import (
    GROUP_HEADER,
    IDEMPOTENCY_HEADER,
    PRIORITY_HEADER,
    REQUEST_ID_HEADER,
    USER_HEADER,
    WATCH_EXTENSIONS_HEADER,
)
from .store import QueueError, Seen

log = logging.getLogger("comfyserve.queue.client")
PROTOBUF = "application/vnd.google.protobuf"
CLOSE_SUPERSEDED = 4001


class QueueClientError(QueueError):
    """The service refused a call (``status`` is the HTTP status, 0 when unreachable)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message


class QueueFullError(QueueClientError):
    """A put was refused because the queue is at its max length (HTTP 429)."""


@dataclass(frozen=True, slots=True)
class DataFrame:
    index: int
    tags: dict[str, str] = field(default_factory=dict)
    data: bytes = b""
    message: str = ""

    @property
    def request_id(self) -> str | None:
        return self.tags.get("requestId")


@dataclass(frozen=True, slots=True)
class Control:
    """A text message the service sent on a watch (``queue_service.handback``: only to a watch that asked for
    ``_prefetch_``), and which of the watch's connections it came on (``Watcher.connection``)."""

    message: dict[str, Any]
    connection: int


MAX_CONTROL_CHARS = 4096


def _base_url(endpoint: str, queue: str) -> str:
    endpoint = endpoint.rstrip("/")
    if not endpoint.startswith(("http://", "https://")):
        endpoint = "http://" + endpoint
    return f"{endpoint}/api/predict/{queue}"


def _indexes(indexes: int | Iterable[int]) -> str:
    values = [indexes] if isinstance(indexes, int) else list(indexes)
    return ",".join(str(int(i)) for i in values)


class QueueClient:
    def __init__(self, endpoint: str, queue: str, *, token: str | None = None, uid: str | None = None,
                 gid: str = "eas", timeout_s: float = 30.0) -> None:
        self.url = _base_url(endpoint, queue)
        self.uid = uid or str(uuid.uuid4())
        self.gid = gid
        self.headers = {USER_HEADER: self.uid, GROUP_HEADER: gid}
        if token:
            self.headers["Authorization"] = token
        self._http = httpx.AsyncClient(headers=self.headers, timeout=timeout_s)

    async def __aenter__(self) -> QueueClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, params: dict[str, Any], *, content: bytes | None = None,
                       headers: dict[str, str] | None = None, timeout_s: float | None = None) -> httpx.Response:
        kwargs: dict[str, Any] = {}
        if timeout_s is not None:
            kwargs["timeout"] = timeout_s
        try:
            response = await self._http.request(method, self.url, params=params, content=content,
                                                headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            raise QueueClientError(0, f"{method} {self.url}: {exc!r}") from exc
        if response.status_code // 100 != 2:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:500]
            cls = QueueFullError if response.status_code == 429 else QueueClientError
            raise cls(response.status_code, message)
        return response

    async def put(self, data: bytes | str, tags: dict[str, str] | None = None, *,
                  priority: int = 0, idempotency_key: str | None = None) -> tuple[int, str]:
        """Append an item; returns (index, requestId). A ``requestId`` tag is kept, else one is made.

        With ``idempotency_key`` a key the queue saw recently returns that put's (index, requestId)
        and puts nothing.
        """
        body = data.encode() if isinstance(data, str) else data
        params = dict(tags or {})
        headers = {PRIORITY_HEADER: str(priority)} if priority > 0 else {}
        if idempotency_key is not None:
            headers[IDEMPOTENCY_HEADER] = idempotency_key
        response = await self._request("POST", params, content=body, headers=headers or None)
        return int(response.text), response.headers[REQUEST_ID_HEADER]

    async def get(self, index: int = 0, length: int = 1, *, timeout_s: float = 0.0, auto_delete: bool = False,
                  request_id: str | None = None, tags: dict[str, str] | None = None) -> list[DataFrame]:
        """Items from ``index`` on (waiting up to ``timeout_s`` for one), optionally deleting them."""
        params: dict[str, Any] = {
            "_index_": index, "_length_": length, "_timeout_": f"{int(timeout_s * 1000)}ms",
            "_raw_": "false", "_auto_delete_": str(auto_delete).lower(), **(tags or {}),
        }
        if request_id is not None:
            params["requestId"] = request_id
        response = await self._request("GET", params, headers={"Accept": PROTOBUF}, timeout_s=timeout_s + 10)
        return [DataFrame(i, t, d, m) for i, t, d, m in decode_frame_list(response.content)]

    async def attributes(self) -> dict[str, str]:
        return (await self._request("GET", {"_attrs_": "true"})).json()

    async def search(self, index: int) -> dict[str, Any] | None:
        """``{"IsPending": bool, "WaitCount": n}``, or None when the item is gone."""
        try:
            return (await self._request("GET", {"_search_": "true", "_index_": index})).json()
        except QueueClientError as exc:
            if exc.status == 404:
                return None
            raise

    async def lookup(self, request_id: str) -> Seen | None:
        """The item put with ``request_id``: on the queue, or committed recently; None when neither.

        A queue service without ``_lookup_`` (the platform's) answers it as a get by requestId: then only
        an item still on the queue is found.
        """
        try:
            response = await self._request("GET", {"_lookup_": "true", "requestId": request_id})
        except QueueClientError as exc:
            if exc.status == 404:
                return None
            raise
        if not response.headers.get("content-type", "").startswith("application/json"):
            frames = decode_frame_list(response.content)
            return Seen(frames[0][0], committed=False) if frames else None
        found = response.json()
        return Seen(int(found["index"]), committed=bool(found["committed"]))

    async def commit(self, indexes: int | Iterable[int]) -> None:
        await self._request("PUT", {"_indexes_": _indexes(indexes)})

    async def delete(self, indexes: int | Iterable[int]) -> None:
        await self._request("DELETE", {"_indexes_": _indexes(indexes)})

    async def truncate(self, index: int) -> None:
        """Drop every item whose index is below ``index``."""
        await self._request("DELETE", {"_index_": index, "_trunc_": "true"})

    def watch(self, index: int = 0, window: int = 1, *, index_only: bool = False, auto_commit: bool = False,
              tags: dict[str, str] | None = None, options: dict[str, str] | None = None,
              on_control: Callable[[Control], None] | None = None) -> Watcher:
        """``options``: reserved ``_name_`` parameters of extensions (``queue_service.affinity``); a
        service without them ignores them. ``on_control``: called with each text message the service sends
        (``Control``), as frames are read; answer with ``Watcher.send``."""
        params = {"_watch_": "true", "_index_": str(index), "_window_": str(window),
                  "_index_only_": str(index_only).lower(), "_auto_commit_": str(auto_commit).lower(),
                  **(tags or {}), **(options or {})}
        url = httpx.URL(self.url.replace("http", "ws", 1), params=params)
        return Watcher(str(url), {**self.headers, "Accept": PROTOBUF}, on_control=on_control)


class Watcher:
    """Async iterator of ``DataFrame``s; reconnects on drops until ``aclose()``. Text messages from the
    service go to ``on_control`` (read while iterating), never into the iteration."""

    def __init__(self, url: str, headers: dict[str, str], *, retry: RetryPolicy = RECONNECT,
                 on_control: Callable[[Control], None] | None = None) -> None:
        self.url = url
        self.headers = headers
        self.retry = retry.but(retry_on=(OSError, InvalidHandshake, TimeoutError))
        self.reconnects = 0
        self.connection = 0  # counts the connections opened: a message belongs to one session of the watch
        self.extensions: frozenset[str] = frozenset()  # what the service said it gives this watch
        self.on_control = on_control
        self._ws: ClientConnection | None = None
        self._closed = False

    async def __aenter__(self) -> Watcher:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    def __aiter__(self) -> Watcher:
        return self

    async def _connect(self) -> ClientConnection:
        """Open the watch, retried (``RECONNECT``) until it opens or the queue refuses it for good."""
        async def once() -> ClientConnection:
            try:
                return await connect(self.url, additional_headers=self.headers, max_size=None,
                                     open_timeout=10, ping_interval=2.0, compression=None)
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in (400, 401, 403, 404):  # retrying cannot help
                    raise QueueClientError(status, exc.response.body.decode(errors="replace")[:500]) from exc
                raise

        return await self.retry.call(once, what=f"watch {self.url}", log=log)

    async def open(self) -> None:
        """Connect now rather than at the first read (then ``extensions`` is known)."""
        if self._ws is None and not self._closed:
            self._ws = await self._connect()
            self.connection += 1
            assert self._ws.response is not None
            told = self._ws.response.headers.get(WATCH_EXTENSIONS_HEADER, "")
            self.extensions = frozenset(part.strip() for part in told.split(",") if part.strip())

    async def __anext__(self) -> DataFrame:
        """The next frame. Cancelling a wait is safe: the watch stays usable."""
        while not self._closed:
            if self._ws is None:
                await self.open()
                if self._ws is None:  # closed meanwhile
                    break
            try:
                message = await self._ws.recv()
            except ConnectionClosed as exc:
                self._ws = None
                if self._closed:
                    break
                if exc.rcvd is not None and exc.rcvd.code == CLOSE_SUPERSEDED:
                    raise QueueClientError(409, "another watch of this consumer took over") from exc
                self.reconnects += 1
                log.info("watch %s: connection lost (%s); reconnecting", self.url, exc)
                continue
            if isinstance(message, str):
                self._control(message)
                continue
            index, tags, data, text = decode_frame(message)
            return DataFrame(index, tags, data, text)
        raise StopAsyncIteration

    def _control(self, text: str) -> None:
        message = None
        if len(text) <= MAX_CONTROL_CHARS:
            try:
                message = parse_json(text)
            except BadJSON:
                pass
        if self.on_control is None or not isinstance(message, dict):
            log.debug("watch %s: ignoring a text frame (%d characters)", self.url, len(text))
            return
        self.on_control(Control(message, self.connection))

    async def send(self, message: dict[str, Any], *, connection: int) -> bool:
        """Send a text message to the service on connection ``connection`` of the watch; False (not sent)
        when that connection is gone: what it said no longer applies to the watch's new session."""
        ws = self._ws
        if ws is None or self._closed or connection != self.connection:
            return False
        try:
            await ws.send(json.dumps(message, separators=(",", ":")))
        except ConnectionClosed:
            return False
        return True

    async def aclose(self) -> None:
        """Close properly: the service gives this consumer's uncommitted items to others at once."""
        self._closed = True
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
