"""Real ComfyUI (``--comfyui-dir``, the shim stands in) on an oss:// data dir: the front fetches a prompt's
inputs from the bucket before ComfyUI validates it, and drops the copies once ComfyUI is done with it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from oss_server.fixtures import BUCKET, random_bytes, storage_settings
from test_api_oss_inputs import gated_load_graph, input_keys, png, post

from api_edition.results import PROMPT_ID_TAG
from api_edition.settings import WorkerSettings
from api_edition.worker import Worker
from standard.backend.app import create_backend_app
from standard.backend.supervisor import ComfyUIChild
from standard.datadir import init_data_dir
from standard.settings import StandardSettings
from support.api import SERVICE, TOKEN, ApiFactory, read_results
from support.backend import FastFront
from support.processes import SHIM_DIR
from support.server import install_gate_plugin, open_gate
from support.wait import until

READ_MODEL_PLUGIN = Path(__file__).parent / "oss_server" / "plugins" / "read_model.py"


async def comfyui_front(storage: Any, state_file: Path | None) -> FastFront:
    """``comfyserve standard --data-dir oss://... --comfyui-dir`` with the shim: ComfyUI reads only the local
    mirror (the shim is an instance on that plain folder, without the bucket)."""
    data_dir = init_data_dir(storage.local_root)
    install_gate_plugin(data_dir.root)
    child = ComfyUIChild(SHIM_DIR, data_dir, poll_s=0.05, backoff_min_s=0.1, stop_timeout_s=5.0)
    app = create_backend_app(StandardSettings(data_dir=data_dir.root, token=TOKEN, storage=storage,
                                              comfyui_dir=SHIM_DIR, state_file=state_file), backend=child)
    front = FastFront(app, None)
    await front.start_server()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{front.port}", trust_env=False) as http:
        async def ready() -> bool:
            return (await http.get("/readyz", headers={"Authorization": f"Bearer {TOKEN}"})).status_code == 200

        await until(ready, timeout_s=60, what="the shim ComfyUI is up")
    return front


@pytest.mark.parametrize("journal", [False, True], ids=["no-state-file", "state-file"])
async def test_a_task_input_reaches_real_comfyui_through_the_bucket_and_its_copy_goes_after_the_run(
        api: ApiFactory, oss, tmp_path: Path, journal: bool) -> None:
    front_side = storage_settings(oss, tmp_path / "front")
    worker_side = storage_settings(oss, tmp_path / "worker")
    # The instance lists the bucket's input/ once an hour: the task's file is not known to it when the task comes.
    instance_side = storage_settings(oss, tmp_path / "instance", input_list_ttl_s=3600.0)
    instance = await comfyui_front(instance_side, tmp_path / "state.sqlite3" if journal else None)
    try:
        live = await api(data_dir=front_side.local_root, storage=front_side, max_payload_bytes=1 << 20)
        image = png(5, 7)
        body = {"prompt": gated_load_graph("face.png", "gate-1"),
                "inputs": [{"name": "face.png", "data": base64.b64encode(image).decode()}]}
        assert (await post(live.url, body, "real_comfyui")).status_code == 200
        [key] = input_keys(oss)
        worker = Worker(WorkerSettings(queue_url=live.url, service=SERVICE, token=TOKEN,
                                       instance_url=f"http://127.0.0.1:{instance.port}",
                                       data_dir=worker_side.local_root, storage=worker_side))
        running = asyncio.create_task(worker.run())
        try:
            local_copy = instance_side.local_root / "input" / key.removeprefix("data/input/")
            await until(local_copy.is_file, what="the front fetched the task's input before ComfyUI saw it")
            assert local_copy.read_bytes() == image
            assert ("HEAD", BUCKET, key) in oss.server.requests  # one look-up, not a new listing
            open_gate(instance_side.local_root, "gate-1")
            async with live.sink() as sink:
                [frame] = await read_results(sink, 1)
            assert frame.tags["status"] == "success", frame.data
            events = json.loads(frame.data)
            [saved] = events[-1]["3"]["images"]
            written = instance_side.local_root / "output" / saved["filename"]
            assert written.is_file()
            # The front uploaded what ComfyUI wrote, under the embedded engine's key, and the result's url
            # (signed, as the embedded engine's) fetches it without the instance.
            assert oss.server.get(BUCKET, f"data/output/{saved['filename']}") == written.read_bytes()
            assert saved["url"].startswith(f"{oss.endpoint}/{BUCKET}/data/output/{saved['filename']}?")
            async with httpx.AsyncClient(trust_env=False) as anyone:
                fetched = await anyone.get(saved["url"])
            assert fetched.status_code == 200 and fetched.content == written.read_bytes()
            [executed] = [item for event in events[:-1] for item in event["data"]["output"].get("images", [])]
            assert executed["url"] == saved["url"]  # the executed event's item: the same signed url
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{instance.port}", trust_env=False,
                                         headers={"Authorization": f"Bearer {TOKEN}"}) as http:
                prompt_id = frame.tags[PROMPT_ID_TAG]
                history = (await http.get(f"/history/{prompt_id}")).json()[prompt_id]
            [listed] = history["outputs"]["3"]["images"]  # the instance's history: the same object, signed
            assert listed["url"].partition("?")[0] == saved["url"].partition("?")[0]
            await until(lambda: not local_copy.exists() and not local_copy.parent.exists(),
                        what="the front dropped its copy once ComfyUI was done with the prompt")
            assert (instance_side.local_root / "input" / "gate-1").is_file()  # its own files stay
            await until(lambda: input_keys(oss) == [], what="the task's objects deleted after the result")
        finally:
            await worker.shutdown(running, 1.0)
    finally:
        await instance.close()


async def test_names_the_bucket_lacks_or_that_leave_input_reach_comfyui_as_they_are(oss, tmp_path: Path) -> None:
    instance_side = storage_settings(oss, tmp_path / "instance", input_list_ttl_s=3600.0)
    instance = await comfyui_front(instance_side, None)
    oss.server.put(BUCKET, "data/secret.png", png(1, 1))  # outside input/: a name must never reach it
    oss.server.put(BUCKET, "data/input/shared/kept.png", png(2, 3))  # put since the last listing
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{instance.port}", trust_env=False,
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            missing = "api/" + "f" * 32 + "/no.png"
            for name in ("../secret.png", "api/0123/../../../secret.png", "/etc/passwd.png", missing):
                resp = await http.post("/prompt", json={"prompt": gated_load_graph(name, "g")})
                assert resp.status_code == 400, (name, resp.text)  # ComfyUI's own validation answer
            looked_up = [key for method, _, key in oss.server.requests if method == "HEAD"]
            assert looked_up == [f"data/input/{missing}"]  # only the name inside input/, once
            assert not (instance_side.local_root / "secret.png").exists()

            resp = await http.post("/api/prompt", json={"prompt": gated_load_graph("shared/kept.png", "g2")})
            assert resp.status_code == 200, resp.text
            prompt_id = resp.json()["prompt_id"]
            kept = instance_side.local_root / "input" / "shared" / "kept.png"
            assert kept.read_bytes() == png(2, 3)  # there before ComfyUI validated the prompt
            open_gate(instance_side.local_root, "g2")

            async def finished() -> bool:
                return prompt_id in (await http.get(f"/history/{prompt_id}")).json()

            await until(finished, what="the prompt ran")
            await until(lambda: not kept.exists(), what="a looked-up copy goes after its prompt")

            oss.server.put(BUCKET, "data/input/shared/refused.png", png(2, 2))
            graph = {**gated_load_graph("shared/refused.png", "g3"), "9": {"class_type": "NoSuchNode", "inputs": {}}}
            resp = await http.post("/prompt", json={"prompt": graph})
            assert resp.status_code == 400, resp.text  # ComfyUI refused it: its fetched copy is gone already
            assert not (instance_side.local_root / "input" / "shared" / "refused.png").exists()
            assert ("HEAD", BUCKET, "data/input/shared/refused.png") in oss.server.requests
    finally:
        await instance.close()


async def test_custom_nodes_come_from_the_bucket_and_named_models_and_inputs_are_fetched_before_comfyui_validates(
        oss, tmp_path: Path) -> None:
    """What the embedded engine does with the bucket's ``custom_nodes/`` and ``models/``, for real ComfyUI: the
    plugins synced before it starts, a model and a listed input the prompt names downloaded before it validates
    the prompt."""
    model = random_bytes(300 * 1024 + 5, 3)
    oss.server.put(BUCKET, "data/custom_nodes/read_model.py", READ_MODEL_PLUGIN.read_bytes())
    oss.server.put(BUCKET, "data/models/checkpoints/sd15.safetensors", model)
    oss.server.put(BUCKET, "data/input/listed.png", png(4, 4))  # in the listing made at start
    instance_side = storage_settings(oss, tmp_path / "instance")
    instance = await comfyui_front(instance_side, tmp_path / "state.sqlite3")
    try:
        local_model = instance_side.local_root / "models" / "checkpoints" / "sd15.safetensors"
        assert not local_model.exists()  # listed at start, not fetched
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{instance.port}", trust_env=False,
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            assert "ReadModel" in (await http.get("/object_info")).json()  # the bucket's plugin, loaded by ComfyUI
            graph = {"1": {"class_type": "ReadModel", "inputs": {"ckpt_name": "sd15.safetensors"}},
                     "2": {"class_type": "LoadImage", "inputs": {"image": "listed.png"}},
                     "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "listed"}}}
            resp = await http.post("/prompt", json={"prompt": graph})
            assert resp.status_code == 200, resp.text  # the model was on disk when ComfyUI validated the name
            prompt_id = resp.json()["prompt_id"]

            async def finished() -> bool:
                return prompt_id in (await http.get(f"/history/{prompt_id}")).json()

            await until(finished, what="the prompt ran")
            entry = (await http.get(f"/history/{prompt_id}")).json()[prompt_id]
            assert entry["outputs"]["1"]["text"] == [hashlib.sha256(model).hexdigest()]
            assert local_model.read_bytes() == model
            [saved] = entry["outputs"]["3"]["images"]
            assert oss.server.get(BUCKET, f"data/output/{saved['filename']}") is not None and saved["url"]
        assert (instance_side.local_root / "input" / "listed.png").read_bytes() == png(4, 4)  # a listed one stays
    finally:
        await instance.close()


async def test_bucket_files_not_on_comfyuis_disk_are_listed_and_viewed(oss, tmp_path: Path) -> None:
    """As with the embedded engine: the bucket's input images are in LoadImage's list; ``/view`` of a bucket
    input fetches and serves it, of a bucket output (written on another machine, or before this one was
    replaced) redirects to its signed url."""
    oss.server.put(BUCKET, "data/input/sub/in.png", png(3, 4))
    oss.server.put(BUCKET, "data/output/old_00001_.png", png(6, 2))
    instance_side = storage_settings(oss, tmp_path / "instance")
    instance = await comfyui_front(instance_side, None)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{instance.port}", trust_env=False,
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            for path in ("/object_info", "/api/object_info/LoadImage"):  # the bucket's image, listed to pick
                [names, options] = (await http.get(path)).json()["LoadImage"]["input"]["required"]["image"]
                assert "sub/in.png" in names and options["image_upload"] is True
            assert not (instance_side.local_root / "input" / "sub" / "in.png").exists()  # listed, not fetched
            resp = await http.get("/view", params={"filename": "in.png", "subfolder": "sub", "type": "input"})
            assert resp.status_code == 200 and resp.content == png(3, 4)  # ComfyUI served the fetched copy
            resp = await http.get("/api/view", params={"filename": "old_00001_.png", "type": "output"})
            assert resp.status_code == 302
            assert resp.headers["Location"].startswith(f"{oss.endpoint}/{BUCKET}/data/output/old_00001_.png?")
            async with httpx.AsyncClient(trust_env=False) as anyone:
                assert (await anyone.get(resp.headers["Location"])).content == png(6, 2)
            resp = await http.get("/view", params={"filename": "nowhere.png", "type": "output"})
            assert resp.status_code == 404  # neither has it: ComfyUI's answer
            resp = await http.get("/view", params={"filename": "../state.sqlite3", "type": "output"})
            assert resp.status_code in (400, 403, 404)  # refused, never looked up
    finally:
        await instance.close()
    assert not any("state.sqlite3" in key for _, _, key in oss.server.requests)
