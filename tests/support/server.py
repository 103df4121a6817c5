"""An embedded instance (fixture ``instance``) and the helpers of the instance tests: graphs, socket
events, the gate node that holds a prompt until the test opens it."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientWebSocketResponse, WSMsgType
from aiohttp.test_utils import TestClient
from PIL import Image

from standard.server.app import create_embedded_app
from standard.settings import StandardSettings
from support.processes import TESTS_DIR

InstanceFactory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def instance(aiohttp_client: Any, data_dir: Path) -> InstanceFactory:
    """Start a real instance app on a loopback port: ``client = await instance(token="t")``."""

    async def factory(**settings: Any) -> TestClient:
        app = create_embedded_app(StandardSettings(data_dir=data_dir, **settings))
        return await aiohttp_client(app)

    return factory


def png_bytes(size: tuple[int, int] = (8, 6), color: tuple[int, ...] = (200, 10, 10, 255),
              mode: str = "RGBA") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color[: len(mode)]).save(buffer, format="PNG")
    return buffer.getvalue()


def prompt_uuid(name: str) -> str:
    """A readable test's own ``prompt_id`` for ``name``: a canonical UUID, as ComfyUI requires, always the same."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyserve-test/{name}"))


def tiny_graph(prefix: str = "test", width: int = 16, height: int = 16, color: int = 0) -> dict[str, Any]:
    """EmptyImage -> SaveImage in API format."""
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": width, "height": height, "batch_size": 1, "color": color}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


async def next_json(ws: ClientWebSocketResponse, timeout_s: float = 20.0) -> dict[str, Any]:
    """The next text frame of ``ws`` (binary frames are skipped)."""
    while True:
        msg = await asyncio.wait_for(ws.receive(), timeout_s)
        if msg.type == WSMsgType.TEXT:
            return json.loads(msg.data)
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR):
            raise AssertionError(f"socket closed: {msg}")


async def events_until(ws: ClientWebSocketResponse, predicate: Callable[[dict[str, Any]], bool],
                       timeout_s: float = 20.0) -> list[dict[str, Any]]:
    """Text events up to and including the first one ``predicate`` accepts."""
    seen = []
    while True:
        event = await next_json(ws, timeout_s)
        seen.append(event)
        if predicate(event):
            return seen


def is_done(prompt_id: str) -> Callable[[dict[str, Any]], bool]:
    """The final ``executing`` (node None) of ``prompt_id``."""
    return lambda e: (e["type"] == "executing" and e["data"].get("node") is None
                      and e["data"].get("prompt_id") == prompt_id)


async def wait_history(client: TestClient, prompt_id: str, timeout_s: float = 20.0,
                       headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Poll /history/{id} until the prompt is recorded (for tests without a socket)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        resp = await client.get(f"/history/{prompt_id}", headers=headers)
        body = await resp.json()
        if prompt_id in body:
            return body[prompt_id]
        await asyncio.sleep(0.02)
    raise AssertionError(f"prompt {prompt_id} not in history after {timeout_s}s")


GATE_NODE = TESTS_DIR / "custom_nodes" / "gate_node.py"  # TestGate, the one gate node (benches copy it too)


def install_gate_plugin(data_dir: Path) -> None:
    """``TestGate`` into ``DIR/custom_nodes`` (as ``test_gate.py``)."""
    (data_dir / "custom_nodes").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(GATE_NODE, data_dir / "custom_nodes" / "test_gate.py")


def gate_inputs(gate: str, image: list[Any], *, steps: int = 0, interruptible: bool = False,
                count_runs: bool = False, timeout_s: float | None = None) -> dict[str, Any]:
    """The inputs of a ``TestGate`` node (tests/custom_nodes/gate_node.py says what each option does); options
    left at their defaults are left out, so a plain gate's prompt is just ``image`` and ``gate``."""
    inputs: dict[str, Any] = {"image": image, "gate": gate}
    options = {"steps": steps, "interruptible": interruptible, "count_runs": count_runs, "timeout_s": timeout_s}
    inputs.update({name: value for name, value in options.items() if value})
    return inputs


def gated_graph(gate: str, prefix: str, **options: Any) -> dict[str, Any]:
    """EmptyImage -> TestGate(gate, **options) -> SaveImage: runs until ``input/<gate>`` exists."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "TestGate", "inputs": gate_inputs(gate, ["1", 0], **options)},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def open_gate(data_dir: Path, gate: str) -> None:
    (data_dir / "input" / gate).write_text("open")


def runs_of(data_dir: Path, gate: str) -> int:
    """How many times a gate with ``count_runs`` has started."""
    path = data_dir / "input" / f"{gate}.runs"
    return len(path.read_text().splitlines()) if path.exists() else 0


def halfway_graph(gate: str, prefix: str) -> dict[str, Any]:
    """EmptyImage -> TestGate (node "3": progress 1/4, then held, interruptible) -> SaveImage (node "2"):
    a task caught mid-run."""
    graph = tiny_graph(prefix)
    graph["3"] = {"class_type": "TestGate", "inputs": gate_inputs(gate, ["1", 0], steps=4, interruptible=True)}
    graph["2"]["inputs"]["images"] = ["3", 0]
    return graph


def drain_gate_graph(gate: str, prefix: str) -> dict[str, Any]:
    """A gated graph whose gate a drain's timeout can cut (interruptible) and that counts its starts
    (``runs_of``): "ran exactly once more" is visible on disk."""
    return gated_graph(gate, prefix, interruptible=True, count_runs=True, timeout_s=60)
