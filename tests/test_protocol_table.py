"""docs/protocol.md stays true: every route it says the embedded engine or the cluster serves answers
there (not 404 / 405), plain and under ``/api``, and every route it says they do not serve is not routed.

The routes of ComfyUI are listed in that file (ComfyUI's source is not here to parse); this walks the
table, fills each route's parameters with things that exist (an uploaded image, a finished prompt, a
userdata file, a model with a preview) and asks.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from support.cluster import Cluster
from support.server import png_bytes, tiny_graph, wait_history
from support.wait import until

TABLE = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
METHODS = ("GET", "POST", "PATCH", "DELETE", "PUT")
NOT_ROUTED = (404, 405)


@dataclass(frozen=True)
class Row:
    method: str
    route: str
    embedded: bool
    cluster: bool

    @property
    def prefixes(self) -> tuple[str, ...]:
        """ComfyUI serves its routes under ``/api`` too, but not ``/`` and the ``/internal`` sub-app."""
        return ("",) if self.route == "/" or self.route.startswith("/internal/") else ("", "/api")


def table_rows() -> list[Row]:
    rows = []
    for line in TABLE.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] in METHODS:
            method, route, _comfyui, embedded, _real, cluster, _notes = cells
            rows.append(Row(method, route.strip("`"), embedded == "yes", cluster == "yes"))
    return rows


def test_the_table_lists_comfyuis_routes() -> None:
    """The routes of ComfyUI 0.3.64's server.py, app/ and api_server/, and the newer /jobs (read at writing)."""
    comfyui = {
        ("GET", "/ws"), ("GET", "/"), ("GET", "/embeddings"), ("GET", "/models"), ("GET", "/models/{folder}"),
        ("GET", "/extensions"), ("POST", "/upload/image"), ("POST", "/upload/mask"), ("GET", "/view"),
        ("GET", "/view_metadata/{folder_name}"), ("GET", "/system_stats"), ("GET", "/features"), ("GET", "/prompt"),
        ("GET", "/object_info"), ("GET", "/object_info/{node_class}"), ("GET", "/history"),
        ("GET", "/history/{prompt_id}"), ("GET", "/queue"), ("POST", "/prompt"), ("POST", "/queue"),
        ("POST", "/interrupt"), ("POST", "/free"), ("POST", "/history"),
        ("GET", "/experiment/models"), ("GET", "/experiment/models/{folder}"),
        ("GET", "/experiment/models/preview/{folder}/{path_index}/{filename}"),
        ("GET", "/users"), ("POST", "/users"), ("GET", "/userdata"), ("GET", "/v2/userdata"),
        ("GET", "/userdata/{file}"), ("POST", "/userdata/{file}"), ("DELETE", "/userdata/{file}"),
        ("POST", "/userdata/{file}/move/{dest}"), ("GET", "/workflow_templates"), ("GET", "/i18n"),
        ("GET", "/settings"), ("GET", "/settings/{id}"), ("POST", "/settings"), ("POST", "/settings/{id}"),
        ("GET", "/internal/logs"), ("GET", "/internal/logs/raw"), ("PATCH", "/internal/logs/subscribe"),
        ("GET", "/internal/folder_paths"), ("GET", "/internal/files/{directory_type}"),
        ("GET", "/jobs"), ("GET", "/jobs/{job_id}"), ("POST", "/jobs/{job_id}/cancel"), ("POST", "/jobs/cancel"),
    }
    assert comfyui <= {(row.method, row.route) for row in table_rows()}


def safetensors_with_metadata(path: Path) -> None:
    header = json.dumps({"__metadata__": {"probe": "yes"}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)


@dataclass
class Probe:
    """What the requests name: things that exist on the server under test."""

    prompt_id: str

    def path(self, row: Row, prefix_index: int) -> str:
        i = prefix_index
        special = {
            ("GET", "/view"): "/view?filename=probe.png&type=input",
            ("GET", "/view_metadata/{folder_name}"): "/view_metadata/checkpoints?filename=probe.safetensors",
            ("GET", "/experiment/models/preview/{folder}/{path_index}/{filename}"):
                "/experiment/models/preview/checkpoints/0/probe.safetensors",
            ("DELETE", "/userdata/{file}"): f"/userdata/delete-{i}.json",
            ("POST", "/userdata/{file}"): f"/userdata/written-{i}.json",
            ("POST", "/userdata/{file}/move/{dest}"): f"/userdata/move-{i}.json/move/moved-{i}.json",
        }
        if (row.method, row.route) in special:
            return special[(row.method, row.route)]
        values = {"folder": "checkpoints", "folder_name": "checkpoints", "node_class": "EmptyImage",
                  "prompt_id": self.prompt_id, "job_id": self.prompt_id, "file": "probe.json", "id": "Comfy.Probe",
                  "directory_type": "input"}
        return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], row.route)

    @staticmethod
    def body(row: Row) -> dict[str, Any]:
        """Keyword arguments of the request: a body the route accepts."""
        if row.route in ("/upload/image", "/upload/mask"):
            form = aiohttp.FormData()
            form.add_field("image", png_bytes(), filename="probe-upload.png", content_type="image/png")
            if row.route == "/upload/mask":
                form.add_field("original_ref", json.dumps({"filename": "probe.png", "type": "input"}))
            return {"data": form}
        bodies: dict[str, Any] = {
            "/prompt": {"prompt": tiny_graph("probe")}, "/users": {"username": "probe"},
            "/settings/{id}": "on", "/internal/logs/subscribe": {"clientId": "probe", "enabled": False},
            "/jobs/cancel": {"job_ids": []},
        }
        if row.route.startswith("/userdata/"):
            return {"data": b"{}"}
        return {"json": bodies.get(row.route, {})} if row.method != "GET" else {}


