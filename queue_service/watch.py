"""The WebSocket watch: one binary ``DataFrameProto`` frame per item.

Tags in the query (any parameter not shaped ``_name_``) make the watch take
only items carrying all of them; the others stay ready for other watchers.

The SDK reconnects at once after any error without closing the old socket,
so progress lives in the store, not in the connection: a new connection
opens a new session for its consumer (``gid/uid``), gets that consumer's
pending items sent again, and the old connection's next store call fails
with ``Superseded`` and it closes. A watcher that disappears keeps its
pending items for ``pending_timeout_s``; then they go to other consumers.
A watcher that closes the socket properly gives its pending items back at once.

The watch extensions of ``affinity`` (prefetch slots, a model preference) are for the API edition's
workers (``--prefetch``, 1 by default, and ``--affinity-wait``). A prefetching watch (``_prefetch_``)
also takes part in the hand-back (``handback``): the service may send it a TEXT message asking for a
queued-ahead item back, and reads its ``release`` answers. Every other watch, the SDK's included,
only ever gets binary frames, and any message its client sends is ignored.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from aiohttp import WSMsgType, web

from . import params
from .affinity import Affinity, PassedOver
from .handback import Holder
from .protocol import encode_body, encode_frame
from .settings import MAX_WINDOW, WATCH_EXTENSIONS_HEADER, QueueSettings
from .store import Item, QueueStore, StoreUnavailable, Superseded

log = logging.getLogger("comfyserve.queue.watch")
CLOSE_SUPERSEDED = 4001  # the consumer connected again; this socket is stale
PREFETCH_EXTENSIONS = "prefetch,handback"  # told to a prefetching watch (``WATCH_EXTENSIONS_HEADER``)


def _frame(item: Item, index_only: bool) -> bytes:
    if not index_only:
        return item.frame()
    tags, _, message = item.decoded()
    return encode_frame(item.index, encode_body(tags, b"", message))


def _ws_messages(payloads: list[bytes]) -> bytes:
    """Server-to-client binary WebSocket messages, one frame each (RFC 6455: FIN, opcode 2, unmasked;
    no extension, the watch never negotiates compression)."""
    out = bytearray()
    for payload in payloads:
        size = len(payload)
        if size < 126:
            out += bytes((0x82, size))
        elif size < 65536:
            out += b"\x82\x7e" + size.to_bytes(2, "big")
        else:
            out += b"\x82\x7f" + size.to_bytes(8, "big")
        out += payload
    return bytes(out)


async def _send(request: web.Request, ws: web.WebSocketResponse, frames: list[bytes]) -> None:
    """Send frames as WebSocket messages, several in one socket write: each write costs a system call
    and a wake-up of the reader, the largest part of a delivery's cost."""
    if len(frames) == 1:
        await ws.send_bytes(frames[0])
        return
    transport = request.transport
    if ws.closed or transport is None or transport.is_closing():
        raise ConnectionResetError("the watcher's connection is closing")
    transport.write(_ws_messages(frames))
    await request.writer.drain()  # back-pressure from a slow reader, as send_bytes does


async def _read_until_closed(ws: web.WebSocketResponse, queue: str, holder: Holder | None) -> bool:
    """Drain client messages (pings are answered by aiohttp); a prefetching watch's text messages go to its
    ``holder`` (hand-back releases). True if the client said goodbye."""
    while True:
        msg = await ws.receive()
        if msg.type == WSMsgType.TEXT and holder is not None:
            holder.received(msg.data)
        elif msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
            log.debug("ignoring a %s message from a watcher of %s", msg.type.name, queue)
        elif msg.type == WSMsgType.CLOSE:
            return msg.data in (1000, 1001)
        elif msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            return False


async def _hand_back(ws: web.WebSocketResponse, store: QueueStore, passed: PassedOver,
                     holder: Holder, queue: str, consumer: str, session: str) -> None:
    """A prefetching watch's part of the hand-back (``handback``): carry out its client's releases of items
    it was asked for, then send the asks its idle peers made of it."""
    holder.wake.clear()
    for index in holder.take_releases():
        if await store.release_one(queue, consumer, session, index):  # wakes the idle peer's watch
            holder.released(index)
            passed.let_go(queue, {index})
    for message in holder.take_asks():
        await ws.send_str(message)


class WatchRegistry:
    """The open watch sockets of this process, so shutdown (and tests) can close them."""

    def __init__(self) -> None:
        self.sockets: set[web.WebSocketResponse] = set()
        self.released: set[web.WebSocketResponse] = set()
        self.passed = PassedOver()  # the preferring watches' account (``affinity``)

    async def close_all(self, *, code: int, message: bytes, release: bool) -> None:
        """Close every watch; with ``release`` their pending items are ready for others at once."""
        sockets = list(self.sockets)
        if release:
            self.released.update(sockets)
        await asyncio.gather(*(ws.close(code=code, message=message) for ws in sockets), return_exceptions=True)


