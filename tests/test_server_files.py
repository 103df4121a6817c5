"""Uploads and /view through HTTP: ComfyUI's semantics and every traversal variant."""

from __future__ import annotations

import io
import json
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from support.server import png_bytes


def upload_form(data: bytes, filename: str, **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("image", data, filename=filename, content_type="image/png")
    for key, value in fields.items():
        form.add_field(key, value)
    return form


def raw_multipart(data: bytes, filename: str, **fields: str) -> tuple[bytes, dict[str, str]]:
    """A multipart body with the filename exactly as a browser sends it (aiohttp's client escapes '/')."""
    boundary = "----comfyservetestboundary"
    parts = []
    for key, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        "Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


async def test_upload_image_stores_in_input_and_answers_comfyui_shape(instance, data_dir: Path) -> None:
    client = await instance()
    data = png_bytes()
    resp = await client.post("/upload/image", data=upload_form(data, "cat.png"))
    assert resp.status == 200
    assert await resp.json() == {"name": "cat.png", "subfolder": "", "type": "input"}
    assert (data_dir / "input" / "cat.png").read_bytes() == data


async def test_upload_same_content_is_reused_and_clash_gets_numbered_name(instance, data_dir: Path) -> None:
    client = await instance()
    first, other = png_bytes(color=(1, 2, 3, 255)), png_bytes(color=(9, 9, 9, 255))
    assert (await (await client.post("/api/upload/image", data=upload_form(first, "a.png"))).json())["name"] == "a.png"
    again = await (await client.post("/upload/image", data=upload_form(first, "a.png"))).json()
    assert again["name"] == "a.png"
    clash = await (await client.post("/upload/image", data=upload_form(other, "a.png"))).json()
    assert clash["name"] == "a (1).png"
    form = upload_form(png_bytes(color=(5, 5, 5, 255)), "a.png")
    clash2 = await (await client.post("/upload/image", data=form)).json()
    assert clash2["name"] == "a (2).png"
    assert (data_dir / "input" / "a.png").read_bytes() == first
    assert (data_dir / "input" / "a (1).png").read_bytes() == other
    # the same content as the numbered copy is found again, not stored a third time
    reuse = await (await client.post("/upload/image", data=upload_form(other, "a.png"))).json()
    assert reuse["name"] == "a (1).png"
    assert sorted(p.name for p in (data_dir / "input").glob("a*.png")) == ["a (1).png", "a (2).png", "a.png"]


async def test_upload_overwrite_subfolder_and_type(instance, data_dir: Path) -> None:
    client = await instance()
    await client.post("/upload/image", data=upload_form(png_bytes(color=(1, 1, 1, 255)), "o.png"))
    newer = png_bytes(color=(7, 7, 7, 255))
    resp = await client.post("/upload/image", data=upload_form(newer, "o.png", overwrite="true"))
    assert (await resp.json())["name"] == "o.png"
    assert (data_dir / "input" / "o.png").read_bytes() == newer
    resp = await client.post("/upload/image", data=upload_form(newer, "t.png", subfolder="x/y", type="temp"))
    assert await resp.json() == {"name": "t.png", "subfolder": "x/y", "type": "temp"}
    assert (data_dir / "temp" / "x" / "y" / "t.png").is_file()


@pytest.mark.parametrize(
    ("fields", "filename"),
    [
        ({"subfolder": "../escape"}, "a.png"),
        ({"subfolder": "/etc"}, "a.png"),
        ({"subfolder": "ok/../../escape"}, "a.png"),
        ({"type": "models"}, "a.png"),
        ({"type": "../output"}, "a.png"),
        ({}, "../a.png"),
        ({}, "/tmp/a.png"),
        ({}, "sub/a.png"),
        ({}, ".."),
        ({"subfolder": "..\\escape"}, "a.png"),
        ({"subfolder": "%2e%2e"}, "a.png"),
    ],
)
async def test_upload_traversal_is_refused_and_nothing_is_written(instance, data_dir: Path, fields, filename) -> None:
    client = await instance()
    before = sorted(str(p) for p in data_dir.parent.rglob("*"))
    body, headers = raw_multipart(png_bytes(), filename, **fields)
    resp = await client.post("/upload/image", data=body, headers=headers)
    assert resp.status == 400
    assert "error" in await resp.json()
    assert sorted(str(p) for p in data_dir.parent.rglob("*")) == before


async def test_upload_without_image_field_or_not_multipart_is_400(instance) -> None:
    client = await instance()
    form = aiohttp.FormData()
    form.add_field("subfolder", "x")
    assert (await client.post("/upload/image", data=form)).status == 400
    assert (await client.post("/upload/image", json={"image": "x"})).status == 400


async def test_upload_mask_puts_mask_alpha_into_original(instance, data_dir: Path) -> None:
    client = await instance()
    original = Image.new("RGB", (4, 2), (10, 20, 30))
    buffer = io.BytesIO()
    original.save(buffer, format="PNG")
    await client.post("/upload/image", data=upload_form(buffer.getvalue(), "photo.png"))
    mask = Image.new("RGBA", (4, 2), (0, 0, 0, 255))
    mask.putpixel((1, 0), (0, 0, 0, 0))
    mbuf = io.BytesIO()
    mask.save(mbuf, format="PNG")
    ref = json.dumps({"filename": "photo.png", "subfolder": "", "type": "input"})
    resp = await client.post("/upload/mask", data=upload_form(mbuf.getvalue(), "clipspace-mask.png",
                                                              original_ref=ref, subfolder="clipspace"))
    assert resp.status == 200
    body = await resp.json()
    assert body == {"name": "clipspace-mask.png", "subfolder": "clipspace", "type": "input"}
    with Image.open(data_dir / "input" / "clipspace" / "clipspace-mask.png") as stored:
        assert stored.mode == "RGBA"
        assert stored.getpixel((0, 0)) == (10, 20, 30, 255)
        assert stored.getpixel((1, 0)) == (10, 20, 30, 0)


@pytest.mark.parametrize(
    ("ref", "status"),
    [
        ({"filename": "../photo.png", "type": "input"}, 400),
        ({"filename": "/etc/passwd", "type": "input"}, 400),
        ({"filename": "photo.png", "subfolder": "../..", "type": "input"}, 403),
        ({"filename": "photo.png", "type": "secrets"}, 400),
        ({"filename": "missing.png", "type": "input"}, 404),
    ],
)
async def test_upload_mask_bad_original_ref(instance, data_dir: Path, ref, status) -> None:
    client = await instance()
    await client.post("/upload/image", data=upload_form(png_bytes(), "photo.png"))
    resp = await client.post("/upload/mask", data=upload_form(png_bytes(), "mask.png", original_ref=json.dumps(ref)))
    assert resp.status == status
    assert not (data_dir / "input" / "mask.png").exists()


async def _output_image(data_dir: Path, name: str = "out.png", sub: str = "") -> bytes:
    folder = data_dir / "output" / sub
    folder.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGBA", (6, 4), (0, 128, 255, 100))
    img.save(folder / name)
    return (folder / name).read_bytes()


async def test_view_serves_output_by_default_and_each_type(instance, data_dir: Path) -> None:
    client = await instance()
    raw = await _output_image(data_dir)
    resp = await client.get("/view", params={"filename": "out.png"})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "image/png"
    assert resp.headers["Content-Disposition"] == 'inline; filename="out.png"'
    assert await resp.read() == raw
    (data_dir / "temp" / "t.png").write_bytes(raw)
    assert (await client.get("/api/view", params={"filename": "t.png", "type": "temp"})).status == 200
    assert (await client.get("/view", params={"filename": "t.png", "type": "input"})).status == 404
    # ComfyUI's annotated form names the folder in the filename itself
    assert (await client.get("/view", params={"filename": "t.png [temp]"})).status == 200


async def test_view_subfolder_preview_and_channels(instance, data_dir: Path) -> None:
    client = await instance()
    await _output_image(data_dir, "s.png", "nested/deeper")
    base = {"filename": "s.png", "subfolder": "nested/deeper"}
    resp = await client.get("/view", params={**base, "preview": "webp;50"})
    assert resp.status == 200 and resp.headers["Content-Type"] == "image/webp"
    assert Image.open(io.BytesIO(await resp.read())).format == "WEBP"
    resp = await client.get("/view", params={**base, "preview": "jpeg;90"})
    assert resp.headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(await resp.read())).mode == "RGB"
    resp = await client.get("/view", params={**base, "channel": "rgb"})
    assert Image.open(io.BytesIO(await resp.read())).mode == "RGB"
    resp = await client.get("/view", params={**base, "channel": "a"})
    alpha = Image.open(io.BytesIO(await resp.read()))
    assert alpha.mode == "RGBA" and alpha.getpixel((0, 0)) == (0, 0, 0, 100)
    # a preview asked for with the alpha channel falls back to webp, as in ComfyUI
    resp = await client.get("/view", params={**base, "preview": "jpeg", "channel": "a"})
    assert resp.headers["Content-Type"] == "image/webp"


