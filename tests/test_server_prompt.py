"""/prompt, /queue, /interrupt, /free and /history against the embedded engine, over HTTP and WS."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from standard.server import keys, prompt_queue
from support.metrics import parse, value
from support.server import (
    events_until,
    gated_graph,
    install_gate_plugin,
    is_done,
    open_gate,
    runs_of,
    tiny_graph,
    wait_history,
)


async def _submit(client, graph: dict[str, Any], **fields: Any) -> dict[str, Any]:
    resp = await client.post("/prompt", json={"prompt": graph, **fields})
    body = await resp.json()
    assert resp.status == 200, body
    return body


async def _connect(client, client_id: str):
    ws = await client.ws_connect(f"/ws?clientId={client_id}")
    first = await ws.receive_json(timeout=10)
    assert first == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": client_id}}
    return ws


async def test_prompt_runs_end_to_end_with_events_history_and_file(instance, data_dir: Path) -> None:
    client = await instance()
    ws = await _connect(client, "c1")
    body = await _submit(client, tiny_graph("e2e"), client_id="c1")
    assert set(body) == {"prompt_id", "number", "node_errors"}
    assert body["node_errors"] == {} and body["number"] == 0
    prompt_id = body["prompt_id"]
    events = await events_until(ws, is_done(prompt_id))
    types = [e["type"] for e in events]
    assert "execution_start" in types and "execution_success" in types
    assert types.index("execution_start") < types.index("executed") < types.index("execution_success")
    executed = next(e["data"] for e in events if e["type"] == "executed")
    assert executed["node"] == "2" and executed["prompt_id"] == prompt_id
    image = executed["output"]["images"][0]
    assert image == {"filename": "e2e_00001_.png", "subfolder": "", "type": "output"}
    assert (data_dir / "output" / "e2e_00001_.png").is_file()

    view = await client.get("/view", params=image)
    assert view.status == 200 and view.headers["Content-Type"] == "image/png"

    history = await (await client.get(f"/history/{prompt_id}")).json()
    entry = history[prompt_id]
    number, hid, graph, extra_data, outputs = entry["prompt"]
    assert (number, hid, graph, outputs) == (0, prompt_id, tiny_graph("e2e"), ["2"])
    assert extra_data["client_id"] == "c1" and isinstance(extra_data["create_time"], int)
    assert entry["outputs"] == {"2": {"images": [image]}}
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert [m[0] for m in entry["status"]["messages"]][0] == "execution_start"
    assert "meta" in entry
    assert await (await client.get("/api/history/nope")).json() == {}
    await ws.close()


async def test_prompt_id_and_number_from_the_request_are_kept(instance) -> None:
    client = await instance()
    ws = await _connect(client, "c2")
    own_id = str(uuid.uuid4())
    body = await _submit(client, tiny_graph("mine"), client_id="c2", prompt_id=own_id, number=7)
    assert body["prompt_id"] == own_id and body["number"] == 7.0
    await events_until(ws, is_done(own_id))
    await ws.close()


@pytest.mark.parametrize("prompt_id", [
    "my-id-1", "", 5, ["x"], "B1D4F1E2-4C2B-4E8A-9F1C-2D3E4F5A6B7C", "b1d4f1e24c2b4e8a9f1c2d3e4f5a6b7c",
    "{b1d4f1e2-4c2b-4e8a-9f1c-2d3e4f5a6b7c}", "urn:uuid:b1d4f1e2-4c2b-4e8a-9f1c-2d3e4f5a6b7c",
])
async def test_a_clients_prompt_id_must_be_a_canonical_uuid(instance, prompt_id: object) -> None:
    """As ComfyUI's ``validate_job_id``: any other spelling is refused, not rewritten."""
    client = await instance()
    resp = await client.post("/prompt", json={"prompt": tiny_graph(), "prompt_id": prompt_id})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["type"] == "invalid_prompt_id" and body["node_errors"] == {}
    assert await (await client.get("/queue")).json() == {"queue_running": [], "queue_pending": []}


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (b"{not json", "invalid_prompt"),
        (b"[1, 2]", "invalid_prompt"),
        (b"", "invalid_prompt"),
        (b'{"client_id": "x"}', "no_prompt"),
        (b'{"prompt": [1, 2]}', "invalid_prompt"),
        (b'{"prompt": "text"}', "invalid_prompt"),
        (b'{"prompt": {}, "extra_data": 5}', "invalid_prompt"),
        (b'{"prompt": {}, "number": "first"}', "invalid_prompt"),
        (b'{"prompt": {}, "prompt_id": ""}', "invalid_prompt_id"),
    ],
)
async def test_malformed_requests_get_comfyui_error_shape(instance, payload: bytes, kind: str) -> None:
    client = await instance()
    resp = await client.post("/prompt", data=payload, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["type"] == kind
    assert set(body["error"]) >= {"type", "message", "details", "extra_info"}
    assert body["node_errors"] == {}
    assert await (await client.get("/queue")).json() == {"queue_running": [], "queue_pending": []}


async def test_unknown_node_missing_input_and_cycle_are_refused(instance) -> None:
    client = await instance()
    unknown = {"1": {"class_type": "KSampler", "inputs": {}},
               "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}
    resp = await client.post("/prompt", json={"prompt": unknown})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["type"] == "missing_node_type"  # ComfyUI's type for a node it does not have
    assert "KSampler" in body["error"]["message"] and "--comfyui-dir" in body["error"]["message"]
    assert body["error"]["extra_info"]["class_type"] == "KSampler"

    missing = tiny_graph()
    del missing["1"]["inputs"]["width"]
    resp = await client.post("/prompt", json={"prompt": missing})
    body = await resp.json()
    assert resp.status == 400
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    errors = body["node_errors"]["1"]["errors"] if "1" in body["node_errors"] else body["node_errors"]["2"]["errors"]
    assert any(e["type"] == "required_input_missing" for e in errors)

    cycle = {
        "1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "c"}},
    }
    resp = await client.post("/prompt", json={"prompt": cycle})
    assert resp.status == 400
    assert "error" in await resp.json()

    no_outputs = {"1": tiny_graph()["1"]}
    resp = await client.post("/prompt", json={"prompt": no_outputs})
    assert resp.status == 400
    assert (await resp.json())["error"]["type"] == "prompt_no_outputs"
    assert await (await client.get("/queue")).json() == {"queue_running": [], "queue_pending": []}
    assert await (await client.get("/history")).json() == {}


async def test_queue_order_front_number_delete_and_clear(instance, data_dir: Path) -> None:
    install_gate_plugin(data_dir)
    client = await instance()
    ws = await _connect(client, "q")
    first = await _submit(client, gated_graph("g-a", "a"), client_id="q")
    early = await events_until(ws, lambda e: e["type"] == "executing" and e["data"].get("node") == "2")
    assert [ev["data"]["prompt_id"] for ev in early if ev["type"] == "execution_start"] == [first["prompt_id"]]
    b = await _submit(client, tiny_graph("b"), client_id="q")
    c = await _submit(client, tiny_graph("c"), client_id="q", front=True)
    d = await _submit(client, tiny_graph("d"), client_id="q", number=1.5)
    e = await _submit(client, tiny_graph("e"), client_id="q")
    assert c["number"] < 0 < b["number"] < d["number"] < e["number"]

    queue = await (await client.get("/queue")).json()
    assert [item[1] for item in queue["queue_running"]] == [first["prompt_id"]]
    pending = [c["prompt_id"], b["prompt_id"], d["prompt_id"], e["prompt_id"]]
    assert [item[1] for item in queue["queue_pending"]] == pending
    running = queue["queue_running"][0]
    assert len(running) == 5 and running[2] == gated_graph("g-a", "a") and running[4] == ["3"]
    assert (await (await client.get("/prompt")).json())["exec_info"]["queue_remaining"] == 5

    assert (await client.post("/queue", json={"delete": [b["prompt_id"], "unknown"]})).status == 200
    pending = (await (await client.get("/api/queue")).json())["queue_pending"]
    assert [item[1] for item in pending] == [c["prompt_id"], d["prompt_id"], e["prompt_id"]]
    # deleting the running prompt from the queue does not stop it
    await client.post("/queue", json={"delete": [first["prompt_id"]]})

    open_gate(data_dir, "g-a")
    started = [first["prompt_id"]]
    for expected in (first, c, d, e):
        events = await events_until(ws, is_done(expected["prompt_id"]))
        started += [ev["data"]["prompt_id"] for ev in events if ev["type"] == "execution_start"]
    assert started == [first["prompt_id"], c["prompt_id"], d["prompt_id"], e["prompt_id"]]

    # clear: pending items go, the running one finishes
    g = await _submit(client, gated_graph("g-b", "g"), client_id="q")
    await events_until(ws, lambda ev: ev["type"] == "executing" and ev["data"].get("node") == "2")
    h = await _submit(client, tiny_graph("h"), client_id="q")
    assert (await client.post("/queue", json={"clear": True})).status == 200
    queue = await (await client.get("/queue")).json()
    assert queue["queue_pending"] == [] and [i[1] for i in queue["queue_running"]] == [g["prompt_id"]]
    open_gate(data_dir, "g-b")
    await events_until(ws, is_done(g["prompt_id"]))
    history = await (await client.get("/history")).json()
    assert g["prompt_id"] in history and h["prompt_id"] not in history and b["prompt_id"] not in history
    await ws.close()


async def test_interrupt_only_the_named_running_prompt(instance, data_dir: Path) -> None:
    install_gate_plugin(data_dir)
    client = await instance()
    ws = await _connect(client, "i")
    run = await _submit(client, gated_graph("g-i", "i"), client_id="i")
    await events_until(ws, lambda e: e["type"] == "executing" and e["data"].get("node") == "2")
    assert (await client.post("/interrupt", json={"prompt_id": "not-running"})).status == 200
    assert (await client.post("/interrupt", json={"prompt_id": run["prompt_id"]})).status == 200
    open_gate(data_dir, "g-i")
    events = await events_until(ws, is_done(run["prompt_id"]))
    assert "execution_interrupted" in [e["type"] for e in events]
    entry = (await (await client.get(f"/history/{run['prompt_id']}")).json())[run["prompt_id"]]
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    metrics = parse(await (await client.get("/metrics")).text())
    assert value(metrics, "comfyserve_prompts_interrupted_total") == 1
    assert value(metrics, "comfyserve_prompts_failed_total") == 1
    # an interrupt with nothing running does not poison the next prompt
    assert (await client.post("/interrupt")).status == 200
    nxt = await _submit(client, tiny_graph("after"), client_id="i")
    events = await events_until(ws, is_done(nxt["prompt_id"]))
    assert "execution_success" in [e["type"] for e in events]
    await ws.close()


async def test_cache_between_prompts_and_free_drops_it(instance) -> None:
    client = await instance()
    ws = await _connect(client, "f")

    async def cached_nodes(prefix: str) -> list[str]:
        body = await _submit(client, tiny_graph(prefix), client_id="f")
        events = await events_until(ws, is_done(body["prompt_id"]))
        return next(e["data"]["nodes"] for e in events if e["type"] == "execution_cached")

    assert await cached_nodes("cache") == []
    assert "1" in await cached_nodes("cache")
    assert (await client.post("/free", json={"unload_models": True, "free_memory": True})).status == 200
    assert await cached_nodes("cache") == []
    resp = await client.post("/free", data=b"{oops", headers={"Content-Type": "application/json"})
    assert resp.status == 400
    await ws.close()


async def test_history_paging_delete_clear_and_bound(instance) -> None:
    client = await instance(history_max_items=3)
    ws = await _connect(client, "h")
    ids = []
    for index in range(4):
        body = await _submit(client, tiny_graph(f"h{index}", width=8 + index), client_id="h")
        await events_until(ws, is_done(body["prompt_id"]))
        ids.append(body["prompt_id"])
    history = await (await client.get("/history")).json()
    assert list(history) == ids[1:]  # bounded, oldest dropped
    assert list(await (await client.get("/history?max_items=2")).json()) == ids[2:]
    assert list(await (await client.get("/history?max_items=1&offset=0")).json()) == ids[1:2]
    assert list(await (await client.get("/history?offset=1")).json()) == ids[2:]
    assert (await client.get("/history?max_items=abc")).status == 400
    assert (await client.post("/history", json={"delete": [ids[2]]})).status == 200
    assert list(await (await client.get("/history")).json()) == [ids[1], ids[3]]
    assert (await client.post("/history", json={"delete": "notalist"})).status == 400
    assert list(await (await client.get("/history")).json()) == [ids[1], ids[3]]
    assert (await client.post("/history", json={"clear": True})).status == 200
    assert await (await client.get("/history")).json() == {}
    await ws.close()


async def test_duplicate_prompt_id_while_queued_is_refused(instance, data_dir: Path) -> None:
    install_gate_plugin(data_dir)
    client = await instance()
    ws = await _connect(client, "d")
    same = str(uuid.uuid4())
    await _submit(client, gated_graph("g-d", "d"), client_id="d", prompt_id=same)
    resp = await client.post("/prompt", json={"prompt": tiny_graph(), "prompt_id": same})
    assert resp.status == 400
    queue = await (await client.get("/queue")).json()
    assert [i[1] for i in queue["queue_running"] + queue["queue_pending"]] == [same]
    open_gate(data_dir, "g-d")
    await events_until(ws, is_done(same))
    await ws.close()


async def test_a_prompt_id_is_free_again_once_deleted_cleared_or_done(instance, data_dir: Path) -> None:
    install_gate_plugin(data_dir)
    client = await instance()
    ws = await _connect(client, "f")
    gate, pending, cleared = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    await _submit(client, gated_graph("g-f", "f"), client_id="f", prompt_id=gate)
    await _submit(client, tiny_graph("p"), client_id="f", prompt_id=pending)
    await _submit(client, tiny_graph("c"), client_id="f", prompt_id=cleared)
    for refused in (gate, pending):  # running, pending
        resp = await client.post("/prompt", json={"prompt": tiny_graph(), "prompt_id": refused})
        assert resp.status == 400
    assert (await client.post("/queue", json={"delete": [pending]})).status == 200
    await _submit(client, tiny_graph("p2"), client_id="f", prompt_id=pending)
    assert (await client.post("/queue", json={"clear": True})).status == 200
    await _submit(client, tiny_graph("c2"), client_id="f", prompt_id=cleared)
    open_gate(data_dir, "g-f")
    await events_until(ws, is_done(cleared))
    await _submit(client, tiny_graph("again"), client_id="f", prompt_id=gate)  # done: may be queued again
    await events_until(ws, is_done(gate))
    await ws.close()


async def test_a_duplicate_check_does_not_walk_the_queue() -> None:
    from standard.server.prompt_queue import PromptQueue, QueueItem

    class Probe(str):
        compared = 0
        __hash__ = str.__hash__

        def __eq__(self, other: object) -> bool:
            Probe.compared += 1
            return str.__eq__(self, other)

    queue = PromptQueue(history_max_items=10)
    for index in range(500):
        queue.put(QueueItem(index, str(uuid.uuid4()), tiny_graph(), {}, ["2"], {}))
    assert not queue.contains(Probe(uuid.uuid4()))
    assert Probe.compared <= 1  # POST /prompt asks for every prompt: a walk made a deep queue quadratic


async def test_the_next_prompt_starts_without_the_event_loop(instance, data_dir: Path, tmp_path: Path) -> None:
    """Between two queued prompts the execution thread goes on by itself: the instance (its GPU) is not left
    idle until the event loop gets round to it. Here the loop is held (this test runs on it) from the moment
    the first prompt's gate opens: the second prompt still starts, with its "running" mark on disk first."""
    install_gate_plugin(data_dir)
    state_file = tmp_path / "state.sqlite3"
    client = await instance(state_file=state_file)
    ws = await _connect(client, "gap")
    first = await _submit(client, gated_graph("gap-a", "gap-a"), client_id="gap")
    second = await _submit(client, gated_graph("gap-b", "gap-b", count_runs=True), client_id="gap")
    await events_until(ws, lambda e: e["type"] == "executing" and e["data"].get("node") == "2")

    open_gate(data_dir, "gap-a")
    deadline = time.monotonic() + 20
    while runs_of(data_dir, "gap-b") == 0 and time.monotonic() < deadline:
        time.sleep(0.005)  # blocks the event loop on purpose
    assert runs_of(data_dir, "gap-b") == 1, "the second prompt waited for the event loop"
    with contextlib.closing(sqlite3.connect(f"file:{state_file}?mode=ro", uri=True)) as db:
        assert db.execute("SELECT prompt_id, running FROM prompts").fetchall() == [(second["prompt_id"], 1)]
        assert [row[0] for row in db.execute("SELECT prompt_id FROM history")] == [first["prompt_id"]]

    # the loop catches up: the first prompt's history and events, in ComfyUI's order, then the second's
    events = await events_until(ws, is_done(first["prompt_id"]))
    assert [e["type"] for e in events][-3:] == ["execution_success", "status", "executing"]
    history = await (await client.get(f"/history/{first['prompt_id']}")).json()
    assert history[first["prompt_id"]]["status"]["status_str"] == "success"
    queue = await (await client.get("/queue")).json()
    assert [item[1] for item in queue["queue_running"]] == [second["prompt_id"]] and queue["queue_pending"] == []
    open_gate(data_dir, "gap-b")
    events = await events_until(ws, is_done(second["prompt_id"]))
    types = [e["type"] for e in events]
    assert types[0] == "status" and types.index("execution_start") < types.index("execution_success")
    assert events[0]["data"]["status"]["exec_info"]["queue_remaining"] == 1
    await ws.close()


async def test_after_an_all_cached_prompt_the_loop_starts_the_next(instance, data_dir: Path, tmp_path: Path) -> None:
    """The execution thread goes on by itself only from a prompt that ran a node: one that was all cached kept
    no GPU busy, and its bookkeeping on that thread (the state file's commit beside the loop's work) cost a
    front ~15% of its round trips/s. Queued behind G (gated): C1 runs its nodes, C2 and C3 (the same graph)
    are all cached. G goes on to C1 and C1 to C2, but C2 goes back to the loop, whose writer thread commits
    C2's history with C3's running mark."""
    install_gate_plugin(data_dir)
    client = await instance(state_file=tmp_path / "state.sqlite3")
    store = client.server.app[keys.PROMPT_SERVER].queue.store
    commits: list[str] = []
    store._conn.set_trace_callback(  # noqa: SLF001
        lambda sql: commits.append(threading.current_thread().name) if sql == "COMMIT" else None)
    gated = await _submit(client, gated_graph("cached-gate", "gated"))
    cached = [(await _submit(client, tiny_graph("cached")))["prompt_id"] for _ in range(3)]
    open_gate(data_dir, "cached-gate")
    await wait_history(client, cached[-1])
    store._conn.set_trace_callback(None)  # noqa: SLF001
    assert commits.count("comfyserve-execute") == 2, commits  # G -> C1 -> C2, not C2 -> C3
    history = await (await client.get("/history")).json()
    assert list(history) == [gated["prompt_id"], *cached]
    assert {entry["status"]["status_str"] for entry in history.values()} == {"success"}
    cached_nodes = [next(m[1]["nodes"] for m in history[prompt_id]["status"]["messages"] if m[0] == "execution_cached")
                    for prompt_id in cached]
    assert cached_nodes == [[], ["1", "2"], ["1", "2"]]


async def test_history_answers_with_the_json_written_for_the_store(instance, data_dir: Path, tmp_path: Path,
                                                                   monkeypatch) -> None:
    """Prompts the execution thread went on from were encoded once, for the state file: /history (a front's
    journal reads every entry once more) sends that text, encoding only the last one, recorded on the loop."""
    install_gate_plugin(data_dir)
    client = await instance(state_file=tmp_path / "state.sqlite3")
    ids = []
    for index, prefix in enumerate(("first", "second", "third")):
        graph = gated_graph("held", prefix) if index == 0 else tiny_graph(prefix)
        ids.append((await (await client.post("/prompt", json={"prompt": graph})).json())["prompt_id"])
    open_gate(data_dir, "held")  # the other two were queued behind it: run back to back
    await wait_history(client, ids[-1])
    encoded: list[object] = []

    def counting(value: object) -> str:
        encoded.append(value)
        return json.JSONEncoder().encode(value)

    monkeypatch.setattr(prompt_queue, "encode_json", counting)
    resp = await client.get("/history")
    text = await resp.text()
    assert resp.content_type == "application/json"
    assert list(json.loads(text)) == ids
    assert text == json.dumps(json.loads(text))  # json.dumps' own text, as before
    assert [value["prompt"][1] for value in encoded if isinstance(value, dict)] == [ids[-1]]