async def watch(request: web.Request, queue: str, store: QueueStore, settings: QueueSettings,
                registry: WatchRegistry) -> web.StreamResponse:
    query = request.query
    min_index = params.integer(query, "_index_", 0, low=0, high=2**63 - 1)
    window = params.integer(query, "_window_", 1, low=1, high=MAX_WINDOW)
    index_only = params.flag(query, "_index_only_")
    auto_commit = params.flag(query, "_auto_commit_")
    tags = params.tags_of(query)  # only items carrying all of them come to this watcher
    affinity = None if auto_commit else Affinity.of(query)  # prefetch slots, preference (``affinity``)
    sent: set[int] = set()
    consumer = params.consumer_of(request) or f"anonymous/{uuid.uuid4()}"
    session = uuid.uuid4().hex
    lease_s, poll_s = settings.pending_timeout_s, settings.poll_interval_s

    # No permessage-deflate: frames are small or already compressed, and latency matters more.
    ws = web.WebSocketResponse(autoping=True, max_msg_size=64 * 1024, compress=False)
    if affinity is not None and affinity.prefetch:
        ws.headers[WATCH_EXTENSIONS_HEADER] = PREFETCH_EXTENSIONS
    await ws.prepare(request)
    registry.sockets.add(ws)
    holder = affinity.holder if affinity is not None and affinity.prefetch else None
    reader = asyncio.create_task(_read_until_closed(ws, queue, holder))
    try:
        backlog = await store.open_session(queue, consumer, session, lease_s)
        if affinity is not None:
            affinity.open(registry.passed, queue, tags, [item.index for item in backlog])
        if backlog:
            await _send(request, ws, [_frame(item, index_only) for item in backlog])
        renewed_at = time.monotonic()
        resync = False
        while not ws.closed and not reader.done():
            changed = store.changes(queue)
            try:
                if holder is not None:
                    await _hand_back(ws, store, registry.passed, holder, queue, consumer, session)
                if resync:
                    # A store call failed mid-way: a claim may have happened without its reply,
                    # so send everything pending on this consumer again (duplicates are uncommitted).
                    if holder is not None:
                        holder.sent_again(holder.held)  # before the read: a release meanwhile is void
                    items = await store.pending(queue, consumer, session)
                    if holder is not None:
                        holder.sent_again([item.index for item in items])
                    resync = False
                elif affinity is not None:
                    items = await affinity.claim(store, registry.passed, queue, consumer, session, window=window,
                                                 min_index=min_index, lease_s=lease_s, tags=tags)
                    sent.update(item.index for item in items)
                else:
                    items = await store.claim(queue, consumer, session, window=window, min_index=min_index,
                                              auto_commit=auto_commit, lease_s=lease_s, tags=tags)
                if time.monotonic() - renewed_at >= poll_s:  # also while busy: leases must not lapse
                    await store.renew(queue, consumer, session, lease_s)
                    renewed_at = time.monotonic()
            except StoreUnavailable as exc:
                log.warning("watch %s: store unavailable (%s); retrying", queue, exc)
                items, resync = [], True
                await asyncio.sleep(poll_s)
            if items:
                await _send(request, ws, [_frame(item, index_only) for item in items])
                continue
            waiter = asyncio.ensure_future(changed.wait())
            waits: set[asyncio.Future[Any]] = {waiter, reader}
            if holder is not None:
                waits.add(asyncio.ensure_future(holder.wake.wait()))
            try:
                await asyncio.wait(waits, timeout=poll_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in waits - {reader}:
                    waiting.cancel()
    except Superseded:
        log.debug("watch %s: consumer %s reconnected; closing the old socket", queue, consumer)
        await ws.close(code=CLOSE_SUPERSEDED, message=b"superseded by a newer connection")
    except (ConnectionResetError, asyncio.CancelledError, StoreUnavailable) as exc:
        log.debug("watch %s: %s gone (%r)", queue, consumer, exc)
        if isinstance(exc, asyncio.CancelledError):
            raise
    finally:
        registry.sockets.discard(ws)
        registry.passed.let_go(queue, sent)
        if affinity is not None:
            affinity.close(registry.passed, queue, tags)
        clean_close = reader.done() and not reader.cancelled() and reader.exception() is None and reader.result()
        if ws in registry.released:
            registry.released.discard(ws)
            clean_close = True
        reader.cancel()
        # aiohttp may cancel this handler once the peer has gone; the goodbye must still happen.
        # A clean close gives the pending items back now; otherwise they wait for the lease to
        # run out (or for this consumer to come back) and only the session record goes.
        goodbye = store.release if clean_close else store.forget
        try:
            await asyncio.shield(goodbye(queue, consumer, session))
        except (StoreUnavailable, asyncio.CancelledError):
            pass
        if not ws.closed:
            await ws.close()
    return ws
