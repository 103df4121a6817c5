"""Items ready together reach a watcher as separate WebSocket messages written together (one socket write):
every size class of the frame header, byte for byte, on both stores."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import WSMsgType

from queue_service.protocol import decode_frame
from support.queue import TOKEN, LiveQueue


async def test_items_ready_together_arrive_as_one_message_each(
        make_live_queue: Callable[..., Awaitable[LiveQueue]]) -> None:
    live = await make_live_queue(max_payload_bytes=200_000)
    url = f"http://{live.endpoint}/api/predict/svc"
    bodies = [b"s" * 5, b"m" * 300, b"l" * 70_000, b"t" * 125, b"u" * 65_535, b"v" * 126]  # 7/16/64-bit lengths
    async with aiohttp.ClientSession(headers={"Authorization": TOKEN}) as http:
        indexes = []
        for body in bodies:
            async with http.post(url, data=body) as response:
                assert response.status == 200, await response.text()
                indexes.append(int(await response.text()))
        # All six are ready when the watcher connects: its first claim takes them together.
        async with http.ws_connect(url, params={"_watch_": "true", "_window_": "8"}, max_msg_size=0) as ws:
            got = []
            for _ in bodies:
                message = await asyncio.wait_for(ws.receive(), 10)
                assert message.type == WSMsgType.BINARY, message
                index, tags, data, _ = decode_frame(message.data)
                got.append((index, data))
                assert tags["requestId"]
    assert got == list(zip(indexes, bodies, strict=True))