Request = Callable[..., Awaitable[tuple[int, str]]]


async def walk(request: Request, ws_connect: Callable[[str], Any], probe: Probe, served: Callable[[Row], bool],
               where: str) -> list[str]:
    """Every row against one server; the claims that do not hold."""
    wrong = []
    for row in table_rows():
        for i, prefix in enumerate(row.prefixes):
            path = prefix + probe.path(row, i)
            if row.route == "/ws" and served(row):
                # ComfyUI's handshake: status (with the sid) first; a first message of feature flags is answered
                ws = await ws_connect(path + "?clientId=probe")
                first = await ws.receive_json(timeout=10)
                await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
                reply = await ws.receive_json(timeout=10)
                await ws.close()
                if first.get("type") != "status" or first["data"].get("sid") != "probe":
                    wrong.append(f"{where}: {path} sent {first}")
                if reply.get("type") != "feature_flags" or "max_upload_size" not in reply["data"]:
                    wrong.append(f"{where}: {path} answered the feature flags with {reply}")
                continue
            status, text = await request(row.method, path, **probe.body(row))
            if served(row) and status in NOT_ROUTED:
                wrong.append(f"{where}: {row.method} {path} answered {status}: {text[:120]}")
            elif not served(row) and status not in NOT_ROUTED:
                wrong.append(f"{where}: {row.method} {path} is said not served but answered {status}")
    return wrong


async def test_the_embedded_engine_serves_what_the_table_says(instance, data_dir: Path) -> None:
    client = await instance()
    checkpoints = data_dir / "models" / "checkpoints"
    safetensors_with_metadata(checkpoints / "probe.safetensors")
    (checkpoints / "probe.webp").write_bytes(png_bytes())
    (data_dir / "input" / "probe.png").write_bytes(png_bytes())
    for name in ("probe.json", "delete-0.json", "delete-1.json", "move-0.json", "move-1.json"):
        assert (await client.post(f"/userdata/{name}", data=b"{}")).status == 200
    prompt_id = (await (await client.post("/prompt", json={"prompt": tiny_graph("probe-run")})).json())["prompt_id"]
    await wait_history(client, prompt_id)

    async def request(method: str, path: str, **kwargs: Any) -> tuple[int, str]:
        async with client.request(method, path, **kwargs) as response:
            return response.status, (await response.read()).decode(errors="replace")

    assert await walk(request, client.ws_connect, Probe(prompt_id), lambda row: row.embedded, "embedded") == []


async def test_the_cluster_serves_what_the_table_says(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=1)
    http = cluster.http("alice")
    checkpoints = cluster.data_dir / "models" / "checkpoints"
    safetensors_with_metadata(checkpoints / "probe.safetensors")
    (checkpoints / "probe.webp").write_bytes(png_bytes())
    user_input = cluster.user_dir("alice") / "input"
    user_input.mkdir(parents=True, exist_ok=True)
    (user_input / "probe.png").write_bytes(png_bytes())
    for name in ("probe.json", "delete-0.json", "delete-1.json", "move-0.json", "move-1.json"):
        assert (await http.post(f"/userdata/{name}", data=b"{}")).status == 200
    alice = cluster.user("alice")
    prompt_id = await alice.submit(tiny_graph("probe-run"))
    await until(lambda: alice.history(prompt_id), timeout_s=30)

    async def request(method: str, path: str, **kwargs: Any) -> tuple[int, str]:
        async with http.request(method, path, **kwargs) as response:
            return response.status, (await response.read()).decode(errors="replace")

    wrong = await walk(request, http.ws_connect, Probe(prompt_id), lambda row: row.cluster, "cluster")
    assert wrong == [], "\n".join(wrong)


@pytest.mark.parametrize("column", ["Embedded", "Real ComfyUI", "Cluster"])
def test_every_websocket_event_of_comfyui_has_a_row(column: str) -> None:
    events = {"status", "feature_flags", "execution_start", "execution_cached", "progress_state", "executing",
              "progress", "executed", "execution_success", "execution_error", "execution_interrupted"}
    text = TABLE.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| Event |"))
    assert column in header
    rows = {cells[0].strip("` ") for line in text.splitlines()
            if (cells := [c.strip() for c in line.strip().strip("|").split("|")]) and cells[0].startswith("`")}
    assert events <= rows
