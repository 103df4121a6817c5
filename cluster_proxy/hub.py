"""Each user's open ``/ws`` sockets, and sending to them.

ComfyUI sends a prompt's events to the socket of its ``client_id``; here that
socket is looked up among the owning user's sockets only, so an event can
never reach another user. When that socket is gone (a refreshed page), the
user's other sockets get it.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

from aiohttp import web

log = logging.getLogger("comfyserve.cluster.hub")


class UserHub:
    def __init__(self) -> None:
        self.sockets: dict[str, dict[str, web.WebSocketResponse]] = {}

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

    async def send_json(self, user: str, event: str, data: Any, sid: str | None = None) -> None:
        message = {"type": event, "data": data}
        for ws in self._targets(user, sid):
            try:
                await ws.send_json(message)
            except (ConnectionError, RuntimeError, OSError) as exc:
                log.debug("ws send to %s failed: %s", user, exc)

    async def send_bytes(self, user: str, event_type: int, payload: bytes, sid: str | None = None) -> None:
        message = struct.pack(">I", event_type) + payload
        for ws in self._targets(user, sid):
            try:
                await ws.send_bytes(message)
            except (ConnectionError, RuntimeError, OSError) as exc:
                log.debug("ws send to %s failed: %s", user, exc)
