"""The frontend's user storage (/users, /settings, /userdata, /v2/userdata) with ComfyUI's shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

PREFIXES = ["", "/api"]


def user_dir(data_dir: Path) -> Path:
    return data_dir / "user" / "default"


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_users_reports_server_storage(instance, prefix: str) -> None:
    client = await instance()
    resp = await client.get(f"{prefix}/users")
    assert resp.status == 200
    assert await resp.json() == {"storage": "server", "migrated": True}


async def test_post_users_is_refused_in_single_user_mode(instance) -> None:
    client = await instance()
    resp = await client.post("/users", json={"username": "alice"})
    assert resp.status == 400
    assert "error" in await resp.json()


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_settings_roundtrip(instance, data_dir: Path, prefix: str) -> None:
    client = await instance()
    assert await (await client.get(f"{prefix}/settings")).json() == {}
    assert (await client.post(f"{prefix}/settings", json={"Comfy.A": 1, "Comfy.B": "x"})).status == 200
    assert (await client.post(f"{prefix}/settings/Comfy.C", json={"nested": [1, 2]})).status == 200
    assert (await client.post(f"{prefix}/settings", json={"Comfy.A": 2})).status == 200
    assert await (await client.get(f"{prefix}/settings")).json() == {
        "Comfy.A": 2, "Comfy.B": "x", "Comfy.C": {"nested": [1, 2]}}
    assert await (await client.get(f"{prefix}/settings/Comfy.C")).json() == {"nested": [1, 2]}
    assert await (await client.get(f"{prefix}/settings/Missing")).json() is None
    stored = json.loads((user_dir(data_dir) / "comfy.settings.json").read_text())
    assert stored["Comfy.A"] == 2


async def test_settings_bad_json_changes_nothing(instance, data_dir: Path) -> None:
    client = await instance()
    await client.post("/settings", json={"keep": True})
    resp = await client.post("/settings", data=b"{nope", headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert (await resp.json())["error"]["type"] == "invalid_json"
    assert (await client.post("/settings", json=[1, 2])).status == 400
    assert await (await client.get("/settings")).json() == {"keep": True}


async def test_corrupt_settings_file_reads_as_empty(instance, data_dir: Path) -> None:
    client = await instance()
    (user_dir(data_dir) / "comfy.settings.json").write_text("{broken")
    assert await (await client.get("/settings")).json() == {}


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_userdata_write_read_list_move_delete(instance, data_dir: Path, prefix: str) -> None:
    client = await instance()
    body = json.dumps({"nodes": []}).encode()
    resp = await client.post(f"{prefix}/userdata/workflows%2Fa%20b.json", data=body)
    assert resp.status == 200
    assert await resp.json() == "workflows/a b.json"
    assert (user_dir(data_dir) / "workflows" / "a b.json").read_bytes() == body

    resp = await client.get(f"{prefix}/userdata/workflows%2Fa%20b.json")
    assert resp.status == 200
    assert await resp.read() == body
    assert resp.headers["Content-Disposition"] == "attachment"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"

    resp = await client.post(f"{prefix}/userdata/workflows%2Fsub%2Fc.json?full_info=true", data=b"{}")
    info = await resp.json()
    assert info["path"] == "workflows/sub/c.json" and info["size"] == 2
    assert isinstance(info["modified"], int) and isinstance(info["created"], int)

    listing = await (await client.get(f"{prefix}/userdata?dir=workflows")).json()
    assert listing == ["a b.json"]
    listing = await (await client.get(f"{prefix}/userdata?dir=workflows&recurse=true")).json()
    assert sorted(listing) == ["a b.json", "sub/c.json"]
    listing = await (await client.get(f"{prefix}/userdata?dir=workflows&recurse=true&split=true")).json()
    assert sorted(listing) == [["a b.json", "a b.json"], ["sub/c.json", "sub", "c.json"]]
    listing = await (await client.get(
        f"{prefix}/userdata?dir=workflows&recurse=true&split=false&full_info=true")).json()
    assert sorted(item["path"] for item in listing) == ["a b.json", "sub/c.json"]
    assert all(set(item) == {"path", "size", "modified", "created"} for item in listing)

    resp = await client.post(f"{prefix}/userdata/workflows%2Fa%20b.json/move/workflows%2Fd.json")
    assert resp.status == 200
    assert await resp.json() == "workflows/d.json"
    assert (await client.get(f"{prefix}/userdata/workflows%2Fa%20b.json")).status == 404

    assert (await client.delete(f"{prefix}/userdata/workflows%2Fd.json")).status == 204
    assert (await client.delete(f"{prefix}/userdata/workflows%2Fd.json")).status == 404
    assert not (user_dir(data_dir) / "workflows" / "d.json").exists()


async def test_userdata_overwrite_false_and_move_conflicts(instance, data_dir: Path) -> None:
    client = await instance()
    await client.post("/userdata/a.json", data=b"1")
    await client.post("/userdata/b.json", data=b"2")
    resp = await client.post("/userdata/a.json?overwrite=false", data=b"changed")
    assert resp.status == 409
    assert (user_dir(data_dir) / "a.json").read_bytes() == b"1"
    assert (await client.post("/userdata/a.json/move/b.json?overwrite=false")).status == 409
    assert (user_dir(data_dir) / "b.json").read_bytes() == b"2"
    resp = await client.post("/userdata/a.json/move/b.json?full_info=true")
    assert (await resp.json())["path"] == "b.json"
    assert (user_dir(data_dir) / "b.json").read_bytes() == b"1"
    assert (await client.post("/userdata/missing.json/move/c.json")).status == 404


async def test_userdata_listing_errors(instance) -> None:
    client = await instance()
    assert (await client.get("/userdata")).status == 400
    assert (await client.get("/userdata?dir=nothing-here")).status == 404
    assert (await client.get("/userdata?dir=..")).status == 403
    assert (await client.get("/userdata?dir=/etc")).status == 403
    # The folders the frontend lists at start exist from the first start on.
    assert await (await client.get("/userdata?dir=workflows&recurse=true")).json() == []


@pytest.mark.parametrize("path", [
    "..%2F..%2Fsecret.txt",
    "%2e%2e%2Fsecret.txt",
    "..%252F..%252Fsecret.txt",   # double-encoded: decoded twice, still refused
    "%2Fetc%2Fpasswd",
    "workflows%2F..%2F..%2F..%2Fsecret.txt",
    "a%00b",
])
async def test_userdata_traversal_is_refused(instance, data_dir: Path, path: str) -> None:
    client = await instance()
    (data_dir / "user" / "secret.txt").write_text("secret")
    assert (await client.get(f"/userdata/{path}")).status == 403
    assert (await client.post(f"/userdata/{path}", data=b"x")).status == 403
    assert (await client.delete(f"/userdata/{path}")).status == 403
    assert (await client.post(f"/userdata/ok.json/move/{path}")).status in (403, 404)
    await client.post("/userdata/ok.json", data=b"x")
    assert (await client.post(f"/userdata/ok.json/move/{path}")).status == 403
    assert (data_dir / "user" / "secret.txt").read_text() == "secret"
    assert (user_dir(data_dir) / "ok.json").exists()


async def test_userdata_symlink_out_of_root_is_refused(instance, data_dir: Path, tmp_path: Path) -> None:
    client = await instance()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.txt").write_text("no")
    (user_dir(data_dir) / "link").symlink_to(outside)
    assert (await client.get("/userdata/link%2Fx.txt")).status == 403
    assert (await client.get("/userdata?dir=link")).status == 403


async def test_dangerous_content_is_downloaded_not_rendered(instance) -> None:
    client = await instance()
    await client.post("/userdata/evil.html", data=b"<script>alert(1)</script>")
    resp = await client.get("/userdata/evil.html")
    assert resp.headers["Content-Type"] == "application/octet-stream"
    assert resp.headers["Content-Disposition"] == "attachment"


async def test_user_css_is_inline_and_empty_when_missing(instance) -> None:
    client = await instance()
    resp = await client.get("/api/userdata/comfy.templates.json")
    assert resp.status == 200 and await resp.json() == []
    resp = await client.get("/api/userdata/user.css")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/css")
    assert await resp.read() == b""
    await client.post("/api/userdata/user.css", data=b"body{color:red}")
    resp = await client.get("/api/userdata/user.css")
    assert resp.headers["Content-Type"] == "text/css" and resp.headers["Content-Disposition"] == "inline"
    assert await resp.read() == b"body{color:red}"


async def test_v2_userdata_lists_dirs_first(instance, data_dir: Path) -> None:
    client = await instance()
    await client.post("/userdata/workflows%2Fz.json", data=b"{}")
    await client.post("/userdata/A.txt", data=b"abc")
    listing = await (await client.get("/v2/userdata")).json()
    types = [entry["type"] for entry in listing]
    assert types == sorted(types, key=lambda t: t != "directory")
    by_path = {entry["path"]: entry for entry in listing}
    assert by_path["workflows"] == {"name": "workflows", "path": "workflows", "type": "directory"}
    assert by_path["A.txt"]["size"] == 3 and by_path["A.txt"]["type"] == "file"
    assert by_path["workflows/z.json"]["name"] == "z.json"
    sub = await (await client.get("/api/v2/userdata?path=workflows")).json()
    assert [entry["path"] for entry in sub] == ["workflows/z.json"]
    assert (await client.get("/v2/userdata?path=nope")).status == 404
    assert (await client.get("/v2/userdata?path=A.txt")).status == 400
    assert (await client.get("/v2/userdata?path=..%2F..")).status == 400


async def test_userdata_needs_the_token(instance) -> None:
    client = await instance(token="secret-token")
    assert (await client.get("/settings")).status == 401
    assert (await client.post("/userdata/a.json", data=b"x")).status == 401
    resp = await client.get("/settings", headers={"Authorization": "Bearer secret-token"})
    assert resp.status == 200


async def test_concurrent_setting_writes_all_land(instance) -> None:
    import asyncio

    client = await instance()
    responses = await asyncio.gather(*(client.post(f"/api/settings/Key.{i}", json=i) for i in range(20)))
    assert all(resp.status == 200 for resp in responses)
    settings = await (await client.get("/api/settings")).json()
    assert settings == {f"Key.{i}": i for i in range(20)}