async def test_view_html_is_served_as_download(instance, data_dir: Path) -> None:
    client = await instance()
    (data_dir / "output" / "page.html").write_text("<script>alert(1)</script>")
    resp = await client.get("/view", params={"filename": "page.html"})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/octet-stream"


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("filename=..%2F..%2Fetc%2Fpasswd", 400),
        ("filename=%2e%2e%2Fsecret.png", 400),
        ("filename=/etc/passwd", 400),
        ("filename=", 400),
        ("filename=out.png&type=..", 400),
        ("filename=out.png&type=models", 400),
        ("filename=out.png&subfolder=..", 403),
        ("filename=out.png&subfolder=%2e%2e", 403),
        ("filename=out.png&subfolder=/etc", 403),
        ("filename=out.png&subfolder=a/../../x", 403),
        ("filename=%252e%252e%252Fsecret.png", 400),
        ("filename=nothere.png", 404),
        ("type=output", 404),
    ],
)
async def test_view_traversal_variants(instance, data_dir: Path, query: str, status: int) -> None:
    client = await instance()
    await _output_image(data_dir)
    (data_dir / "secret.png").write_bytes(b"s3cr3t-bytes")
    resp = await client.get(f"/view?{query}")
    assert resp.status == status
    assert b"s3cr3t-bytes" not in await resp.read()


async def test_view_refuses_symlink_out_of_root(instance, data_dir: Path, tmp_path: Path) -> None:
    client = await instance()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "leak.png").write_bytes(b"leak")
    (data_dir / "output" / "link").symlink_to(outside)
    resp = await client.get("/view", params={"filename": "leak.png", "subfolder": "link"})
    assert resp.status == 403
