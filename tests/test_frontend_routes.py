"""The web UI's files and the routes the ComfyUI frontend requests while it loads."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from standard.server.frontend import frontend_root

PREFIXES = ["", "/api"]


def index_assets() -> list[str]:
    """The hashed bundles index.html names (./assets/index-XXXX.js ...)."""
    html = (frontend_root() / "index.html").read_text()
    return sorted({part.split('"')[0][2:] for part in html.split('src="')[1:] if part.startswith("./assets/")})


async def test_index_and_hashed_assets_with_cache_headers(instance) -> None:
    client = await instance()
    resp = await client.get("/")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/html")
    assert resp.headers["Cache-Control"] == "no-cache"
    assert "<div id=\"vue-app\">" in await resp.text()
    assets = index_assets()
    assert assets, "index.html names its bundle"
    resp = await client.get("/" + assets[0])
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/javascript; charset=utf-8"
    assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    resp = await client.get("/scripts/app.js")  # extension shims: unhashed, revalidated
    assert resp.status == 200 and resp.headers["Cache-Control"] == "no-cache"
    resp = await client.get("/user.css")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/css")


@pytest.mark.parametrize("path", ["/nope.js", "/../pyproject.toml", "/%2e%2e/%2e%2e/etc/passwd",
                                  "/assets/..%2F..%2F__init__.py", "/extensions/comfyserve/..%2F..%2Fapp.py",
                                  "/templates/..%2F..%2Fapp.py"])
async def test_static_files_stay_inside_their_roots(instance, path: str) -> None:
    client = await instance()
    resp = await client.get(path)
    assert resp.status == 404


async def test_api_routes_win_over_static_files(instance) -> None:
    client = await instance()
    resp = await client.get("/api/users")
    assert resp.headers["Content-Type"].startswith("application/json")
    resp = await client.post("/no-such-route")
    assert resp.status in (404, 405)


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_extensions_list_ours_and_the_frontends(instance, prefix: str) -> None:
    client = await instance()
    urls = await (await client.get(f"{prefix}/extensions")).json()
    assert "/extensions/comfyserve/restart.js" in urls
    assert all(url.startswith("/extensions/") and url.endswith(".js") for url in urls)
    resp = await client.get("/extensions/comfyserve/restart.js")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/javascript; charset=utf-8"
    body = await resp.text()
    assert "registerExtension" in body and "/restart" in body
    core = [url for url in urls if url.startswith("/extensions/core/")]
    if core:
        assert (await client.get(core[0])).status == 200


async def test_templates_index_and_workflow(instance) -> None:
    client = await instance()
    index = await (await client.get("/templates/index.json")).json()
    names = [t["name"] for category in index for t in category["templates"]]
    assert names
    first = next(t for category in index for t in category["templates"])
    workflow = await (await client.get(f"/templates/{first['name']}.json")).json()
    assert {node["type"] for node in workflow["nodes"]} >= {"EmptyImage", "SaveImage"}
    thumb = await client.get(f"/templates/{first['name']}-1.{first['mediaSubtype']}")
    assert thumb.status == 200


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_internal_logs(instance, prefix: str) -> None:
    import logging

    client = await instance()
    logging.getLogger("comfyserve.test").warning("a line for the log panel")
    raw = await (await client.get(f"{prefix}/internal/logs/raw")).json()
    assert set(raw) == {"entries", "size"}
    assert set(raw["size"]) == {"cols", "rows"}
    assert any("a line for the log panel" in e["m"] and e["t"] for e in raw["entries"])
    text = await (await client.get(f"{prefix}/internal/logs")).json()
    assert isinstance(text, str) and "a line for the log panel" in text


async def test_log_subscription_pushes_logs_over_the_socket(instance) -> None:
    import logging

    from support.server import next_json

    client = await instance()
    ws = await client.ws_connect("/ws?clientId=log-reader")
    assert (await next_json(ws))["type"] == "status"
    resp = await client.patch("/internal/logs/subscribe", json={"clientId": "log-reader", "enabled": True})
    assert resp.status == 200
    logging.getLogger("comfyserve.test").warning("pushed line")
    while True:
        event = await next_json(ws)
        if event["type"] == "logs" and any("pushed line" in e["m"] for e in event["data"]["entries"]):
            break
    assert (await client.patch("/internal/logs/subscribe", data=b"{}")).status == 400
    await ws.close()


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_folder_paths_and_files(instance, data_dir: Path, prefix: str) -> None:
    client = await instance()
    paths = await (await client.get(f"{prefix}/internal/folder_paths")).json()
    assert paths["checkpoints"] == [str(data_dir / "models" / "checkpoints")]
    assert paths["custom_nodes"] == [str(data_dir / "custom_nodes")]
    (data_dir / "input" / "old.png").write_bytes(b"1")
    (data_dir / "input" / "new.png").write_bytes(b"2")
    old = time.time() - 100
    os.utime(data_dir / "input" / "old.png", (old, old))
    (data_dir / "input" / "sub").mkdir()
    assert await (await client.get(f"{prefix}/internal/files/input")).json() == ["new.png", "old.png"]
    assert await (await client.get(f"{prefix}/internal/files/output")).json() == []
    resp = await client.get(f"{prefix}/internal/files/models")
    assert resp.status == 400 and await resp.json() == {"error": "Invalid directory type"}


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_experiment_models(instance, data_dir: Path, prefix: str) -> None:
    client = await instance()
    (data_dir / "models" / "loras" / "sub").mkdir(parents=True, exist_ok=True)
    (data_dir / "models" / "loras" / "sub" / "style.safetensors").write_bytes(b"x" * 5)
    (data_dir / "models" / "loras" / "readme.txt").write_text("not a model")
    folders = await (await client.get(f"{prefix}/experiment/models")).json()
    names = [f["name"] for f in folders]
    assert "loras" in names and "configs" not in names and "custom_nodes" not in names
    assert next(f for f in folders if f["name"] == "loras")["folders"] == [str(data_dir / "models" / "loras")]
    files = await (await client.get(f"{prefix}/experiment/models/loras")).json()
    assert [(f["name"], f["pathIndex"], f["size"]) for f in files] == [("sub/style.safetensors", 0, 5)]
    assert {"modified", "created"} <= set(files[0])
    assert (await client.get(f"{prefix}/experiment/models/nope")).status == 404
    assert (await client.get(f"{prefix}/experiment/models/preview/loras/0/sub/style.safetensors")).status == 404


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_empty_answers_where_the_engine_has_nothing(instance, prefix: str) -> None:
    client = await instance()
    assert await (await client.get(f"{prefix}/i18n")).json() == {}
    assert await (await client.get(f"{prefix}/workflow_templates")).json() == {}
    assert await (await client.get(f"{prefix}/node_replacements")).json() == {}
    assert await (await client.get(f"{prefix}/global_subgraphs")).json() == {}
    assert await (await client.get(f"{prefix}/global_subgraphs/unknown")).json() is None


async def test_plugin_locales_templates_and_subgraphs(instance, data_dir: Path) -> None:
    plugin = data_dir / "custom_nodes" / "my_pack"
    (plugin / "locales" / "en").mkdir(parents=True)
    (plugin / "locales" / "en" / "main.json").write_text(json.dumps({"title": "Mine"}))
    (plugin / "locales" / "en" / "nodeDefs.json").write_text(json.dumps({"MyNode": {"display_name": "My"}}))
    (plugin / "example_workflows").mkdir()
    (plugin / "example_workflows" / "demo.json").write_text(json.dumps({"nodes": []}))
    (plugin / "subgraphs").mkdir()
    (plugin / "subgraphs" / "blur.json").write_text(json.dumps({"nodes": [1]}))
    client = await instance()
    assert await (await client.get("/i18n")).json() == {
        "en": {"title": "Mine", "nodeDefs": {"MyNode": {"display_name": "My"}}}}
    assert await (await client.get("/api/workflow_templates")).json() == {"my_pack": ["demo"]}
    resp = await client.get("/api/workflow_templates/my_pack/demo.json")
    assert resp.status == 200 and await resp.json() == {"nodes": []}
    assert (await client.get("/api/workflow_templates/my_pack/..%2F..%2Fx.json")).status == 404
    assert (await client.get("/api/workflow_templates/my_pack/demo.txt")).status == 404
    subgraphs = await (await client.get("/api/global_subgraphs")).json()
    (key, entry), = subgraphs.items()
    assert entry["name"] == "blur" and entry["source"] == "custom_node"
    one = await (await client.get(f"/api/global_subgraphs/{key}")).json()
    assert json.loads(one["data"]) == {"nodes": [1]}


async def test_frontend_needs_login_with_token(instance) -> None:
    client = await instance(token="tok-123")
    resp = await client.get("/", headers={"Accept": "text/html"}, allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"].startswith("/login")
    assert (await client.get("/extensions")).status == 401
    assert (await client.get("/internal/logs/raw")).status == 401
    resp = await client.post("/login", data={"token": "tok-123", "next": "/"}, allow_redirects=False)
    assert resp.status == 302
    resp = await client.get("/", headers={"Accept": "text/html"})
    assert resp.status == 200 and "vue-app" in await resp.text()
    assert (await client.get("/extensions/comfyserve/restart.js")).status == 200
    assert (await client.get("/api/extensions")).status == 200


async def test_plugin_web_directory_is_listed_and_served(instance, data_dir: Path) -> None:
    plugin = data_dir / "custom_nodes" / "web pack"
    (plugin / "js" / "sub").mkdir(parents=True)
    (plugin / "__init__.py").write_text('NODE_CLASS_MAPPINGS = {}\nWEB_DIRECTORY = "./js"\n')
    (plugin / "js" / "sub" / "widget.js").write_text("export const x = 1;\n")
    (plugin / "secret.py").write_text("TOKEN = 1\n")
    client = await instance()
    urls = await (await client.get("/api/extensions")).json()
    assert "/extensions/web%20pack/sub/widget.js" in urls
    resp = await client.get("/extensions/web%20pack/sub/widget.js")
    assert resp.status == 200 and await resp.text() == "export const x = 1;\n"
    assert resp.headers["Content-Type"] == "application/javascript; charset=utf-8"
    assert (await client.get("/extensions/web%20pack/..%2Fsecret.py")).status == 404
    assert (await client.get("/extensions/web%20pack/..%2F__init__.py")).status == 404


async def test_localized_template_index_falls_back_to_english(instance) -> None:
    client = await instance()
    english = await (await client.get("/templates/index.json")).json()
    assert await (await client.get("/templates/index.zh.json")).json() == english
    assert await (await client.get("/templates/index.pt-BR.json")).json() == english


async def test_own_extension_routes_for_a_proxying_front(aiohttp_client) -> None:
    from aiohttp import web

    from standard.server.extensions import own_extension_urls
    from standard.server.frontend import own_extension_routes

    assert own_extension_urls() == ["/extensions/comfyserve/cluster.js", "/extensions/comfyserve/default_workflow.js",
                                    "/extensions/comfyserve/identity.js",
                                    "/extensions/comfyserve/restart.js"]
    app = web.Application()
    app.router.add_routes(own_extension_routes())
    client = await aiohttp_client(app)
    assert (await client.get("/extensions/comfyserve/restart.js")).status == 200
    assert (await client.get("/extensions/comfyserve/..%2Finternal.py")).status == 404


async def test_text_assets_are_gzipped_and_revalidated(instance) -> None:
    import gzip as gzip_module

    client = await instance()
    asset = index_assets()[0]
    original = (frontend_root() / asset).read_bytes()
    resp = await client.get("/" + asset, headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert resp.status == 200
    assert resp.headers["Content-Encoding"] == "gzip" and resp.headers["Vary"] == "Accept-Encoding"
    compressed = await resp.read()
    assert gzip_module.decompress(compressed) == original and len(compressed) < len(original)
    etag = resp.headers["ETag"]
    again = await client.get("/" + asset, headers={"Accept-Encoding": "gzip", "If-None-Match": etag})
    assert again.status == 304
    plain = await client.get("/" + asset, headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in plain.headers and await plain.read() == original
    index = await client.get("/", headers={"Accept-Encoding": "gzip, deflate"})
    assert index.headers["Content-Encoding"] == "gzip" and index.headers["Cache-Control"] == "no-cache"
    assert "vue-app" in await index.text()
