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


async def test_a_quiet_socket_gets_what_is_addressed_to_it_and_no_broadcasts(instance) -> None:
    """``/ws?quiet=1`` (a front's journal: it only watches the socket stay open) is sent no ``status``."""
    client = await instance()
    quiet = await client.ws_connect("/ws?clientId=journal&quiet=1")
    listening = await client.ws_connect("/ws?clientId=ui")
    assert (await next_json(quiet))["data"]["sid"] == "journal"  # its own greeting still comes
    await next_json(listening)
    resp = await client.post("/prompt", json={"prompt": tiny_graph("quiet"), "client_id": "journal"})
    prompt_id = (await resp.json())["prompt_id"]
    seen = await events_until(quiet, is_done(prompt_id))  # its prompt's events, sent after each status
    await events_until(listening, lambda e: e["type"] == "status"
                       and e["data"]["status"]["exec_info"]["queue_remaining"] == 0)
    await quiet.send_str(json.dumps({"type": "feature_flags", "data": {}}))
    seen += await events_until(quiet, lambda e: e["type"] == "feature_flags")
    assert {"execution_start", "executed"} <= {e["type"] for e in seen}
    assert "status" not in {e["type"] for e in seen}
    await quiet.close()
    await listening.close()


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


def _shape(event: dict) -> str:
    """An event as the order test compares it: its type and the detail that tells the steps apart."""
    kind, data = event["type"], event["data"]
    if kind == "status":
        return f"status {data['status']['exec_info']['queue_remaining']}"
    if kind == "progress_state":
        return "progress_state " + ",".join(f"{node}:{state['state']}" for node, state in sorted(data["nodes"].items()))
    if kind == "executing":
        return f"executing {data['node']}"
    if kind == "executed":
        return f"executed {data['node']} {'null' if data['output'] is None else 'output'}"
    if kind == "execution_cached":
        return f"execution_cached {','.join(data['nodes'])}"
    return kind


# What ComfyUI 0.3.64 (run behind `comfyserve standard --comfyui-dir`) sent its client for this graph,
# run fresh and then again with everything cached.
INVERT_GRAPH = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "order"}},
}
COMFYUI_FRESH_RUN = [
    "status 1", "status 1", "execution_start", "execution_cached ",
    "progress_state 1:running", "executing 1", "progress_state 1:finished",
    "progress_state 1:finished,2:running", "executing 2", "progress_state 1:finished,2:finished",
    "progress_state 1:finished,2:finished,3:running", "executing 3", "executed 3 output",
    "progress_state 1:finished,2:finished,3:finished", "execution_success", "status 0", "executing None",
]
COMFYUI_CACHED_RUN = [
    "status 1", "status 1", "execution_start", "execution_cached 1,2,3", "executed 3 output",
    "progress_state 3:finished", "execution_success", "status 0", "executing None",
]


async def test_event_order_and_progress_state_are_comfyuis(instance) -> None:
    client = await instance()
    ws = await client.ws_connect("/ws?clientId=order")
    await next_json(ws)
    runs = []
    for _ in range(2):
        resp = await client.post("/prompt", json={"prompt": INVERT_GRAPH, "client_id": "order"})
        prompt_id = (await resp.json())["prompt_id"]
        events = await events_until(ws, is_done(prompt_id))
        runs.append([_shape(e) for e in events])
        states = [e["data"] for e in events if e["type"] == "progress_state"]
        assert all(s["prompt_id"] == prompt_id for s in states)
        assert {n["prompt_id"] for s in states for n in s["nodes"].values()} == {prompt_id}
        assert all(n["node_id"] == n["display_node_id"] == n["real_node_id"] == node and n["parent_node_id"] is None
                   for s in states for node, n in s["nodes"].items())
        assert all(n["value"] == n["max"] for n in states[-1]["nodes"].values())
    assert runs == [COMFYUI_FRESH_RUN, COMFYUI_CACHED_RUN]
    await ws.close()


async def test_engine_thread_events_arrive_in_order_with_one_wakeup_per_burst(instance, monkeypatch) -> None:
    """A prompt's events come from the engine's thread in a burst: the loop is woken once for it, not per event."""
    import threading

    client = await instance()
    ws = await client.ws_connect("/ws?clientId=burst")
    await next_json(ws)
    server = client.app[keys.PROMPT_SERVER]
    loop = asyncio.get_running_loop()
    wakeups = 0
    real_call_soon_threadsafe = loop.call_soon_threadsafe

    def counting(*args, **kwargs):
        nonlocal wakeups
        wakeups += 1
        return real_call_soon_threadsafe(*args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    engine = threading.Thread(target=lambda: [server.send_sync("progress", {"value": i, "max": 40}, "burst")
                                              for i in range(40)])
    engine.start()
    engine.join()  # the loop is held on purpose: the whole burst is queued before it can take any
    assert wakeups == 1
    events = [await next_json(ws) for _ in range(40)]
    assert [(e["type"], e["data"]["value"]) for e in events] == [("progress", i) for i in range(40)]
    engine = threading.Thread(target=lambda: server.send_sync("progress", {"value": 40, "max": 40}, "burst"))
    engine.start()
    engine.join()
    assert wakeups == 2 and (await next_json(ws))["data"]["value"] == 40  # the next burst wakes it again
    await ws.close()
