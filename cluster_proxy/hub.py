"""Each user's open ``/ws`` sockets, and sending to them.

ComfyUI sends a prompt's events to the socket of its ``client_id``; here that
socket is looked up among the owning user's sockets only, so an event can
never reach another user. When that socket is gone (a refreshed page), the
user's other sockets get it.

With ``--redis-url`` several proxies serve the same users: the proxy running a
task publishes its events on a Redis channel and every proxy delivers them
to the sockets it holds (``start_bus``). Events are best effort, as a socket
send is: when Redis refuses a publish (down past its client's retries, a
permission), the event still reaches this proxy's own sockets, a warning says
so once, and the run that sent it goes on (its result is in the store).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import struct
from typing import Any

import redis.asyncio as redis
from aiohttp import web

from standard.tasks import cancel_and_wait

from .store import REDIS_CALL_TIMEOUT_S, REDIS_CLIENT_OPTIONS, StateUnavailable, redis_call

log = logging.getLogger("comfyserve.cluster.hub")
CHANNEL = "comfyserve:cluster:events"


class UserHub:
    def __init__(self) -> None:
        self.sockets: dict[str, dict[str, web.WebSocketResponse]] = {}
        self._redis: Any = None
        self._listener: asyncio.Task[None] | None = None
        self._publish_failing = False  # warn once per outage, not once per event
        self.call_timeout_s = REDIS_CALL_TIMEOUT_S  # bounds each call on Redis but the listener's wait

    # -- sockets ----------------------------------------------------------------------

    def add(self, user: str, sid: str, ws: web.WebSocketResponse) -> None:
        self.sockets.setdefault(user, {})[sid] = ws

    def remove(self, user: str, sid: str, ws: web.WebSocketResponse) -> None:
        sockets = self.sockets.get(user, {})
        if sockets.get(sid) is ws:
            del sockets[sid]
        if not sockets:
            self.sockets.pop(user, None)

    def count(self) -> int:
        return sum(len(s) for s in self.sockets.values())

    def _targets(self, user: str, sid: str | None) -> list[web.WebSocketResponse]:
        sockets = self.sockets.get(user)
        if not sockets:
            return []
        if sid is not None and sid in sockets:
            return [sockets[sid]]
        return list(sockets.values())

    # -- sending --------------------------------------------------------------------------

    async def send_json(self, user: str, event: str, data: Any, sid: str | None = None, *,
                        local: bool = False) -> None:
        """``local``: this proxy's sockets only (what every proxy sends for itself, e.g. ``status``)."""
        message = {"type": event, "data": data}
        if self._redis is not None and not local and await self._publish({"u": user, "s": sid, "j": message}):
            return
        await self._deliver_json(user, sid, message)

    async def send_bytes(self, user: str, event_type: int, payload: bytes, sid: str | None = None) -> None:
        message = struct.pack(">I", event_type) + payload
        if self._redis is not None and await self._publish({"u": user, "s": sid,
                                                             "b": base64.b64encode(message).decode()}):
            return
        await self._deliver_bytes(user, sid, message)

    async def _deliver_json(self, user: str, sid: str | None, message: dict[str, Any]) -> None:
        for ws in self._targets(user, sid):
            try:
                await ws.send_json(message)
            except (ConnectionError, RuntimeError, OSError) as exc:
                log.debug("ws send to %s failed: %s", user, exc)

    async def _deliver_bytes(self, user: str, sid: str | None, message: bytes) -> None:
        for ws in self._targets(user, sid):
            try:
                await ws.send_bytes(message)
            except (ConnectionError, RuntimeError, OSError) as exc:
                log.debug("ws send to %s failed: %s", user, exc)

    # -- across proxies -----------------------------------------------------------------

    async def start_bus(self, redis_url: str) -> None:
        self._redis = redis.Redis.from_url(redis_url, **REDIS_CLIENT_OPTIONS)
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        async with redis_call(self.call_timeout_s):
            await pubsub.subscribe(CHANNEL)
        self._listener = asyncio.create_task(self._listen(pubsub), name="comfyserve-cluster-bus")

    async def _publish(self, envelope: dict[str, Any]) -> bool:
        """Publish to every proxy; False when Redis refused (the caller delivers to this proxy's sockets)."""
        try:
            async with redis_call(self.call_timeout_s):
                await self._redis.publish(CHANNEL, json.dumps(envelope, separators=(",", ":")))
        except StateUnavailable as exc:
            if not self._publish_failing:
                log.warning("cannot publish events on Redis (%r): only this proxy's sockets get them", exc)
                self._publish_failing = True
            return False
        if self._publish_failing:
            log.info("publishing events on Redis again")
            self._publish_failing = False
        return True

    async def _listen(self, pubsub: Any) -> None:
        try:
            async for message in pubsub.listen():
                try:
                    envelope = json.loads(message["data"])
                    user, sid = envelope["u"], envelope.get("s")
                    if user not in self.sockets:
                        continue
                    if "j" in envelope:
                        await self._deliver_json(user, sid, envelope["j"])
                    else:
                        await self._deliver_bytes(user, sid, base64.b64decode(envelope["b"]))
                except (ValueError, KeyError, TypeError):
                    log.warning("ignoring a malformed event on %s", CHANNEL)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def aclose(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await cancel_and_wait(self._listener)
        if self._redis is not None:
            await self._redis.aclose()
