"""Saved workflows with parameters: ``POST /api_prompt?workflow=NAME`` with ``{"params": ...}``, ``GET /workflows``."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from support.api import TOKEN, ApiFactory, read_results
from support.server import tiny_graph


def save_workflow(data_dir: Path, name: str, graph: dict[str, Any], params: dict[str, Any] | None = None) -> None:
    folder = data_dir / "workflows"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(graph))
    if params is not None:
        (folder / f"{name}.params.json").write_text(json.dumps(params))


SQUARE_PARAMS = {"width": "1.inputs.width",
                 "color": {"path": "1.inputs.color", "type": "int", "min": 0, "max": 16777215, "default": 0},
                 "prefix": {"path": "2.inputs.filename_prefix", "type": "string", "description": "file name"},
                 "seed": {"path": "1.inputs.batch_size", "type": "int", "min": 1, "max": 2, "random": True}}


async def call(live, name: str, body: Any = None, **params: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=live.url, trust_env=False) as http:
        kwargs: dict[str, Any] = {} if body is None else {"json": body}
        return await http.post("/api_prompt", params={"workflow": name, **params},
                               headers={"Authorization": TOKEN}, **kwargs)


async def listed(live) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=live.url, trust_env=False) as http:
        resp = await http.get("/workflows", headers={"Authorization": TOKEN})
    assert resp.status_code == 200, resp.text
    return {w["name"]: w for w in resp.json()["workflows"]}


async def queued(live) -> list[dict[str, Any]]:
    async with live.input() as queue:
        attributes = await queue.attributes()
        count = int(attributes["stream.length"])
        frames = await queue.get(0, count, timeout_s=1.0) if count else []
    return [json.loads(f.data) for f in frames]


async def test_a_saved_workflow_runs_with_the_clients_parameters(api: ApiFactory, instance_url: Any,
                                                                 data_dir: Path) -> None:
    save_workflow(data_dir, "square", tiny_graph(), SQUARE_PARAMS)
    live = await api(data_dir=data_dir, instance_urls=(await instance_url(),))
    resp = await call(live, "square", {"params": {"width": 9, "prefix": "wf"}}, task_id="wf")
    assert resp.status_code == 200, resp.text
    async with live.sink() as sink:
        [frame] = await read_results(sink, 1)
    assert frame.tags["status"] == "success" and frame.tags["workflow"] == "square"
    images = json.loads(frame.data)[-1]["2"]["images"]
    assert images[0]["filename"].startswith("wf_")
    with Image.open(data_dir / "output" / images[0]["filename"]) as image:
        assert image.size == (9, 16)


async def test_get_workflows_lists_parameters_and_follows_file_changes(api: ApiFactory, data_dir: Path) -> None:
    save_workflow(data_dir, "square", tiny_graph(), SQUARE_PARAMS)
    save_workflow(data_dir, "plain", tiny_graph())
    live = await api(data_dir=data_dir)
    workflows = await listed(live)
    assert workflows["plain"] == {"name": "plain", "params": {}}
    assert workflows["square"]["params"] == {
        "width": {"type": "int", "path": "1.inputs.width", "required": False, "default": 16},
        "color": {"type": "int", "path": "1.inputs.color", "required": False, "default": 0, "min": 0,
                  "max": 16777215},
        "prefix": {"type": "string", "path": "2.inputs.filename_prefix", "required": True,
                   "description": "file name"},
        "seed": {"type": "int", "path": "1.inputs.batch_size", "required": False, "min": 1, "max": 2,
                 "random": True}}
    # Edited in place: the next call sees the new parameter, no restart.
    save_workflow(data_dir, "square", tiny_graph(), {**SQUARE_PARAMS, "height": "1.inputs.height"})
    assert "height" in (await listed(live))["square"]["params"]
    resp = await call(live, "square", {"params": {"height": 3, "prefix": "p"}})
    assert resp.status_code == 200, resp.text
    [graph] = await queued(live)
    assert graph["1"]["inputs"]["height"] == 3 and graph["1"]["inputs"]["width"] == 16
    assert graph["1"]["inputs"]["batch_size"] in (1, 2)  # drawn at random within [min, max]
    assert graph["2"]["inputs"]["filename_prefix"] == "p"
    (data_dir / "workflows" / "plain.json").unlink()
    assert "plain" not in await listed(live)
    assert (await call(live, "plain")).status_code == 404


async def test_bad_workflow_calls_are_400_naming_the_parameter_and_queue_nothing(api: ApiFactory,
                                                                                  data_dir: Path) -> None:
    save_workflow(data_dir, "square", tiny_graph(), SQUARE_PARAMS)
    save_workflow(data_dir, "broken", tiny_graph(), {"text": "6.inputs.text"})
    save_workflow(data_dir, "linked", tiny_graph(), {"images": "2.inputs.images"})
    (data_dir / "workflows" / "ui.json").write_text(json.dumps({"nodes": [], "links": []}))
    live = await api(data_dir=data_dir)
    cases: list[tuple[str, Any, int, str, str]] = [
        ("square", {"params": {"prefix": "p", "colour": 3}}, 400, "bad_param", "unknown parameter 'colour'"),
        ("square", {"params": {"prefix": "p", "width": "9"}}, 400, "bad_param", "'width' must be an int"),
        ("square", {"params": {"prefix": "p", "width": True}}, 400, "bad_param", "'width' must be an int"),
        ("square", {"params": {"prefix": "p", "color": -1}}, 400, "bad_param", "'color' must be >= 0"),
        ("square", {"params": {"prefix": 5}}, 400, "bad_param", "'prefix' must be a string"),
        ("square", {"params": {}}, 400, "bad_param", "'prefix' is required"),
        ("square", None, 400, "bad_param", "'prefix' is required"),
        ("square", {"params": [1]}, 400, "bad_param", "must be an object"),
        ("square", {"prompt": tiny_graph()}, 400, "bad_request", "with ?workflow="),
        ("broken", {}, 400, "invalid_workflow", "'text': path '6.inputs.text' does not exist"),
        ("linked", {}, 400, "invalid_workflow", "is a link"),
        ("ui", {}, 400, "invalid_workflow", "class_type"),
        ("nope", {}, 404, "unknown_workflow", "no workflow 'nope'"),
        ("../square", {}, 400, "bad_request", "no '/' or '..'"),
        ("sub/square", {}, 400, "bad_request", "no '/' or '..'"),
        ("..", {}, 400, "bad_request", "no '/' or '..'"),
        ("square.params", {}, 400, "bad_request", "no '/' or '..'"),
        ("", {}, 400, "bad_request", "no '/' or '..'"),
    ]
    for name, body, status, kind, words in cases:
        resp = await call(live, name, body)
        assert resp.status_code == status, (name, body, resp.text)
        error = resp.json()["error"]
        assert error["type"] == kind and words in error["message"], (name, body, error)
    assert await queued(live) == []
    listing = await listed(live)
    assert "does not exist" in listing["broken"]["error"] and "class_type" in listing["ui"]["error"]


async def test_a_workflow_with_an_image_parameter_takes_the_file_as_an_input(api: ApiFactory, data_dir: Path) -> None:
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}
    save_workflow(data_dir, "edit", graph, {"image": {"path": "1.inputs.image", "type": "image"}})
    live = await api(data_dir=data_dir)
    async with httpx.AsyncClient(base_url=live.url, trust_env=False) as http:
        resp = await http.post("/api_prompt", params={"workflow": "edit"}, headers={"Authorization": TOKEN},
                               files={"params": (None, json.dumps({"image": "me.png"})),
                                      "file": ("me.png", b"PNGDATA")})
    assert resp.status_code == 200, resp.text
    [item] = await queued(live)
    folder = item["comfyserve"]["inputs_dir"]
    assert item["prompt"]["1"]["inputs"]["image"] == f"{folder}/me.png"
    assert (data_dir / "input" / folder / "me.png").read_bytes() == b"PNGDATA"
    inline = {"params": {"image": "b.png"}, "inputs": [{"name": "b.png", "data": base64.b64encode(b"B").decode()}]}
    assert (await call(live, "edit", inline)).status_code == 200
