"""The cluster offers the templates of its pool's runtime, not a set of its own.

``/templates/*`` is fetched from an instance of the pool (cached): embedded-engine instances
give the embedded set, a pool of real ComfyUI gives ComfyUI's. Only a signed-in user may read
them; hostile paths get 404; what an instance answers is never served as HTML on our origin.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp import web
from test_access_guard_editions import browser, cluster_login

from standard.guard import AccessPolicy
from support.access import EVIL_ORIGINS

COMFYUI_INDEX = [{"moduleName": "default", "title": "Basics", "templates": [{"name": "default", "title": "Image"}]}]


async def comfyui_like(aiohttp_server: Any) -> str:
    """A stand-in for a real-ComfyUI instance: ready, and ComfyUI's templates."""
    async def readyz(request: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    async def template(request: web.Request) -> web.Response:
        name = request.match_info["path"]
        if name == "index.json":
            return web.json_response(COMFYUI_INDEX)
        if name == "default.json":
            return web.json_response({"nodes": [{"id": 3, "type": "KSampler"}]})
        if name == "evil.html":
            return web.Response(text="<script>alert(1)</script>", content_type="text/html")
        if name == "evil.svg":
            return web.Response(text="<svg/>", content_type="image/svg+xml")
        if name == "default-1.webp":
            return web.Response(body=b"RIFFxxxxWEBP", content_type="image/webp")
        raise web.HTTPNotFound()

    app = web.Application()
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/templates/{path:.+}", template)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


async def test_embedded_pool_offers_the_embedded_templates(start_cluster) -> None:
    cluster = await start_cluster(instances=1, users=("alice",))
    async with cluster.http("alice") as alice:
        resp = await alice.get("/templates/index.json")
        assert resp.status == 200
        names = [t["name"] for group in await resp.json() for t in group["templates"]]
        assert names == ["comfyserve_empty_image"]
        graph = await (await alice.get("/templates/comfyserve_empty_image.json")).json()
        assert sorted(n["type"] for n in graph["nodes"]) == ["EmptyImage", "SaveImage"]


async def test_comfyui_pool_offers_comfyuis_templates(start_cluster, aiohttp_server) -> None:
    url = await comfyui_like(aiohttp_server)
    cluster = await start_cluster(instances=0, users=("alice",), instance_urls=(url,))
    async with cluster.http("alice") as alice:
        assert await (await alice.get("/templates/index.json")).json() == COMFYUI_INDEX
        assert (await (await alice.get("/templates/default.json")).json())["nodes"][0]["type"] == "KSampler"
        thumb = await alice.get("/templates/default-1.webp")
        assert thumb.status == 200 and thumb.headers["Content-Type"] == "image/webp"
        assert (await alice.get("/templates/comfyserve_empty_image.json")).status == 404
        for name in ("evil.html", "evil.svg"):
            resp = await alice.get(f"/templates/{name}")
            assert resp.headers["Content-Type"] == "application/octet-stream", name


@pytest.mark.parametrize("path", ["..%2F..%2Fsecret_key", "a/../../x", "%2e%2e/x", "a//b", "a%5Cb", "a%00b",
                                  "x" * 600])
async def test_hostile_template_paths_are_not_found(start_cluster, path: str) -> None:
    cluster = await start_cluster(instances=1, users=("alice",))
    async with cluster.http("alice") as alice:
        assert (await alice.get("/templates/" + path)).status == 404


async def test_templates_are_for_signed_in_users_only(start_cluster) -> None:
    cluster = await start_cluster(instances=1, users=("alice",),
                                  access=AccessPolicy.build(allowed_hosts=["127.0.0.1"]))
    async with cluster.http(None) as anonymous:
        assert (await anonymous.get("/templates/index.json")).status == 401
        assert (await anonymous.get("/templates/index.json", headers={"Authorization": "Bearer no"})).status == 401
    async with cluster.http("alice") as alice:
        assert (await alice.get("/templates/index.json", headers={"Host": "evil.example"})).status == 421
    async with browser() as session:
        assert (await cluster_login(session, cluster.url)).status == 302
        for origin in EVIL_ORIGINS:  # a read: no CORS header, so another origin's page cannot read it
            resp = await session.get(cluster.url + "/templates/index.json", headers={"Origin": origin})
            assert "Access-Control-Allow-Origin" not in resp.headers
        body = await (await session.get(cluster.url + "/templates/index.json")).read()
        assert json.loads(body)
