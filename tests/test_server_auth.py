"""Token auth and request limits of the instance through HTTP and WS."""

from __future__ import annotations

import aiohttp
import pytest

from standard.auth import SESSION_COOKIE

TOKEN = "s3cret-token"


async def test_without_token_routes_are_open_on_loopback(instance) -> None:
    client = await instance()
    assert (await client.get("/queue")).status == 200
    assert (await client.get("/api/queue")).status == 200


async def test_without_token_a_foreign_origin_cannot_post(instance) -> None:
    client = await instance()
    resp = await client.post("/queue", json={"clear": True}, headers={"Origin": "http://evil.example"})
    assert resp.status == 403
    assert (await resp.json())["error"]["type"] == "forbidden"
    same = await client.post("/queue", json={"clear": True},
                             headers={"Origin": f"http://127.0.0.1:{client.port}"})
    assert same.status == 200


@pytest.mark.parametrize("path", ["/healthz", "/api/healthz"])
async def test_healthz_is_public(instance, path: str) -> None:
    client = await instance(token=TOKEN)
    resp = await client.get(path)
    assert resp.status == 200


@pytest.mark.parametrize("path", ["/readyz", "/metrics", "/queue", "/api/history", "/object_info",
                                  "/system_stats", "/view?filename=x.png", "/prompt", "/models"])
async def test_every_other_route_needs_the_token(instance, path: str) -> None:
    client = await instance(token=TOKEN)
    missing = await client.get(path)
    assert missing.status == 401
    assert (await missing.json())["error"]["type"] == "unauthorized"
    wrong = await client.get(path, headers={"Authorization": "nope"})
    assert wrong.status == 401
    wrong_bearer = await client.get(path, headers={"Authorization": "Bearer nope"})
    assert wrong_bearer.status == 401
    for header in (TOKEN, f"Bearer {TOKEN}", f"bearer {TOKEN}"):
        resp = await client.get(path, headers={"Authorization": header})
        assert resp.status not in (401, 403), header


async def test_post_routes_need_the_token_and_change_nothing_without_it(instance) -> None:
    client = await instance(token=TOKEN)
    resp = await client.post("/prompt", json={"prompt": {}})
    assert resp.status == 401
    resp = await client.post("/history", json={"clear": True})
    assert resp.status == 401
    resp = await client.post("/restart")
    assert resp.status == 401


async def test_browser_logs_in_once_and_keeps_a_session_cookie(instance) -> None:
    client = await instance(token=TOKEN)
    page = await client.get("/queue", headers={"Accept": "text/html"}, allow_redirects=False)
    assert page.status == 302 and page.headers["Location"].startswith("/login")
    form = await client.get("/login")
    assert form.status == 200 and "token" in await form.text()
    bad = await client.post("/login", data={"token": "wrong", "next": "/"}, allow_redirects=False)
    assert bad.status == 401
    resp = await client.post("/login", data={"token": TOKEN, "next": "/queue"}, allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "/queue"
    assert SESSION_COOKIE in resp.cookies
    assert (await client.get("/queue")).status == 200
    assert (await client.post("/queue", json={"clear": True})).status == 200
    # the cookie does not let another origin change state (CSRF)
    cross = await client.post("/queue", json={"clear": True}, headers={"Origin": "http://evil.example"})
    assert cross.status == 403


async def test_query_token_only_from_the_same_origin(instance) -> None:
    client = await instance(token=TOKEN)
    assert (await client.get(f"/queue?token={TOKEN}")).status == 200
    foreign = await client.get(f"/queue?token={TOKEN}", headers={"Origin": "http://evil.example"})
    assert foreign.status == 403
    assert (await client.get("/queue?token=wrong")).status == 401


async def test_websocket_needs_the_token(instance) -> None:
    client = await instance(token=TOKEN)
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/ws?clientId=x")
    assert info.value.status == 401
    ws = await client.ws_connect("/ws?clientId=x", headers={"Authorization": f"Bearer {TOKEN}"})
    first = await ws.receive_json(timeout=10)
    assert first["type"] == "status" and first["data"]["sid"] == "x"
    await ws.close()


async def test_body_over_max_upload_size_is_413_json(instance) -> None:
    client = await instance(max_upload_size_mb=0.01)  # 10 KiB
    big = {"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"pad": "x" * 20000}}}}
    resp = await client.post("/prompt", json=big)
    assert resp.status == 413
    assert (await resp.json())["error"]["type"] == "request_too_large"
    form = aiohttp.FormData()
    form.add_field("image", b"\0" * 20000, filename="big.png", content_type="image/png")
    resp = await client.post("/upload/image", data=form)
    assert resp.status == 413
    assert (await resp.json())["error"]["type"] == "request_too_large"
    queue = await (await client.get("/queue")).json()
    assert queue == {"queue_running": [], "queue_pending": []}
