"""``api_edition.client.ApiClient`` end to end: submit (workflow, params, inputs), events, result, status, cancel."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from api_edition.client import ApiClient, ApiClientError
from support.api import SERVICE, TOKEN, ApiFactory
from support.server import tiny_graph


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (1, 2, 3)).save(out, format="PNG")
    return out.getvalue()


async def test_a_workflow_with_an_input_file_from_submit_to_result(api: ApiFactory, instance_url: Any,
                                                                   data_dir: Path, tmp_path: Path) -> None:
    folder = data_dir / "workflows"
    folder.mkdir()
    (folder / "copy.json").write_text(json.dumps({
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "copy"}}}))
    (folder / "copy.params.json").write_text(json.dumps({"image": {"path": "1.inputs.image", "type": "image"},
                                                          "prefix": "2.inputs.filename_prefix"}))
    source = tmp_path / "face.png"
    source.write_bytes(png(7, 3))
    live = await api(data_dir=data_dir, instance_urls=(await instance_url(),))
    async with ApiClient(live.url, TOKEN, service=SERVICE) as client:
        [listed] = await client.workflows()
        assert set(listed["params"]) == {"image", "prefix"}
        task = await client.submit(workflow="copy", params={"image": "face.png", "prefix": "viaclient"},
                                   inputs={"face.png": source}, task_id="client-1", return_base64=True)
        assert task.task_id == "client-1"
        kinds = [event.kind async for event in client.events(task)]
        assert kinds[0] in ("status", "result") and kinds[-1] == "result"
        assert (await client.status(task))["state"] == "succeeded"
        result = await client.result(task, timeout_s=30)
        assert result.ok and result.task_id == "client-1" and result.error is None
        [item] = result.files()
        assert item["filename"].startswith("viaclient_")
        with Image.open(io.BytesIO(await client.output(item))) as image:
            assert image.size == (7, 3)
        assert await client.output({"url": item["url"]}) == await client.output(item)
        assert await client.status(task) is None  # committed: gone from the sink


async def test_status_cancel_and_refusals_through_the_client(api: ApiFactory, data_dir: Path) -> None:
    live = await api(data_dir=data_dir)
    async with ApiClient(live.url, TOKEN, service=SERVICE) as client:
        first = await client.submit(tiny_graph(), task_id="first")
        second = await client.submit(tiny_graph(), task_id="second", tags={"user": "u1"})
        assert (await client.status("second"))["position"] == 1
        assert (await client.cancel(second))["state"] == "cancelled"
        result = await client.result("second", timeout_s=10)
        assert not result.ok and result.error["exception_type"] == "cancelled" and result.tags["user"] == "u1"
        assert (await client.status(first))["state"] == "queued"
        with pytest.raises(ApiClientError) as refused:
            await client.submit(workflow="nope")
        assert (refused.value.status, refused.value.kind) == (404, "unknown_workflow")
        with pytest.raises(ApiClientError) as refused:
            await client.submit(tiny_graph(), inputs={"../x.png": b"x"})
        assert refused.value.status == 400 and "not a path" in refused.value.message
        with pytest.raises(ValueError):
            await client.submit()
    async with ApiClient(live.url, "wrong-token-wrong", service=SERVICE) as intruder:
        with pytest.raises(ApiClientError) as refused:
            await intruder.status("first")
        assert refused.value.status == 401
