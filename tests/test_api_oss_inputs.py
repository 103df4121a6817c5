"""Task input files on an oss:// data dir: through the bucket to an instance on another machine, then gone."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from oss_server.fixtures import BUCKET, storage_settings
from PIL import Image

from api_edition.settings import WorkerSettings
from api_edition.worker import Worker
from standard.server.app import create_embedded_app
from standard.settings import StandardSettings
from support.api import SERVICE, TOKEN, ApiFactory, read_results
from support.server import GATE_NODE, open_gate
from support.wait import until

INPUTS = "data/input/api/"


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (20, 90, 200)).save(out, format="PNG")
    return out.getvalue()


def gated_load_graph(name: str, gate: str) -> dict[str, Any]:
    """LoadImage(name) -> TestGate(gate) -> SaveImage: the run holds until the instance's ``input/<gate>``."""
    return {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
            "2": {"class_type": "TestGate", "inputs": {"image": ["1", 0], "gate": gate}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "from_bucket"}}}


def input_keys(oss) -> list[str]:
    return sorted(key for key in oss.server.buckets[BUCKET] if key.startswith(INPUTS))


async def post(url: str, body: dict[str, Any], task_id: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, trust_env=False) as http:
        return await http.post("/api_prompt", params={"task_id": task_id}, json=body,
                               headers={"Authorization": TOKEN})


async def test_inline_inputs_reach_an_instance_elsewhere_through_the_bucket_and_go_after_the_commit(
        api: ApiFactory, oss, aiohttp_server: Any, tmp_path: Path) -> None:
    oss.server.put(BUCKET, "data/custom_nodes/test_gate.py", GATE_NODE.read_bytes())
    # Three machines, three local mirrors: the front's, the worker's, the instance's (which lists the
    # bucket's input/ once an hour: the task's files are not in its listing when the task arrives).
    front = storage_settings(oss, tmp_path / "front")
    worker_side = storage_settings(oss, tmp_path / "worker")
    instance_side = storage_settings(oss, tmp_path / "instance", input_list_ttl_s=3600.0)
    instance = await aiohttp_server(create_embedded_app(
        StandardSettings(data_dir=instance_side.local_root, token=TOKEN, storage=instance_side)))
    files = web.Application()
    files.router.add_get("/mask.png", lambda request: web.Response(body=png(3, 4), content_type="image/png"))
    origin = f"http://127.0.0.1:{(await aiohttp_server(files)).port}/"
    live = await api(data_dir=front.local_root, storage=front, max_payload_bytes=1 << 20, input_url_allow=(origin,))

    image = png(5, 7)
    graph = gated_load_graph("face.png", "gate-1")
    graph["4"] = {"class_type": "LoadImage", "inputs": {"image": "mask.png"}}
    graph["5"] = {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "fetched"}}
    body = {"prompt": graph, "inputs": [{"name": "face.png", "data": base64.b64encode(image).decode()},
                                        {"name": "mask.png", "url": origin + "mask.png"}]}
    resp = await post(live.url, body, "oss_inline")
    assert resp.status_code == 200, resp.text
    [key] = input_keys(oss)  # the inline file is in the bucket before any worker took the task
    assert key.startswith(INPUTS) and key.endswith("/face.png") and oss.server.get(BUCKET, key) == image
    mask_key = key.removesuffix("face.png") + "mask.png"
    assert not any((front.local_root / "input" / "api").iterdir())  # the front's copy was only staging

    worker = Worker(WorkerSettings(queue_url=live.url, service=SERVICE, instance_url=f"http://127.0.0.1:{instance.port}",
                                   token=TOKEN, data_dir=worker_side.local_root, storage=worker_side,
                                   input_url_allow=(origin,)))
    running = asyncio.create_task(worker.run())
    try:
        local_copy = instance_side.local_root / "input" / key.removeprefix("data/input/")
        await until(local_copy.is_file, what="the instance fetched the task's input from the bucket")
        assert input_keys(oss) == [key, mask_key]  # still there while the task runs; the URL one put by the worker
        open_gate(instance_side.local_root, "gate-1")
        async with live.sink() as sink:
            [frame] = await read_results(sink, 1)
        assert frame.tags["status"] == "success", frame.data
        outputs = json.loads(frame.data)[-1]
        for node, size in (("3", (5, 7)), ("5", (3, 4))):
            [saved] = outputs[node]["images"]
            with Image.open(io.BytesIO(oss.server.get(BUCKET, f"data/output/{saved['filename']}"))) as output:
                assert output.size == size
        await until(lambda: input_keys(oss) == [], what="the task's objects deleted after the result")
        # The instance's copies went after the run too (its input/ does not fill up with every task's files).
        assert not local_copy.exists() and not local_copy.parent.exists()
        assert (instance_side.local_root / "input" / "gate-1").is_file()  # its own files stay
        assert ("HEAD", BUCKET, key) in oss.server.requests  # found by one look-up, not a new listing
        fetched_to = worker_side.local_root / "input" / "api"
        await until(lambda: not any(fetched_to.iterdir()), what="the worker's local copy removed")
    finally:
        await worker.shutdown(running, 1.0)


