"""Cluster edition: the user hub's event bus across proxies when Redis refuses a publish."""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis
from aiohttp import web

from cluster_proxy.hub import UserHub
from support.processes import RedisServer
from support.wait import until


async def test_a_refused_publish_still_reaches_this_proxys_sockets(aiohttp_client: Any, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Redis refusing PUBLISH (here an ACL; or down past its retries) neither raises into the run that sent
    the event nor loses it for this proxy's own sockets; once Redis takes publishes again, the bus is used
    again and nothing arrives twice."""
    server = RedisServer(tmp_path / "redis")  # its own server: the ACL change must not touch other tests
    server.start()
    admin = redis.Redis.from_url(server.url)
    hub = UserHub()
    try:
        await hub.start_bus(server.url)

        async def socket(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            hub.add("alice", "tab", ws)
            async for _ in ws:
                pass
            hub.remove("alice", "tab", ws)
            return ws

        app = web.Application()
        app.router.add_get("/ws", socket)
        client = await aiohttp_client(app)
        ws = await client.ws_connect("/ws")
        await until(lambda: hub.count() == 1, what="the socket is registered")

        await admin.execute_command("ACL", "SETUSER", "default", "-publish")
        with caplog.at_level(logging.WARNING, logger="comfyserve.cluster.hub"):
            await hub.send_json("alice", "progress", {"value": 1}, "tab")
            await hub.send_bytes("alice", 1, b"png", "tab")
        assert await ws.receive_json(timeout=10) == {"type": "progress", "data": {"value": 1}}
        assert await ws.receive_bytes(timeout=10) == struct.pack(">I", 1) + b"png"
        warnings = [r.getMessage() for r in caplog.records if r.name == "comfyserve.cluster.hub"]
        assert len(warnings) == 1 and "cannot publish" in warnings[0], warnings

        await admin.execute_command("ACL", "SETUSER", "default", "+publish")
        await hub.send_json("alice", "progress", {"value": 2}, "tab")
        await hub.send_json("alice", "progress", {"value": 3}, "tab")
        assert await ws.receive_json(timeout=10) == {"type": "progress", "data": {"value": 2}}
        assert await ws.receive_json(timeout=10) == {"type": "progress", "data": {"value": 3}}
        await ws.close()
    finally:
        await hub.aclose()
        await admin.aclose()
        server.stop()
