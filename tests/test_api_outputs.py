"""Outputs a client can use: a ``url`` on every file item (``GET /api_output``), bytes inline on request."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx

from support.api import TOKEN, ApiFactory, read_results
from support.server import tiny_graph

# A "video" node as plugins write them: the file under output/, reported under its own key.
VIDEO_PLUGIN = '''
import os
import folder_paths

class TestSaveVideo:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "name": ("STRING", {"default": "clip"})}}
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "testing"
    def save(self, images, name):
        folder = os.path.join(folder_paths.get_output_directory(), "clips")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name + ".mp4"), "wb") as handle:
            handle.write(b"not really a video " + name.encode())
        with open(os.path.join(folder, name + ".wav"), "wb") as handle:
            handle.write(b"RIFF audio")
        return {"ui": {"gifs": [{"filename": name + ".mp4", "subfolder": "clips", "type": "output",
                                 "format": "video/h264-mp4"}],
                       "audio": [{"filename": name + ".wav", "subfolder": "clips", "type": "output"}],
                       "text": ["not a file"]}}

NODE_CLASS_MAPPINGS = {"TestSaveVideo": TestSaveVideo}
'''


async def get(live, url: str, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": token} if token else {}
    async with httpx.AsyncClient(base_url=live.url, trust_env=False) as http:
        return await http.get(url, headers=headers)


async def one_result(live, graph: dict[str, Any], **params: str) -> tuple[list[Any], dict[str, Any]]:
    assert (await live.submit(graph, **params)).status_code == 200
    async with live.sink() as sink:
        [frame] = await read_results(sink, 1)
    assert frame.tags["status"] == "success", frame.data
    *executed, outputs = json.loads(frame.data)
    return executed, outputs


async def test_every_file_item_has_a_url_the_front_serves_with_the_token(api: ApiFactory, instance_url: Any,
                                                                         data_dir: Path) -> None:
    (data_dir / "custom_nodes" / "test_video.py").write_text(VIDEO_PLUGIN)
    live = await api(data_dir=data_dir, instance_urls=(await instance_url(),))
    graph = {**tiny_graph("still"),
             "3": {"class_type": "TestSaveVideo", "inputs": {"images": ["1", 0], "name": "clip"}}}
    executed, outputs = await one_result(live, graph, task_id="urls")
    [image] = outputs["2"]["images"]
    [video], [audio] = outputs["3"]["gifs"], outputs["3"]["audio"]
    assert outputs["3"]["text"] == ["not a file"]
    for item in (image, video, audio):
        resp = await get(live, item["url"])
        assert resp.status_code == 200, (item, resp.text)
        assert resp.content == (data_dir / "output" / item["subfolder"] / item["filename"]).read_bytes()
        assert "data" not in item
    assert video["url"] == "/api_output?filename=clip.mp4&subfolder=clips&type=output"
    assert {e["data"]["node"]: e["data"]["output"] for e in executed if e["data"]["output"]} == outputs
    assert (await get(live, image["url"], token=None)).status_code == 401
    for bad in ("/api_output?filename=../../queue-x.sqlite3", "/api_output?filename=a.png&subfolder=../input",
                "/api_output?filename=x&type=input", "/api_output?filename=/etc/passwd", "/api_output"):
        resp = await get(live, bad)
        assert resp.status_code == 400, (bad, resp.text)
    assert (await get(live, "/api_output?filename=missing.png")).status_code == 404


async def test_return_base64_puts_the_bytes_in_the_outputs_map_under_a_cap(api: ApiFactory, instance_url: Any,
                                                                           data_dir: Path) -> None:
    (data_dir / "custom_nodes" / "test_video.py").write_text(VIDEO_PLUGIN)
    url = await instance_url()
    live = await api(data_dir=data_dir, instance_urls=(url,))
    graph = {**tiny_graph("inline"),
             "3": {"class_type": "TestSaveVideo", "inputs": {"images": ["1", 0], "name": "clip"}}}
    executed, outputs = await one_result(live, graph, task_id="b64", **{"return": "base64"})
    items = [outputs["2"]["images"][0], outputs["3"]["gifs"][0], outputs["3"]["audio"][0]]
    for item in items:
        path = data_dir / "output" / item["subfolder"] / item["filename"]
        assert base64.b64decode(item["data"]) == path.read_bytes()
    assert not any("data" in item for e in executed for key in ("images", "gifs", "audio")
                   for item in (e["data"]["output"] or {}).get(key, []))
    # Past the cap an item keeps its url and says why it has no bytes.
    capped = await api(data_dir=data_dir, instance_urls=(url,), max_inline_output_bytes=30)
    _, outputs = await one_result(capped, graph, task_id="capped", **{"return": "base64"})
    image, video, audio = outputs["2"]["images"][0], outputs["3"]["gifs"][0], outputs["3"]["audio"][0]
    assert "data" not in image and "--max-inline-output" in image["data_skipped"]
    assert base64.b64decode(video["data"]) == b"not really a video clip"
    assert "data" not in audio and "data_skipped" in audio