async def test_hostile_names_are_refused_and_never_looked_up(api: ApiFactory, oss, aiohttp_server: Any,
                                                            tmp_path: Path) -> None:
    front = storage_settings(oss, tmp_path / "front")
    live = await api(data_dir=front.local_root, storage=front, max_payload_bytes=1 << 20)
    data = base64.b64encode(png(2, 2)).decode()
    for name in ("../face.png", "sub/face.png", ".hidden.png"):
        body = {"prompt": gated_load_graph(name, "g"), "inputs": [{"name": name, "data": data}]}
        resp = await post(live.url, body, "hostile")
        assert resp.status_code == 400 and resp.json()["error"]["type"] == "bad_input", resp.text
    assert input_keys(oss) == [] and not any(key.startswith("data/input") for key in oss.server.buckets[BUCKET])

    instance_side = storage_settings(oss, tmp_path / "instance", input_list_ttl_s=3600.0)
    instance = await aiohttp_server(create_embedded_app(
        StandardSettings(data_dir=instance_side.local_root, token=TOKEN, storage=instance_side)))
    oss.server.put(BUCKET, "data/secret.png", png(1, 1))  # outside input/: a name must never reach it
    oss.server.requests.clear()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{instance.port}", trust_env=False,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        for name in ("../secret.png", "api/0123/../../../secret.png", "/etc/passwd.png", "api/" + "f" * 32 + "/no.png"):
            graph = {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
                     "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}
            resp = await http.post("/prompt", json={"prompt": graph})
            assert resp.status_code == 400, (name, resp.text)
    looked_up = [key for method, _, key in oss.server.requests if method == "HEAD"]
    assert looked_up == ["data/input/api/" + "f" * 32 + "/no.png"]  # only the name inside input/, once


async def test_objects_of_a_task_never_run_go_after_the_retention(api: ApiFactory, oss, tmp_path: Path) -> None:
    front = storage_settings(oss, tmp_path / "front")
    live = await api(data_dir=front.local_root, storage=front, input_retention_s=0.2, max_payload_bytes=1 << 20)
    oss.server.put(BUCKET, "data/input/api/keep.png", b"not a task folder")
    body = {"prompt": gated_load_graph("a.png", "g"),
            "inputs": [{"name": "a.png", "data": base64.b64encode(png(1, 1)).decode()}]}
    assert (await post(live.url, body, "never_run")).status_code == 200
    await until(lambda: input_keys(oss) == ["data/input/api/keep.png"], what="the bucket retention sweep")


def test_front_and_worker_flags_for_an_oss_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from api_edition.command import settings_from_args
    from api_edition.worker_command import settings_from_args as worker_settings_from_args
    from standard.cli import build_parser

    monkeypatch.setenv("OSS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", "secret")
    monkeypatch.setenv("COMFYSERVE_OSS_ENDPOINT", "http://127.0.0.1:9")
    bucket = ["--data-dir", f"oss://{BUCKET}/data", "--cache-dir", str(tmp_path / "cache")]
    front = settings_from_args(build_parser().parse_args(["api", *bucket]))
    worker = worker_settings_from_args(build_parser().parse_args([
        "worker", "--queue-url", "http://q:9000", "--instance-url", "http://i:8000", *bucket]))
    for settings in (front, worker):
        assert settings.storage is not None and str(settings.storage.location).rstrip("/") == f"oss://{BUCKET}/data"
        assert settings.data_dir == tmp_path / "cache" / "data"  # the local mirror
        assert settings.storage.endpoint == "http://127.0.0.1:9"
    plain = worker_settings_from_args(build_parser().parse_args([
        "worker", "--queue-url", "http://q:9000", "--instance-url", "http://i:8000", "--data-dir", str(tmp_path)]))
    assert plain.storage is None and plain.data_dir == tmp_path.resolve()


def test_the_storage_client_deletes_like_oss(oss, tmp_path: Path) -> None:
    from standard.storage import StorageError
    from standard.storage.client import OssClient

    settings = storage_settings(oss, tmp_path)
    client = OssClient(settings, settings.location)
    oss.server.put(BUCKET, "data/input/api/x.png", b"x")
    client.delete("data/input/api/x.png")
    assert oss.server.get(BUCKET, "data/input/api/x.png") is None
    client.delete("data/input/api/x.png")  # DeleteObject of a missing key: no error
    oss.server.put(BUCKET, "data/input/api/y.png", b"y")
    oss.server.faults.fail("DELETE", "y.png", times=1000)
    with pytest.raises(StorageError):
        client.delete("data/input/api/y.png")
    assert oss.server.get(BUCKET, "data/input/api/y.png") == b"y"
