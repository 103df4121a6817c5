"""Execution semantics of the embedded engine over HTTP and WS: progress and previews,
errors, list mapping, partial execution, caching with IS_CHANGED."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSMsgType

from support.server import events_until, is_done, wait_history

PLUGINS = Path(__file__).parent / "custom_nodes"


@pytest.fixture
def plugins(data_dir: Path) -> Path:
    shutil.copy(PLUGINS / "progress_node.py", data_dir / "custom_nodes")
    return data_dir


def empty(batch: int = 1) -> dict[str, Any]:
    return {"class_type": "EmptyImage", "inputs": {"width": 4, "height": 4, "batch_size": batch, "color": 0}}


def save(source: str, prefix: str = "x") -> dict[str, Any]:
    return {"class_type": "SaveImage", "inputs": {"images": [source, 0], "filename_prefix": prefix}}


async def submit(client: Any, graph: dict[str, Any], **fields: Any) -> str:
    resp = await client.post("/prompt", json={"prompt": graph, **fields})
    body = await resp.json()
    assert resp.status == 200, body
    return body["prompt_id"]


async def test_progress_events_and_binary_previews_reach_only_the_client(instance, plugins: Path) -> None:
    client = await instance()
    mine = await client.ws_connect("/ws?clientId=me")
    other = await client.ws_connect("/ws?clientId=other")
    await mine.receive_json()
    await other.receive_json()
    graph = {"1": empty(), "2": {"class_type": "TestProgress", "inputs": {"image": ["1", 0], "steps": 3}},
             "9": save("2")}
    prompt_id = await submit(client, graph, client_id="me")
    progress, previews, states = [], [], []
    while True:
        msg = await mine.receive(timeout=20)
        if msg.type == WSMsgType.BINARY:
            event, image_format = struct.unpack(">II", msg.data[:8])
            previews.append((event, image_format, msg.data[8:12]))
            continue
        event = msg.json()
        if event["type"] == "progress":
            progress.append(event["data"])
        if event["type"] == "progress_state" and "2" in event["data"]["nodes"]:
            node = event["data"]["nodes"]["2"]
            states.append((node["state"], node["value"], node["max"]))
        if is_done(prompt_id)(event):
            break
    assert [p["value"] for p in progress] == [1, 2, 3]
    # the per-node bar of the new frontend: started, each step (sent before its ``progress``), finished
    # (node 2 stays in the later events, finished, while node 9 runs)
    assert states[:5] == [("running", 0, 1), ("running", 1, 3), ("running", 2, 3), ("running", 3, 3),
                          ("finished", 3, 3)]
    assert set(states[5:]) == {("finished", 3, 3)}
    assert all(p["max"] == 3 and p["node"] == "2" and p["prompt_id"] == prompt_id for p in progress)
    assert previews and all(p == (1, 2, b"\x89PNG") for p in previews)  # preview image, PNG
    # the other socket got status broadcasts only
    while True:
        try:
            msg = await other.receive(timeout=0.3)
        except TimeoutError:
            break
        assert msg.type == WSMsgType.TEXT and msg.json()["type"] == "status"
    await mine.close()
    await other.close()


async def test_node_exception_gives_execution_error_and_keeps_earlier_outputs(instance, plugins: Path) -> None:
    client = await instance()
    ws = await client.ws_connect("/ws?clientId=e")
    await ws.receive_json()
    graph = {"1": empty(), "2": {"class_type": "TestFail", "inputs": {"image": ["1", 0], "message": "bad pixels"}},
             "9": save("2"), "10": save("1", "ok")}
    prompt_id = await submit(client, graph, client_id="e")
    events = await events_until(ws, is_done(prompt_id))
    error = next(e["data"] for e in events if e["type"] == "execution_error")
    assert error["node_id"] == "2" and error["node_type"] == "TestFail"
    assert error["exception_message"] == "bad pixels" and error["exception_type"] == "ValueError"
    assert error["traceback"] and error["current_inputs"]["message"] == ["bad pixels"]
    entry = await wait_history(client, prompt_id)
    assert entry["status"] == {"status_str": "error", "completed": False, "messages": entry["status"]["messages"]}
    # the server keeps answering, and the next prompt runs
    follow = await submit(client, {"1": empty(), "9": save("1", "next")}, client_id="e")
    events = await events_until(ws, is_done(follow))
    assert "execution_success" in [e["type"] for e in events]
    await ws.close()


async def test_output_is_list_maps_the_next_node_per_item(instance, plugins: Path, data_dir: Path) -> None:
    client = await instance()
    graph = {"1": empty(batch=3), "2": {"class_type": "TestSplit", "inputs": {"image": ["1", 0]}},
             "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}}, "9": save("3", "split")}
    entry = await wait_history(client, await submit(client, graph))
    assert [i["filename"] for i in entry["outputs"]["9"]["images"]] == [
        "split_00001_.png", "split_00002_.png", "split_00003_.png"]


async def test_only_what_the_outputs_need_runs_and_partial_targets(instance, plugins: Path, data_dir: Path) -> None:
    client = await instance()
    graph = {"1": empty(), "2": {"class_type": "TestCount", "inputs": {"image": ["1", 0]}},
             "8": save("1", "a"), "9": save("2", "b")}
    prompt_id = await submit(client, graph, partial_execution_targets=["8"])
    entry = await wait_history(client, prompt_id)
    assert list(entry["outputs"]) == ["8"] and entry["prompt"][4] == ["8"]
    assert not (data_dir / "input" / "count.txt").exists()  # node 2 was not needed
    unused = {"1": empty(), "2": {"class_type": "TestCount", "inputs": {"image": ["1", 0]}}, "8": save("1", "c")}
    await wait_history(client, await submit(client, unused))
    assert not (data_dir / "input" / "count.txt").exists()


async def test_cache_reuses_unchanged_nodes_until_is_changed_says_otherwise(instance, plugins: Path,
                                                                           data_dir: Path) -> None:
    client = await instance()
    counter = data_dir / "input" / "count.txt"

    def graph(prefix: str) -> dict[str, Any]:
        return {"1": empty(), "2": {"class_type": "TestCount", "inputs": {"image": ["1", 0]}}, "9": save("2", prefix)}

    await wait_history(client, await submit(client, graph("p")))
    assert counter.read_text() == "1"
    await wait_history(client, await submit(client, graph("q")))  # only SaveImage's input changed
    assert counter.read_text() == "1"
    (data_dir / "input" / "salt.txt").write_text("new")
    await wait_history(client, await submit(client, graph("q")))
    assert counter.read_text() == "2"


async def test_load_image_reruns_when_the_file_changes(instance, data_dir: Path) -> None:
    from support.server import png_bytes

    client = await instance()
    (data_dir / "input" / "in.png").write_bytes(png_bytes((4, 4), (0, 0, 0, 255)))
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}}, "9": save("1", "load")}
    ws = await client.ws_connect("/ws?clientId=l")
    await ws.receive_json()

    async def cached() -> list[str]:
        prompt_id = await submit(client, graph, client_id="l")
        events = await events_until(ws, is_done(prompt_id))
        return next(e["data"]["nodes"] for e in events if e["type"] == "execution_cached")

    assert await cached() == []
    assert sorted(await cached()) == ["1", "9"]
    (data_dir / "input" / "in.png").write_bytes(png_bytes((4, 4), (255, 255, 255, 255)))
    assert await cached() == []
    await ws.close()
