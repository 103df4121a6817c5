"""/ws: ComfyUI's event socket — who gets which event, reconnects, feature flags."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import websockets

from standard.server import keys
from support.server import events_until, gated_graph, install_gate_plugin, is_done, next_json, open_gate, tiny_graph
from support.wait import until


async def test_status_with_sid_on_connect_and_generated_sid(instance) -> None:
    client = await instance()
    ws = await client.ws_connect("/ws")
    first = await next_json(ws)
    assert first["type"] == "status"
    assert len(first["data"]["sid"]) == 32
    assert first["data"]["status"] == {"exec_info": {"queue_remaining": 0}}
    await ws.close()


async def test_feature_flags_handshake(instance) -> None:
    client = await instance(max_upload_size_mb=1)
    ws = await client.ws_connect("/api/ws?clientId=ff")
    await next_json(ws)
    await ws.send_str(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": False}}))
    reply = await next_json(ws)
    assert reply["type"] == "feature_flags"
    assert reply["data"]["max_upload_size"] == 1024 * 1024
    await ws.close()


async def test_event_socket_declines_permessage_deflate_under_churn(instance) -> None:
    """Browsers and ``websockets`` offer deflate; /ws answers plain frames, so closed sockets hold no zlib state."""
    client = await instance()

    async def connect_read_close(n: int) -> str | None:
        async with websockets.connect(f"ws://127.0.0.1:{client.port}/ws?clientId=churn{n}",
                                      compression="deflate") as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "status"
            assert ws.response is not None
            return ws.response.headers.get("Sec-WebSocket-Extensions")

    assert await asyncio.gather(*(connect_read_close(n) for n in range(20))) == [None] * 20
    server = client.server.app[keys.PROMPT_SERVER]
    await until(lambda: not server.sockets)  # and every closed socket left the registry


async def test_real_websockets_client(instance) -> None:
    client = await instance()
    async with websockets.connect(f"ws://127.0.0.1:{client.port}/ws?clientId=plain") as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert first == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "plain"}}


async def test_reconnect_with_same_id_replaces_the_old_socket(instance) -> None:
    client = await instance()
    old = await client.ws_connect("/ws?clientId=same")
    await next_json(old)
    new = await client.ws_connect("/ws?clientId=same")
    await next_json(new)
    await old.close()
    # the new socket is still registered after the old one went away: it gets the
    # status broadcast that a queue change sends to everyone
    assert (await client.post("/queue", json={"clear": True})).status == 200
    update = await next_json(new)
    assert update == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}}}
    await new.close()


async def test_events_go_to_the_prompts_client_and_status_to_everyone(instance) -> None:
    client = await instance()
    mine = await client.ws_connect("/ws?clientId=mine")
    theirs = await client.ws_connect("/ws?clientId=theirs")
    await next_json(mine)
    await next_json(theirs)
    resp = await client.post("/prompt", json={"prompt": tiny_graph("ws"), "client_id": "mine"})
    prompt_id = (await resp.json())["prompt_id"]
    events = await events_until(mine, is_done(prompt_id))
    assert {"execution_start", "executed", "execution_success"} <= {e["type"] for e in events}
    # the other client sees queue status changes only, ending at an empty queue
    seen = await events_until(theirs, lambda e: e["type"] == "status"
                              and e["data"]["status"]["exec_info"]["queue_remaining"] == 0)
    assert {e["type"] for e in seen} == {"status"}
    await mine.close()
    await theirs.close()


async def test_reconnect_during_execution_gets_the_current_node(instance, data_dir: Path) -> None:
    install_gate_plugin(data_dir)
    client = await instance()
    ws = await client.ws_connect("/ws?clientId=rc")
    await next_json(ws)
    resp = await client.post("/prompt", json={"prompt": gated_graph("g-rc", "rc"), "client_id": "rc"})
    prompt_id = (await resp.json())["prompt_id"]
    await events_until(ws, lambda e: e["type"] == "executing" and e["data"].get("node") == "2")
    await ws.close()
    again = await client.ws_connect("/ws?clientId=rc")
    status = await next_json(again)
    assert status["type"] == "status" and status["data"]["status"]["exec_info"]["queue_remaining"] == 1
    current = await next_json(again)
    assert current == {"type": "executing", "data": {"node": "2"}}
    open_gate(data_dir, "g-rc")
    events = await events_until(again, is_done(prompt_id))
    assert "execution_success" in [e["type"] for e in events]
    await again.close()
