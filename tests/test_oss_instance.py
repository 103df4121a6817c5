"""An instance on ``--data-dir oss://BUCKET/PREFIX`` (the OSS test server, the real oss2 SDK):
plugins synced down, models listed from the bucket and fetched on first use, outputs uploaded
with signed URLs in history, uploads to PREFIX/input, /view falling back to a 302."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from oss_server.fixtures import BUCKET, KEY_ID, random_bytes, storage_settings

from standard.server import keys
from standard.server.app import create_embedded_app
from standard.settings import StandardSettings
from support.server import png_bytes, tiny_graph, wait_history

PLUGIN = Path(__file__).parent / "oss_server" / "plugins" / "read_model.py"
MB = 1024 * 1024


@pytest.fixture
def oss_instance(aiohttp_client: Any, oss, tmp_path: Path):
    async def factory(**overrides: Any):
        storage = storage_settings(oss, tmp_path, **overrides)
        settings = StandardSettings(data_dir=storage.local_root if storage.location else tmp_path / "mnt",
                                    storage=storage)
        return await aiohttp_client(create_embedded_app(settings))

    return factory


def seed_bucket(oss) -> bytes:
    model = random_bytes(2 * MB + 17, 7)
    oss.server.put(BUCKET, "data/custom_nodes/read_model.py", PLUGIN.read_bytes())
    oss.server.put(BUCKET, "data/models/checkpoints/sd15.safetensors", model)
    oss.server.put(BUCKET, "data/models/checkpoints/notes.txt", b"not a model")
    return model


async def test_plugin_reads_a_bucket_model_fetched_on_first_use(oss_instance, oss) -> None:
    model = seed_bucket(oss)
    client = await oss_instance()
    assert await (await client.get("/models/checkpoints")).json() == ["sd15.safetensors"]
    info = await (await client.get("/object_info/ReadModel")).json()
    assert info["ReadModel"]["input"]["required"]["ckpt_name"] == [["sd15.safetensors"]]
    key = "data/models/checkpoints/sd15.safetensors"
    assert not any(k == key for m, _b, k in oss.server.requests if m == "GET")  # listed only

    graph = {"1": {"class_type": "ReadModel", "inputs": {"ckpt_name": "sd15.safetensors"}}}
    resp = await client.post("/prompt", json={"prompt": graph})
    entry = await wait_history(client, (await resp.json())["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["1"]["text"] == [hashlib.sha256(model).hexdigest()]
    gets = sum(1 for m, _b, k in oss.server.requests if m == "GET" and k == key)
    assert gets == 9  # 256 KiB ranges

    resp = await client.post("/prompt", json={"prompt": graph})  # warm cache (and engine cache)
    await wait_history(client, (await resp.json())["prompt_id"])
    assert sum(1 for m, _b, k in oss.server.requests if m == "GET" and k == key) == gets


async def test_download_failure_is_an_execution_error_not_a_broken_model(oss_instance, oss) -> None:
    seed_bucket(oss)
    client = await oss_instance()
    oss.server.faults.fail("GET", "sd15", times=1000)
    graph = {"1": {"class_type": "ReadModel", "inputs": {"ckpt_name": "sd15.safetensors"}}}
    resp = await client.post("/prompt", json={"prompt": graph})
    entry = await wait_history(client, (await resp.json())["prompt_id"], timeout_s=40)
    assert entry["status"]["status_str"] == "error"
    error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert "sd15.safetensors" in error["exception_message"] and "500" in error["exception_message"]
    oss.server.faults.clear()
    resp = await client.post("/prompt", json={"prompt": graph})
    entry = await wait_history(client, (await resp.json())["prompt_id"])
    assert entry["status"]["status_str"] == "success"


async def test_outputs_go_to_the_bucket_with_signed_urls(oss_instance, oss) -> None:
    from support.server import events_until

    client = await oss_instance()
    ws = await client.ws_connect("/ws?clientId=c2")
    resp = await client.post("/prompt", json={"prompt": tiny_graph(prefix="run/pic"), "client_id": "c2"})
    prompt_id = (await resp.json())["prompt_id"]
    executed = (await events_until(ws, lambda e: e["type"] == "executed"))[-1]
    await ws.close()
    entry = await wait_history(client, prompt_id)
    image = entry["outputs"]["2"]["images"][0]
    assert image["subfolder"] == "run" and image["type"] == "output"
    # The executed event (what API-edition results are built from) carries the URL too.
    assert executed["data"]["output"]["images"][0]["url"].startswith(f"{oss.endpoint}/{BUCKET}/data/output/run/")
    key = f"data/output/run/{image['filename']}"
    stored = oss.server.get(BUCKET, key)
    assert stored is not None and stored.startswith(b"\x89PNG")
    assert [r for r in oss.server.requests if r[0] == "PUT"] == [("PUT", BUCKET, key)]  # uploaded once
    async with aiohttp.ClientSession() as session, session.get(image["url"]) as got:
        assert got.status == 200 and await got.read() == stored
    # /history/{id} shows the same URL; /view still serves the local file.
    again = (await (await client.get(f"/history/{prompt_id}")).json())[prompt_id]
    assert again["outputs"]["2"]["images"][0]["url"] == image["url"]
    view = await client.get("/view", params={"filename": image["filename"], "subfolder": "run"})
    assert view.status == 200 and await view.read() == stored


async def test_a_save_never_reuses_a_name_already_uploaded(oss_instance, oss, tmp_path: Path) -> None:
    """The local copy of an output may go (disk trimmed); its name is not handed out again to overwrite the key."""
    client = await oss_instance()
    names = []
    for color in (1, 2):
        resp = await client.post("/prompt", json={"prompt": tiny_graph(prefix="keep/pic", color=color)})
        entry = await wait_history(client, (await resp.json())["prompt_id"])
        image = entry["outputs"]["2"]["images"][0]
        names.append(image["filename"])
        local = storage_settings(oss, tmp_path).local_root / "output" / "keep" / image["filename"]
        local.unlink()
    assert names == ["pic_00001_.png", "pic_00002_.png"]
    first, second = (oss.server.get(BUCKET, f"data/output/keep/{name}") for name in names)
    assert first is not None and second is not None and first != second


async def test_view_redirects_to_the_bucket_when_not_on_local_disk(oss_instance, oss) -> None:
    oss.server.put(BUCKET, "data/output/old/elsewhere.png", png_bytes())
    client = await oss_instance()
    resp = await client.get("/view", params={"filename": "elsewhere.png", "subfolder": "old"},
                            allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"].startswith(f"{oss.endpoint}/{BUCKET}/data/output/old/elsewhere.png?")
    async with aiohttp.ClientSession() as session, session.get(resp.headers["Location"]) as got:
        assert await got.read() == png_bytes()
    missing = await client.get("/view", params={"filename": "nope.png"}, allow_redirects=False)
    assert missing.status == 404


async def test_uploads_go_to_the_bucket_input(oss_instance, oss) -> None:
    client = await oss_instance()
    form = aiohttp.FormData()
    form.add_field("image", png_bytes(), filename="in.png", content_type="image/png")
    form.add_field("subfolder", "s")
    resp = await client.post("/upload/image", data=form)
    assert await resp.json() == {"name": "in.png", "subfolder": "s", "type": "input"}
    assert oss.server.get(BUCKET, "data/input/s/in.png") == png_bytes()


async def test_restart_resyncs_plugins_and_models(oss_instance, oss) -> None:
    client = await oss_instance()
    assert await (await client.get("/object_info/ReadModel")).json() == {}
    seed_bucket(oss)
    assert (await client.post("/restart")).status == 200
    assert "ReadModel" in await (await client.get("/object_info/ReadModel")).json()
    assert await (await client.get("/models/checkpoints")).json() == ["sd15.safetensors"]


async def test_mounted_data_dir_with_oss_bucket_gets_urls_without_uploading(oss_instance, oss) -> None:
    client = await oss_instance(mounted=True)
    resp = await client.post("/prompt", json={"prompt": tiny_graph(prefix="m")})
    entry = await wait_history(client, (await resp.json())["prompt_id"])
    image = entry["outputs"]["2"]["images"][0]
    assert f"/{BUCKET}/data/output/{image['filename']}?" in image["url"]
    assert not any(m == "PUT" for m, _b, _k in oss.server.requests)


def test_cli_wrong_secret_fails_start_clearly(oss, tmp_path: Path) -> None:
    env = {**os.environ, "OSS_ACCESS_KEY_ID": KEY_ID, "OSS_ACCESS_KEY_SECRET": "wrong"}
    proc = subprocess.run(
        [sys.executable, "-m", "standard", "--data-dir", f"oss://{BUCKET}/data", "--oss-endpoint", oss.endpoint,
         "--cache-dir", str(tmp_path / "cache"), "--port", "1"],
        env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "SignatureDoesNotMatch" in proc.stderr and "OSS_ACCESS_KEY_SECRET" in proc.stderr


def test_cli_needs_an_endpoint_and_credentials(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OSS_", "COMFYSERVE_"))}
    proc = subprocess.run([sys.executable, "-m", "standard", "--data-dir", "oss://bkt/p"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--oss-endpoint" in proc.stderr
    env["COMFYSERVE_OSS_ENDPOINT"] = "http://127.0.0.1:9"
    proc = subprocess.run([sys.executable, "-m", "standard", "--data-dir", "oss://bkt/p"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "OSS_ACCESS_KEY_ID" in proc.stderr


def test_storage_flags_and_their_environment_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from standard.command import add_arguments, settings_from_args
    from standard.storage import OssLocation

    monkeypatch.setenv("OSS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", "secret")
    monkeypatch.setenv("OSS_SECURITY_TOKEN", "sts")
    monkeypatch.setenv("COMFYSERVE_CACHE_MAX_GB", "2.5")
    monkeypatch.setenv("COMFYSERVE_PREFETCH_MODELS", "1")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--data-dir", "oss://bkt-1/team/comfy", "--oss-endpoint", "http://127.0.0.1:9",
                              "--cache-dir", str(tmp_path / "c"), "--url-expires", "600"])
    settings = settings_from_args(args)
    storage = settings.storage
    assert storage.location == OssLocation("bkt-1", "team/comfy/")
    assert settings.data_dir == tmp_path / "c" / "data"  # the local mirror
    assert (storage.cache_max_gb, storage.prefetch_models, storage.url_expires_s) == (2.5, True, 600)
    assert storage.security_token == "sts" and "secret" not in repr(storage)

    mounted = settings_from_args(parser.parse_args(
        ["--data-dir", str(tmp_path / "mnt"), "--oss-bucket", "oss://bkt-1/comfy", "--oss-endpoint", "http://e"]))
    assert mounted.data_dir == tmp_path / "mnt" and mounted.storage.location is None
    assert mounted.storage.mounted_location == OssLocation("bkt-1", "comfy/")
    plain = settings_from_args(parser.parse_args(["--data-dir", str(tmp_path / "d")]))
    assert plain.storage is None

    # An edition spawning local instances hands the same storage on.
    from standard.storage.settings import instance_flags

    again = settings_from_args(parser.parse_args(instance_flags(storage)))
    assert again.storage == storage and again.data_dir == settings.data_dir


async def test_interrupt_stops_a_model_download_and_the_next_run_resumes(oss_instance, oss) -> None:
    import json

    from support.server import events_until

    model = seed_bucket(oss)
    client = await oss_instance(download_workers=1)
    oss.server.faults.slow("sd15", delay_s=0.3)  # 0.3 s per 256 KiB part: time to interrupt
    ws = await client.ws_connect("/ws?clientId=c1")
    graph = {"1": {"class_type": "ReadModel", "inputs": {"ckpt_name": "sd15.safetensors"}}}
    resp = await client.post("/prompt", json={"prompt": graph, "client_id": "c1"})
    prompt_id = (await resp.json())["prompt_id"]
    seen = await events_until(ws, lambda e: e["type"] == "progress" and e["data"]["value"] >= 10)
    assert seen[-1]["data"]["node"] == "1" and seen[-1]["data"]["max"] == 100
    assert (await client.post("/interrupt", json={"prompt_id": prompt_id})).status == 200
    entry = await wait_history(client, prompt_id)
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"]), json.dumps(entry["status"])
    model_file = client.app[keys.SETTINGS].data_dir / "models" / "checkpoints" / "sd15.safetensors"
    assert not model_file.exists()  # never a half-written model under its name
    assert model_file.with_name("sd15.safetensors.part.json").exists()  # kept for the resume
    parts_before = sum(1 for m, _b, k in oss.server.requests if m == "GET" and k.endswith("sd15.safetensors"))

    oss.server.faults.clear()
    resp = await client.post("/prompt", json={"prompt": graph, "client_id": "c1"})
    entry = await wait_history(client, (await resp.json())["prompt_id"])
    assert entry["outputs"]["1"]["text"] == [hashlib.sha256(model).hexdigest()]
    parts_after = sum(1 for m, _b, k in oss.server.requests if m == "GET" and k.endswith("sd15.safetensors"))
    assert parts_after - parts_before < 9  # resumed, not started over
    await ws.close()
