"""The API edition on an oss:// data dir: spawned instances get the bucket, results carry signed URLs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from oss_server.fixtures import BUCKET, KEY_ID, SECRET, storage_settings

from api_edition.command import settings_from_args
from standard.cli import build_parser
from standard.server.app import create_embedded_app
from standard.settings import StandardSettings
from support.api import TOKEN, read_results
from support.server import tiny_graph


def test_api_flags_pass_the_bucket_to_local_instances(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OSS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", SECRET)
    args = build_parser().parse_args([
        "api", "--data-dir", f"oss://{BUCKET}/data", "--oss-endpoint", "http://127.0.0.1:9",
        "--cache-dir", str(tmp_path / "cache"), "--instances", "2", "--token", TOKEN])
    settings = settings_from_args(args)
    assert settings.data_dir == tmp_path / "cache" / "data"  # the local mirror holds the queue
    assert settings.sqlite_path == tmp_path / "cache" / "data" / "queue" / "queue.sqlite3"
    flags = list(settings.instance_args)
    assert flags[flags.index("--data-dir") + 1].rstrip("/") == f"oss://{BUCKET}/data"
    assert flags[flags.index("--oss-endpoint") + 1] == "http://127.0.0.1:9"
    assert SECRET not in " ".join(flags)  # credentials travel in the environment only


async def test_results_carry_signed_urls_of_uploaded_outputs(api, oss, aiohttp_server: Any,
                                                            tmp_path: Path) -> None:
    storage = storage_settings(oss, tmp_path)
    instance = await aiohttp_server(create_embedded_app(
        StandardSettings(data_dir=storage.local_root, token=TOKEN, storage=storage)))
    live = await api(instance_urls=(f"http://127.0.0.1:{instance.port}",), instance_token=TOKEN)
    resp = await live.submit(tiny_graph("bucketed"), task_id="oss_1")
    assert resp.status_code == 200, resp.text
    async with live.sink() as sink:
        frame, = await read_results(sink, 1)
    assert frame.tags["task_id"] == "oss_1"
    result = json.loads(frame.data)
    outputs = result[-1]
    image = next(iter(outputs.values()))["images"][0]
    assert image["filename"] == "bucketed_00001_.png" and image["url"].startswith(oss.endpoint)
    async with httpx.AsyncClient(trust_env=False) as http:
        fetched = await http.get(image["url"])
    assert fetched.status_code == 200 and fetched.content[:4] == b"\x89PNG"
    assert oss.server.get(BUCKET, "data/output/bucketed_00001_.png") == fetched.content
