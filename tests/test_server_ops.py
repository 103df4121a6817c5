"""Info and operations routes: object_info, models, system_stats, features, health, metrics, restart."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST

from support.metrics import kinds, parse, value
from support.server import events_until, gated_graph, install_gate_plugin, is_done, next_json, open_gate, tiny_graph


async def test_models_and_embeddings_list_the_data_dir(instance, data_dir: Path) -> None:
    models = data_dir / "models"
    (models / "checkpoints" / "sd15").mkdir()
    (models / "checkpoints" / "b.safetensors").write_bytes(b"x")
    (models / "checkpoints" / "sd15" / "a.ckpt").write_bytes(b"x")
    (models / "checkpoints" / "notes.txt").write_text("not a model")
    (models / "embeddings" / "easyneg.pt").write_bytes(b"x")
    (models / "text_encoders" / "t5.safetensors").write_bytes(b"x")
    (models / "configs" / "v1.yaml").write_text("a: 1")
    client = await instance()
    folders = await (await client.get("/models")).json()
    assert {"checkpoints", "loras", "vae", "embeddings", "configs", "custom_nodes"} <= set(folders)
    assert await (await client.get("/api/models/checkpoints")).json() == ["b.safetensors", "sd15/a.ckpt"]
    assert await (await client.get("/models/configs")).json() == ["v1.yaml"]
    assert await (await client.get("/models/clip")).json() == ["t5.safetensors"]  # ComfyUI's legacy name
    assert (await client.get("/models/nope")).status == 404
    assert (await client.get("/models/.git")).status == 404
    assert await (await client.get("/embeddings")).json() == ["easyneg"]


async def test_a_settled_model_folder_is_not_walked_again_and_changes_show_at_once(
        instance, data_dir: Path, monkeypatch) -> None:
    """A node lists its folder each time it runs (INPUT_TYPES), between two prompts while the GPU waits: an
    unchanged folder is answered from the last walk (one stat per directory), a change anywhere in it at once."""
    import os
    import time

    checkpoints = data_dir / "models" / "checkpoints"
    (checkpoints / "sub").mkdir()
    (checkpoints / "a.safetensors").write_bytes(b"x")
    (checkpoints / "sub" / "b.safetensors").write_bytes(b"x")
    settled = time.time() - 60
    for folder in (checkpoints, checkpoints / "sub"):
        os.utime(folder, (settled, settled))
    walks: list[str] = []
    real_walk = os.walk

    def counting_walk(top, *args, **kwargs):
        walks.append(str(top))
        return real_walk(top, *args, **kwargs)

    monkeypatch.setattr(os, "walk", counting_walk)
    client = await instance()

    async def listed() -> list[str]:
        return await (await client.get("/models/checkpoints")).json()

    assert await listed() == ["a.safetensors", "sub/b.safetensors"]
    walked = len(walks)
    assert await listed() == ["a.safetensors", "sub/b.safetensors"] and len(walks) == walked
    (checkpoints / "sub" / "c.safetensors").write_bytes(b"x")  # a change in a subfolder
    assert await listed() == ["a.safetensors", "sub/b.safetensors", "sub/c.safetensors"]
    (checkpoints / "a.safetensors").unlink()
    assert await listed() == ["sub/b.safetensors", "sub/c.safetensors"]


async def test_system_stats_and_features_shapes(instance) -> None:
    client = await instance()
    stats = await (await client.get("/system_stats")).json()
    system = stats["system"]
    for key in ("os", "ram_total", "ram_free", "comfyui_version", "python_version", "pytorch_version",
                "embedded_python", "argv"):
        assert key in system, key
    assert system["ram_total"] > 0
    device = stats["devices"][0]
    assert device["type"] == "cpu" and device["name"] == "cpu"
    assert set(device) == {"name", "type", "index", "vram_total", "vram_free", "torch_vram_total", "torch_vram_free"}
    features = await (await client.get("/api/features")).json()
    assert features["max_upload_size"] == 100 * 1024 * 1024


STANDARD_KINDS = {
    "comfyserve_queue_pending": "gauge", "comfyserve_queue_running": "gauge", "comfyserve_history_items": "gauge",
    "comfyserve_ready": "gauge", "comfyserve_prompts_completed": "counter", "comfyserve_prompts_failed": "counter",
    "comfyserve_prompts_interrupted": "counter", "comfyserve_prompts_rejected": "counter",
    "comfyserve_execution_seconds": "histogram", "comfyserve_queue_wait_seconds": "histogram",
}


async def scrape(client) -> dict:
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
    return parse(await resp.text())


async def test_healthz_and_metrics_text(instance) -> None:
    client = await instance()
    assert await (await client.get("/healthz")).json() == {"status": "ok"}
    families = await scrape(client)
    assert kinds(families) == STANDARD_KINDS
    for sample in ("comfyserve_queue_pending", "comfyserve_queue_running", "comfyserve_prompts_completed_total",
                   "comfyserve_prompts_failed_total", "comfyserve_execution_seconds_count"):
        assert value(families, sample) == 0, sample
    assert value(families, "comfyserve_execution_seconds_bucket", le="+Inf") == 0
    assert value(families, "comfyserve_ready") == 1


async def test_metrics_move_as_prompts_queue_run_and_are_refused(instance, data_dir: Path) -> None:
    install_gate_plugin(data_dir)
    client = await instance()
    other = await instance()  # a second app in this process keeps its own counts
    ws = await client.ws_connect("/ws?clientId=m")
    await next_json(ws)
    gated = await (await client.post("/prompt", json={"prompt": gated_graph("g-m", "m"), "client_id": "m"})).json()
    await events_until(ws, lambda e: e["type"] == "executing" and e["data"].get("node") == "2")
    queued = await (await client.post("/prompt", json={"prompt": tiny_graph("m2"), "client_id": "m"})).json()
    during = await scrape(client)  # the queue gauges are read at scrape time
    assert value(during, "comfyserve_queue_running") == 1 and value(during, "comfyserve_queue_pending") == 1
    assert value(during, "comfyserve_prompts_completed_total") == 0
    open_gate(data_dir, "g-m")
    await events_until(ws, is_done(gated["prompt_id"]))
    await events_until(ws, is_done(queued["prompt_id"]))
    bad = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
    assert (await client.post("/prompt", json={"prompt": bad})).status == 400
    after = await scrape(client)
    assert value(after, "comfyserve_prompts_completed_total") == 2
    assert value(after, "comfyserve_prompts_rejected_total") == 1
    assert value(after, "comfyserve_history_items") == 2
    assert value(after, "comfyserve_queue_running") == 0 and value(after, "comfyserve_queue_pending") == 0
    assert value(after, "comfyserve_execution_seconds_count") == 2
    assert value(after, "comfyserve_execution_seconds_bucket", le="+Inf") == 2
    assert value(after, "comfyserve_execution_seconds_sum") > 0
    assert value(after, "comfyserve_queue_wait_seconds_count") == 2
    assert value(after, "comfyserve_queue_wait_seconds_sum") > 0  # the second prompt waited behind the gate
    untouched = await scrape(other)
    assert value(untouched, "comfyserve_prompts_completed_total") == 0
    assert value(untouched, "comfyserve_prompts_rejected_total") == 0
    await ws.close()


async def test_unknown_method_gets_json_405(instance) -> None:
    client = await instance()
    resp = await client.delete("/prompt")
    assert resp.status == 405
    assert (await resp.json())["error"]["type"] == "method_not_allowed"


async def test_object_info_shapes(instance) -> None:
    client = await instance()
    info = await (await client.get("/object_info")).json()
    for name in ("EmptyImage", "LoadImage", "SaveImage", "PreviewImage", "ImageScale", "ImageInvert"):
        assert name in info, name
    save = info["SaveImage"]
    assert save["output_node"] is True and save["name"] == "SaveImage"
    for key in ("input", "input_order", "output", "output_is_list", "output_name", "display_name",
                "description", "category", "python_module"):
        assert key in save, key
    single = await (await client.get("/api/object_info/EmptyImage")).json()
    assert list(single) == ["EmptyImage"] and single["EmptyImage"] == info["EmptyImage"]
    assert await (await client.get("/object_info/KSampler")).json() == {}


async def test_readyz_reports_plugin_errors_and_the_server_keeps_working(instance, data_dir: Path) -> None:
    (data_dir / "custom_nodes" / "broken_plugin.py").write_text("raise RuntimeError('boom at import')\n")
    client = await instance()
    resp = await client.get("/readyz")
    assert resp.status == 200
    detail = await resp.json()
    assert detail["ready"] is True and detail["nodes"] > 0
    assert "broken_plugin" in detail["plugin_errors"]
    assert "boom at import" in detail["plugin_errors"]["broken_plugin"]
    ws = await client.ws_connect("/ws?clientId=r")
    await next_json(ws)
    body = await (await client.post("/prompt", json={"prompt": tiny_graph("ok"), "client_id": "r"})).json()
    await events_until(ws, is_done(body["prompt_id"]))
    metrics = await scrape(client)
    assert value(metrics, "comfyserve_prompts_completed_total") == 1
    assert value(metrics, "comfyserve_execution_seconds_count") == 1
    await ws.close()


async def test_restart_reimports_plugins_and_is_refused_while_running(instance, data_dir: Path) -> None:
    client = await instance()
    assert "TestGate" not in await (await client.get("/object_info")).json()
    install_gate_plugin(data_dir)
    resp = await client.post("/restart")
    assert resp.status == 200
    body = await resp.json()
    assert body["restarted"] is True and body["ready"] is True
    assert "TestGate" in await (await client.get("/object_info")).json()

    ws = await client.ws_connect("/ws?clientId=rs")
    await next_json(ws)
    run = await (await client.post("/prompt", json={"prompt": gated_graph("g-rs", "rs"), "client_id": "rs"})).json()
    await events_until(ws, lambda e: e["type"] == "executing" and e["data"].get("node") == "2")
    refused = await client.post("/api/restart")
    assert refused.status == 409
    assert (await refused.json())["error"]["type"] == "prompt_running"
    open_gate(data_dir, "g-rs")
    await events_until(ws, is_done(run["prompt_id"]))
    assert (await client.post("/restart")).status == 200
    await ws.close()


async def test_view_metadata_of_a_safetensors_model(instance, data_dir: Path) -> None:
    import json
    import struct

    header = json.dumps({"__metadata__": {"ss_network_dim": "16"}, "w": {"dtype": "F32", "shape": [1],
                                                                        "data_offsets": [0, 4]}}).encode()
    lora = data_dir / "models" / "loras" / "tiny.safetensors"
    lora.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    client = await instance()
    resp = await client.get("/view_metadata/loras", params={"filename": "tiny.safetensors"})
    assert resp.status == 200 and await resp.json() == {"ss_network_dim": "16"}
    assert (await client.get("/view_metadata/loras", params={"filename": "none.safetensors"})).status == 404
    assert (await client.get("/view_metadata/loras", params={"filename": "tiny.ckpt"})).status == 404
    assert (await client.get("/view_metadata/nope", params={"filename": "tiny.safetensors"})).status == 404
    traversal = await client.get("/view_metadata/loras", params={"filename": "../loras/../../x.safetensors"})
    assert traversal.status == 403


async def test_post_routes_validate_their_json(instance) -> None:
    client = await instance()
    headers = {"Content-Type": "application/json"}
    for path in ("/queue", "/history", "/interrupt", "/free", "/api/queue"):
        resp = await client.post(path, data=b"{broken", headers=headers)
        assert resp.status == 400, path
        assert (await resp.json())["error"]["type"] == "invalid_request", path
    assert (await client.post("/queue", json={"delete": "abc"})).status == 400
    assert (await client.post("/queue", json=["clear"])).status == 400
    assert (await client.post("/interrupt", json={"prompt_id": 5})).status == 400
    # an empty body is fine where ComfyUI's frontend sends none
    assert (await client.post("/interrupt")).status == 200
    assert (await client.post("/free")).status == 200
