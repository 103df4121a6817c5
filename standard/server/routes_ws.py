"""``/ws?clientId=``: ComfyUI's event socket.

On connect the client gets ``status`` with its ``sid``; a client reconnecting
with the id of the prompt that is executing also gets the current ``executing``
node. A first text message ``{"type": "feature_flags"}`` is answered with the
server's feature flags, as ComfyUI does.

``/ws?quiet=1`` (our addition; ComfyUI ignores it) opens a socket that gets
only what is addressed to its ``clientId``, none of the broadcasts (``status``
three times per prompt): a front's journal holds one only to learn when the
instance goes away, and each message it read and dropped cost the instance a
send (~50 us of its event loop per message on a loaded 2-core machine).
"""

from __future__ import annotations

import logging
import uuid

from aiohttp import WSMsgType, web

from ..http_util import event_socket, parse_json
from .context import instance_context, prompt_server
from .routes_info import server_features

log = logging.getLogger("comfyserve.server")
routes = web.RouteTableDef()
MAX_CLIENT_ID_CHARS = 256


@routes.get("/ws")
async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    server = prompt_server(request)
    sid = request.query.get("clientId", "")[:MAX_CLIENT_ID_CHARS] or uuid.uuid4().hex
    ws = event_socket()
    await ws.prepare(request)
    server.sockets[sid] = ws  # a reconnect with the same id replaces the old socket
    server.socket_flags[sid] = {}
    if request.query.get("quiet") == "1":
        server.quiet_sids.add(sid)
    else:
        server.quiet_sids.discard(sid)  # a reconnect with the same id may be a listening one
    try:
        await server.send_json("status", {"status": server.queue_info(), "sid": sid}, sid)
        if server.client_id == sid and server.last_node_id is not None:
            await server.send_json("executing", {"node": server.last_node_id}, sid)
        first_message = True
        async for msg in ws:
            if msg.type == WSMsgType.TEXT and first_message:
                try:
                    data = parse_json(msg.data)
                except ValueError:
                    data = None
                if isinstance(data, dict) and data.get("type") == "feature_flags":
                    server.socket_flags[sid] = data.get("data") or {}
                    features = server_features(instance_context(request).settings)
                    await server.send_json("feature_flags", features, sid)
                first_message = False
            elif msg.type == WSMsgType.ERROR:
                log.warning("ws connection closed with exception %s", ws.exception())
    finally:
        if server.sockets.get(sid) is ws:
            server.sockets.pop(sid, None)
            server.socket_flags.pop(sid, None)
            server.quiet_sids.discard(sid)
    return ws
