"""Hostile input on the instance's routes: a clear JSON 4xx, nothing stored, the server unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from support.server import png_bytes, tiny_graph

LONG = "a" * 300
DEEP = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != ".keep")


async def assert_json_400(response: aiohttp.ClientResponse) -> dict:
    assert response.status == 400, await response.text()
    body = await response.json()
    assert isinstance(body["error"], dict) and body["error"]["message"]
    return body


@pytest.mark.parametrize("method,url", [
    ("GET", f"/view?filename={LONG}.png"),
    ("GET", f"/view?filename=x.png&subfolder={LONG}"),
    ("GET", f"/api/view?filename={LONG}.png&type=input"),
    ("GET", f"/userdata/{LONG}.json"),
    ("POST", f"/userdata/{LONG}.json"),
    ("POST", f"/userdata/workflows%2F{LONG}.json"),
    ("DELETE", f"/userdata/{LONG}.json"),
    ("POST", f"/userdata/a.json/move/{LONG}.json"),
    ("GET", f"/userdata?dir={LONG}"),
    ("GET", f"/v2/userdata?path={LONG}"),
    ("GET", f"/view_metadata/checkpoints?filename={LONG}.safetensors"),
    ("GET", f"/experiment/models/preview/checkpoints/0/{LONG}.safetensors"),
])
async def test_a_300_character_name_is_a_400_and_writes_nothing(instance, data_dir: Path, method: str,
                                                                 url: str) -> None:
    client = await instance()
    assert (await client.post("/userdata/a.json", data=b"{}")).status == 200
    before = files_under(data_dir)
    await assert_json_400(await client.request(method, url, data=b"{}"))
    assert files_under(data_dir) == before


async def test_uploading_a_300_character_file_name_is_a_400(instance, data_dir: Path) -> None:
    client = await instance()
    for route in ("/upload/image", "/upload/mask"):
        form = aiohttp.FormData()
        form.add_field("image", png_bytes(), filename=LONG + ".png", content_type="image/png")
        form.add_field("original_ref", '{"filename": "x.png"}')
        await assert_json_400(await client.post(route, data=form))
    assert files_under(data_dir / "input") == []


async def test_multipart_without_a_boundary_is_a_400(instance) -> None:
    client = await instance()
    for route in ("/upload/image", "/upload/mask"):
        body = await assert_json_400(await client.post(
            route, data=b"--x\r\n\r\n", headers={"Content-Type": "multipart/form-data"}))
        assert "boundary" in body["error"]["details"]


async def test_json_nested_100k_deep_is_a_400_everywhere_json_is_read(instance) -> None:
    client = await instance()
    body = await assert_json_400(await client.post("/prompt", data=DEEP))
    assert body["error"]["type"] == "invalid_prompt" and "nested deeper" in body["error"]["details"]
    for method, url in (("POST", "/history"), ("POST", "/queue"), ("POST", "/settings"),
                        ("POST", "/settings/Comfy.Theme")):
        await assert_json_400(await client.request(method, url, data=DEEP))
    assert (await (await client.get("/queue")).json()) == {"queue_running": [], "queue_pending": []}


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b'"inf"', b'"nan"', b'"-inf"'])
async def test_a_non_finite_number_is_refused_and_history_stays_valid_json(instance, number: bytes) -> None:
    client = await instance()
    body = b'{"prompt": ' + json.dumps(tiny_graph()).encode() + b', "number": ' + number + b"}"
    reply = await assert_json_400(await client.post("/prompt", data=body))
    assert reply["error"]["type"] == "invalid_prompt"
    assert (await (await client.get("/queue")).json()) == {"queue_running": [], "queue_pending": []}
    history = await client.get("/history")
    json.loads(await history.text(), parse_constant=lambda name: pytest.fail(f"history holds {name}"))


async def test_non_finite_numbers_anywhere_in_the_body_are_refused(instance) -> None:
    client = await instance()
    for body in (b'{"prompt": {"1": {"class_type": "X", "inputs": {"v": NaN}}}}',
                 b'{"prompt": {}, "extra_data": {"x": -Infinity}}'):
        await assert_json_400(await client.post("/prompt", data=body))


SVG = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(document.cookie)</script></svg>'
FILE_CSP_START = "default-src 'none'"


def assert_download(response: aiohttp.ClientResponse) -> None:
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["Content-Disposition"].startswith("attachment;")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Content-Security-Policy"].startswith(FILE_CSP_START)
    assert "sandbox" in response.headers["Content-Security-Policy"]


async def test_uploaded_svg_html_and_xml_are_served_as_downloads(instance, data_dir: Path) -> None:
    client = await instance()
    for name in ("evil.svg", "evil.html", "evil.xml", "evil.xhtml", "evil.SVG", "evil.htm", "evil.pdf", "evil"):
        form = aiohttp.FormData()
        form.add_field("image", SVG, filename=name, content_type="image/svg+xml")
        assert (await client.post("/upload/image", data=form)).status == 200
        response = await client.get("/view", params={"filename": name, "type": "input"})
        assert_download(response)
        assert await response.read() == SVG
    (data_dir / "output" / "evil.svg").write_bytes(SVG)
    assert_download(await client.get("/api/view", params={"filename": "evil.svg [output]"}))


async def test_media_are_inline_with_nosniff_and_a_sandboxing_csp(instance, data_dir: Path) -> None:
    client = await instance()
    (data_dir / "output" / "pic.png").write_bytes(png_bytes())
    (data_dir / "output" / "clip.webm").write_bytes(b"\x1aE\xdf\xa3")
    (data_dir / "output" / "sound.mp3").write_bytes(b"ID3")
    for params, content_type in (({"filename": "pic.png"}, "image/png"),
                                 ({"filename": "pic.png", "preview": "webp;80"}, "image/webp"),
                                 ({"filename": "pic.png", "channel": "a"}, "image/png"),
                                 ({"filename": "clip.webm"}, "video/webm"),
                                 ({"filename": "sound.mp3"}, "audio/mpeg")):
        response = await client.get("/view", params=params)
        assert response.status == 200
        assert response.headers["Content-Type"] == content_type
        assert response.headers["Content-Disposition"].startswith("inline;")
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Content-Security-Policy"].startswith(FILE_CSP_START)


async def test_model_previews_get_the_file_policy(instance, data_dir: Path) -> None:
    client = await instance()
    folder = data_dir / "models" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "m.safetensors").write_bytes(b"")
    (folder / "m.png").write_bytes(png_bytes())
    response = await client.get("/experiment/models/preview/checkpoints/0/m.safetensors")
    assert response.status == 200 and response.headers["Content-Type"] == "image/png"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Content-Security-Policy"].startswith(FILE_CSP_START)


async def test_a_login_form_without_a_boundary_is_a_400(instance) -> None:
    client = await instance(token="a-long-enough-test-token")
    await assert_json_400(await client.post("/login", data=b"--x\r\n",
                                            headers={"Content-Type": "multipart/form-data"}))


async def test_userdata_files_are_downloads_with_the_file_csp(instance) -> None:
    client = await instance()
    assert (await client.post("/userdata/evil.svg", data=SVG)).status == 200
    response = await client.get("/userdata/evil.svg")
    assert response.headers["Content-Disposition"].startswith("attachment")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Content-Security-Policy"].startswith(FILE_CSP_START)
