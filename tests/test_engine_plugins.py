"""Plugins from DIR/custom_nodes: load at start, broken ones reported, new ones after /restart."""

from __future__ import annotations

import shutil
from pathlib import Path

from support.server import wait_history

PLUGINS = Path(__file__).parent / "custom_nodes"


async def test_plugins_load_and_a_broken_one_is_reported_not_fatal(instance, data_dir: Path) -> None:
    shutil.copytree(PLUGINS / "web_plugin", data_dir / "custom_nodes" / "web_plugin")
    shutil.copy(PLUGINS / "broken_plugin.py", data_dir / "custom_nodes")
    client = await instance()
    ready = await client.get("/readyz")
    assert ready.status == 200
    detail = await ready.json()
    assert "broken_plugin" in str(detail) and "boom at import" in str(detail)
    info = (await (await client.get("/object_info/TestEcho")).json())["TestEcho"]
    assert info["python_module"] == "custom_nodes.web_plugin" and info["output_node"] is True
    assert info["input"]["optional"]["image"] == ["IMAGE"]

    resp = await client.post("/prompt", json={"prompt": {"1": {"class_type": "TestEcho",
                                                               "inputs": {"text": "Hello", "mode": "upper"}}}})
    entry = await wait_history(client, (await resp.json())["prompt_id"])
    assert entry["outputs"] == {"1": {"text": ["HELLO"]}}


async def test_process_restart_picks_up_a_new_plugin_and_changed_code(instance, data_dir: Path) -> None:
    client = await instance()
    assert await (await client.get("/object_info/TestEcho")).json() == {}
    shutil.copytree(PLUGINS / "web_plugin", data_dir / "custom_nodes" / "web_plugin")
    assert (await client.post("/restart")).status == 200
    info = await (await client.get("/object_info/TestEcho")).json()
    assert info["TestEcho"]["input"]["required"]["mode"] == [["upper", "lower"]]

    node_file = data_dir / "custom_nodes" / "web_plugin" / "node.py"
    node_file.write_text(node_file.read_text().replace('["upper", "lower"]', '["upper", "lower", "title"]'))
    assert (await client.post("/api/restart")).status == 200
    info = await (await client.get("/object_info/TestEcho")).json()
    assert info["TestEcho"]["input"]["required"]["mode"] == [["upper", "lower", "title"]]

    (data_dir / "custom_nodes" / "web_plugin" / "__init__.py").write_text("raise ImportError('now broken')\n")
    assert (await client.post("/restart")).status == 200
    assert await (await client.get("/object_info/TestEcho")).json() == {}
    assert "now broken" in str(await (await client.get("/readyz")).json())
    assert "EmptyImage" in await (await client.get("/object_info")).json()
