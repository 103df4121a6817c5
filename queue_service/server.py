"""The queue service's HTTP front: ``/api/predict/{queue}`` as the platform's SDK calls it.

One route, dispatched on method and reserved query parameters, as the platform's queue service does:
``POST`` put; ``GET`` get / ``_attrs_`` / ``_search_`` / ``_count_`` / ``_watch_`` (WebSocket) / ``_lookup_``
(ours: where the item with a requestId is, or whether it was committed recently);
``PUT ?_indexes_`` commit; ``DELETE ?_indexes_`` delete / ``?_trunc_&_index_`` truncate.
Refusals are small JSON bodies: the SDK retries every non-2xx six times at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from standard.auth import AccessGuard
from standard.http_util import json_error, read_body_within

from . import params
from .fastput import FAST_PUTS_KEY, FastPuts
from .ids import uuid4_str
from .params import BadParam
from .protocol import encode_body, encode_frame_list
from .settings import (
    GROUP_HEADER,
    MAX_GET_LENGTH,
    MAX_GET_TIMEOUT_S,
    PRIORITY_HEADER,
    REPLAYED_HEADER,
    REQUEST_ID_HEADER,
    USER_HEADER,
    QueueSettings,
)
from .store import (
    QUEUE_NAME_RE,
    REQUEST_ID_TAG,
    HandoffStore,
    Item,
    QueueFull,
    QueueStore,
    StoreUnavailable,
    wait_event,
)
from .watch import WatchRegistry, watch

log = logging.getLogger("comfyserve.queue")

SETTINGS_KEY = web.AppKey("queue_settings", QueueSettings)
STORE_KEY = web.AppKey("queue_store", QueueStore)
WATCHERS_KEY = web.AppKey("queue_watchers", WatchRegistry)
PROTOBUF = "application/vnd.google.protobuf"
_GET_SCAN_BATCH = 256
_GET_SCAN_LIMIT = 20_000


def _queue_name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not QUEUE_NAME_RE.match(name):
        raise BadParam(f"bad queue name {name!r}: letters, digits, '.', '_', '-' and at most one '/'")
    return name


async def _require_queue(store: QueueStore, queue: str) -> None:
    if not await store.exists(queue):
        raise json_error(404, "not_found", f"queue {queue!r} does not exist (nothing was ever put on it)")


# -- put -----------------------------------------------------------------------


async def put(request: web.Request, queue: str) -> web.StreamResponse:
    settings, store = request.app[SETTINGS_KEY], request.app[STORE_KEY]
    query = request.query
    priority = params.integer(query, "_priority_", 0, low=0, high=2**31)
    header_priority = request.headers.get(PRIORITY_HEADER)
    if header_priority:
        priority = max(priority, params.integer({"p": header_priority}, "p", 0, low=0, high=2**31))
    data = await read_body_within(request, settings.max_payload_bytes)
    if data is None:
        raise json_error(413, "payload_too_large", f"the body exceeds {settings.max_payload_bytes} bytes")
    tags = params.tags_of(query)
    request_id = params.header_safe(REQUEST_ID_TAG, tags.get(REQUEST_ID_TAG) or uuid4_str())
    tags[REQUEST_ID_TAG] = request_id
    key = params.idempotency_key(request)
    replayed = False
    try:
        if key is None:
            index = await store.put(queue, encode_body(tags, data), request_id, 1 if priority > 0 else 0,
                                    settings.max_length)
        else:
            once = await store.put_once(queue, encode_body(tags, data), request_id, 1 if priority > 0 else 0,
                                        settings.max_length, key=key)
            index, request_id, replayed = once.index, once.request_id, once.duplicate
    except QueueFull as exc:
        raise json_error(429, "queue_full", str(exc)) from None
    except StoreUnavailable as exc:
        # The write may have reached the store before the failure: say how to find out.
        raise json_error(503, "store_unavailable", f"{exc}; the item may have been stored all the same: "
                                                   f"look for requestId {request_id} before putting it again",
                         headers={REQUEST_ID_HEADER: request_id}) from None
    headers = {REQUEST_ID_HEADER: request_id}
    if replayed:
        headers[REPLAYED_HEADER] = "true"
    return web.Response(text=str(index), headers=headers)


# -- get -------------------------------------------------------------------------


async def _matching(store: QueueStore, queue: str, start: int, length: int, tags: dict[str, str]) -> list[Item]:
    """Items from ``start`` whose tags include ``tags``; requestId lookups go straight to the store."""
    request_id = tags.get(REQUEST_ID_TAG)
    others = {k: v for k, v in tags.items() if k != REQUEST_ID_TAG}
    if not others:
        return await store.get(queue, start, length, request_id)
    found: list[Item] = []
    scanned = 0
    while len(found) < length and scanned < _GET_SCAN_LIMIT:
        batch = await store.get(queue, start, _GET_SCAN_BATCH, request_id)
        for item in batch:
            if item.has_tags(others):
                found.append(item)
                if len(found) == length:
                    break
        if len(batch) < _GET_SCAN_BATCH:
            break
        scanned += len(batch)
        start = batch[-1].index + 1
    return found


async def get(request: web.Request, queue: str) -> web.StreamResponse:
    store = request.app[STORE_KEY]
    query = request.query
    start = params.integer(query, "_index_", 0, low=0, high=2**63 - 1)
    length = params.integer(query, "_length_", 1, low=1, high=MAX_GET_LENGTH)
    timeout_s = params.duration_s(query, "_timeout_", 0.0, high_s=MAX_GET_TIMEOUT_S)
    auto_delete = params.flag(query, "_auto_delete_", False)
    raw = params.flag(query, "_raw_", False)
    tags = params.tags_of(query)
    # Answer a little before the client's own timeout (the SDK's HTTP timeout equals the default 5s).
    deadline = time.monotonic() + max(0.0, timeout_s - min(0.5, timeout_s * 0.1))
    armed = False
    while True:
        changed = store.changes(queue)
        items = await _matching(store, queue, start, length, tags)
        left = deadline - time.monotonic()
        if items or left <= 0:
            break
        if not armed:  # then look once more: a put may have come in between
            await store.arm(queue)
            armed = True
            continue
        armed = not await wait_event(changed, left)
    if items and auto_delete:
        await store.remove(queue, [item.index for item in items])
    if raw:
        body = items[0].decoded()[1] if items else b""
        return web.Response(body=body, content_type="application/octet-stream")
    return web.Response(body=encode_frame_list([item.frame() for item in items]), content_type=PROTOBUF)


# -- attributes, search ------------------------------------------------------------


async def attributes(request: web.Request, queue: str) -> web.StreamResponse:
    settings, store = request.app[SETTINGS_KEY], request.app[STORE_KEY]
    stats = await store.stats(queue)
    attrs = {
        "meta.name": queue,
        "meta.backend": store.backend,
        "meta.state": "Normal",
        "meta.maxPayloadBytes": str(settings.max_payload_bytes),
        "meta.header.user": USER_HEADER,
        "meta.header.group": GROUP_HEADER,
        "meta.header.priority": PRIORITY_HEADER,
        "stream.length": str(stats.length),
        "stream.approxMaxLength": str(settings.max_length),
        "stream.firstEntry": str(stats.first_index),
        "stream.lastEntry": str(stats.last_index),
        "consumers.status.total": str(stats.consumers),
    }
    return web.json_response(attrs)


async def search(request: web.Request, queue: str) -> web.StreamResponse:
    store = request.app[STORE_KEY]
    index = params.integer(request.query, "_index_", 0, low=1, high=2**63 - 1)
    if index == 0:
        raise BadParam("_index_ is required for _search_")
    await _require_queue(store, queue)
    position = await store.position(queue, index)
    if position is None:
        raise json_error(404, "not_found", f"index {index} is not in queue {queue!r} (committed or never put)")
    return web.json_response({"IsPending": position.pending, "WaitCount": position.waiting})


async def lookup(request: web.Request, queue: str) -> web.StreamResponse:
    """``GET ?_lookup_=true&requestId=R``: ``{"index", "committed"}`` for the item put with R, still on the
    queue or removed within the store's memory of removals; 404 when neither. A producer that got an unsure
    answer (a 503 whose put may have landed) asks this before it puts again."""
    store = request.app[STORE_KEY]
    request_id = params.header_safe(REQUEST_ID_TAG, request.query.get(REQUEST_ID_TAG, ""))
    await _require_queue(store, queue)
    seen = await store.lookup(queue, request_id)
    if seen is None:
        raise json_error(404, "not_found", f"requestId {request_id} is neither on queue {queue!r} "
                                           "nor among its recent removals")
    return web.json_response({"requestId": request_id, "index": seen.index, "committed": seen.committed})


# -- commit, delete, truncate ---------------------------------------------------------


async def remove(request: web.Request, queue: str) -> web.StreamResponse:
    store = request.app[STORE_KEY]
    indexes = params.indexes(request.query)
    if not await store.remove(queue, indexes):  # one store call for a commit; the 404 check only when idle
        await _require_queue(store, queue)
    return web.Response(text="OK")


async def truncate(request: web.Request, queue: str) -> web.StreamResponse:
    store = request.app[STORE_KEY]
    below = params.integer(request.query, "_index_", -1, low=0, high=2**63 - 1)
    if below < 0:
        raise BadParam("_index_ is required for _trunc_ (entries below it are dropped)")
    await store.truncate(queue, below)
    return web.Response(text="OK")


# -- dispatch --------------------------------------------------------------------------


async def handle(request: web.Request) -> web.StreamResponse:
    query = request.query
    try:
        queue = _queue_name(request)
        for unsupported in ("_eos_", "_negative_"):  # end-of-stream and negative commits (Java SDK)
            if params.flag(query, unsupported):
                raise BadParam(f"{unsupported} is not supported by this queue service")
        if request.method == "POST":
            return await put(request, queue)
        if request.method == "GET":
            if params.flag(query, "_watch_"):
                return await watch(request, queue, request.app[STORE_KEY], request.app[SETTINGS_KEY],
                                   request.app[WATCHERS_KEY])
            if params.flag(query, "_attrs_"):
                return await attributes(request, queue)
            if params.flag(query, "_search_"):
                return await search(request, queue)
            if params.flag(query, "_lookup_"):
                return await lookup(request, queue)
            if params.flag(query, "_count_"):
                return web.Response(text=str((await request.app[STORE_KEY].stats(queue)).length))
            return await get(request, queue)
        if request.method == "PUT":
            return await remove(request, queue)
        if request.method == "DELETE":
            if params.flag(query, "_trunc_"):
                return await truncate(request, queue)
            return await remove(request, queue)
        raise json_error(405, "method_not_allowed", f"{request.method} is not supported")
    except BadParam as exc:
        raise json_error(400, "bad_request", str(exc)) from None
    except StoreUnavailable as exc:
        raise json_error(503, "store_unavailable", str(exc)) from None


async def healthz(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok", "backend": request.app[STORE_KEY].backend})


def make_store(settings: QueueSettings) -> QueueStore:
    if settings.redis_url:
        from .redis_store import RedisStore

        return RedisStore(settings.redis_url, call_timeout_s=settings.redis_call_timeout_s)
    from .sqlite_store import SQLiteStore

    if settings.sqlite_path is None:
        raise ValueError("the queue service needs a SQLite path or a Redis URL")
    return SQLiteStore(settings.sqlite_path)


def create_app(settings: QueueSettings, store: QueueStore | None = None) -> web.Application:
    """The aiohttp app; the store is opened on startup and closed on cleanup."""
    guard = AccessGuard(settings.access, token=settings.token, public_paths={"/healthz"}, login_path=None)
    app = web.Application(middlewares=[guard.middleware], client_max_size=settings.max_payload_bytes + 65536)
    app[SETTINGS_KEY] = settings
    app[STORE_KEY] = store if store is not None else make_store(settings)
    # Plain puts answered at the byte level when served by ``fastput.FastPutSite`` (the same guard decides).
    put_store = app[STORE_KEY]
    app[FAST_PUTS_KEY] = FastPuts(guard, put_store if isinstance(put_store, HandoffStore) else None, settings)

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        await app[STORE_KEY].open()
        yield
        await app[STORE_KEY].close()

    async def on_shutdown(app: web.Application) -> None:
        # Pending items go back at once so watchers on other processes can take them.
        await app[WATCHERS_KEY].close_all(code=1001, message=b"server shutting down", release=True)

    app[WATCHERS_KEY] = WatchRegistry()
    app.cleanup_ctx.append(store_ctx)
    app.on_shutdown.append(on_shutdown)
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", r"/api/predict/{name:[^/]+(?:/[^/]+)?}", handle)
    return app


__all__ = ["create_app", "make_store", "SETTINGS_KEY", "STORE_KEY", "WATCHERS_KEY"]
