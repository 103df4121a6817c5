"""/prompt validation in ComfyUI's error format: each kind of bad graph, nothing queued."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

PLUGINS = Path(__file__).parent / "custom_nodes"


def base() -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageRotate", "inputs": {"image": ["1", 0], "rotation": "none"}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "v"}},
    }


def with_change(node: str, name: str, value: Any) -> dict[str, Any]:
    graph = base()
    graph[node]["inputs"][name] = value
    return graph


CASES = [
    (with_change("1", "width", 0), "1", "value_smaller_than_min", "Value 0 smaller than min of 1"),
    (with_change("1", "width", 99999), "1", "value_bigger_than_max", "Value 99999 bigger than max of 16384"),
    (with_change("1", "width", "wide"), "1", "invalid_input_type", "Failed to convert an input value to a INT value"),
    (with_change("2", "rotation", "45 degrees"), "2", "value_not_in_list", "Value not in list"),
    (with_change("2", "image", ["1"]), "2", "bad_linked_input",
     "Bad linked input, must be a length-2 list of [node_id, slot_index]"),
    (with_change("2", "image", ["77", 0]), "2", "bad_linked_input", None),
    (with_change("2", "image", ["1", 5]), "2", "bad_linked_input", None),
    (with_change("9", "images", ["3", 0]) | {"3": {"class_type": "GetImageSize", "inputs": {"image": ["1", 0]}}},
     "9", "return_type_mismatch", "Return type mismatch between linked nodes"),
    (with_change("2", "image", "not a link"), "2", "invalid_input_type", None),
]


@pytest.mark.parametrize(("graph", "node", "kind", "message"), CASES)
async def test_input_errors_in_comfyui_format(instance, graph: dict[str, Any], node: str, kind: str,
                                              message: str | None) -> None:
    client = await instance()
    resp = await client.post("/prompt", json={"prompt": graph})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["error"]["message"] == "Prompt outputs failed validation"
    entry = body["node_errors"][node]
    assert entry["class_type"] == graph[node]["class_type"] and entry["dependent_outputs"] == ["9"]
    error = entry["errors"][0]
    assert error["type"] == kind and set(error) == {"type", "message", "details", "extra_info"}
    if message is not None:
        assert error["message"] == message
    assert set(body["node_errors"]) == {node}  # downstream nodes are invalid but not blamed
    assert await (await client.get("/queue")).json() == {"queue_running": [], "queue_pending": []}


async def test_value_not_in_list_details_name_the_choices(instance) -> None:
    client = await instance()
    body = await (await client.post("/prompt", json={"prompt": with_change("2", "rotation", "45")})).json()
    assert body["node_errors"]["2"]["errors"][0]["details"] == (
        "rotation: '45' not in ['none', '90 degrees', '180 degrees', '270 degrees']")


async def test_missing_class_type_and_custom_validation(instance, data_dir: Path) -> None:
    client = await instance()
    graph = base()
    del graph["1"]["class_type"]
    body = await (await client.post("/prompt", json={"prompt": graph})).json()
    assert body["error"]["type"] == "missing_node_type" and body["error"]["details"] == "Node ID '#1'"

    graph = base() | {"3": {"class_type": "LoadImage", "inputs": {"image": "nope.png"}},
                      "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "l"}}}
    resp = await client.post("/prompt", json={"prompt": graph})
    body = await resp.json()
    # one output is fine, so the prompt is queued with the other's errors reported (ComfyUI does the same)
    assert resp.status == 200, body
    errors = body["node_errors"]["3"]["errors"]
    assert {e["type"] for e in errors} == {"custom_validation_failed"}
    assert "Invalid image file: nope.png" in errors[0]["details"]


async def test_cycle_is_refused_with_dependency_cycle(instance) -> None:
    client = await instance()
    graph = base() | {"3": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["4", 0]}},
                      "4": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}}}
    graph["2"]["inputs"]["image"] = ["4", 0]
    body = await (await client.post("/prompt", json={"prompt": graph})).json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    kinds = [e["type"] for entry in body["node_errors"].values() for e in entry["errors"]]
    assert "dependency_cycle" in kinds


async def test_string_numbers_are_converted_like_comfyui(instance) -> None:
    client = await instance()
    resp = await client.post("/prompt", json={"prompt": with_change("1", "width", "12")})
    assert resp.status == 200
    assert (await resp.json())["node_errors"] == {}


async def test_plugin_node_validates_optional_and_combo_inputs(instance, data_dir: Path) -> None:
    shutil.copytree(PLUGINS / "web_plugin", data_dir / "custom_nodes" / "web_plugin")
    client = await instance()
    bad = {"1": {"class_type": "TestEcho", "inputs": {"text": "x", "mode": "sideways"}}}
    body = await (await client.post("/prompt", json={"prompt": bad})).json()
    assert body["node_errors"]["1"]["errors"][0]["type"] == "value_not_in_list"
    bad_optional = {"1": {"class_type": "TestEcho", "inputs": {"text": "x", "mode": "upper", "image": ["1", 0]}}}
    body = await (await client.post("/prompt", json={"prompt": bad_optional})).json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
