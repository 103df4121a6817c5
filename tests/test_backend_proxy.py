"""``--backend-url``: the front proxies HTTP and WS to a second comfyserve instance, auth in front."""

from __future__ import annotations

import asyncio
import json
import struct

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from standard.client import BinaryFrame, InstanceClient
from standard.errors import InstanceError
from standard.ports import free_port
from standard.server import keys
from support.backend import TOKEN
from support.metrics import kinds, parse, value
from support.server import png_bytes, tiny_graph


def url(server, path: str = "") -> str:  # type: ignore[no-untyped-def]
    return f"http://127.0.0.1:{server.port}{path}"


async def test_token_is_checked_in_front_and_never_forwarded(backend, front) -> None:
    server = await front(token=TOKEN)
    async with aiohttp.ClientSession() as http:
        async with http.get(url(server, "/system_stats")) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["type"] == "unauthorized"
        async with http.get(url(server, "/queue"), headers={"Authorization": "wrong"}) as resp:
            assert resp.status == 401
        assert backend.seen == []  # refused requests never reach the backend
        async with http.get(url(server, "/queue"), headers={"Authorization": TOKEN}) as resp:
            assert resp.status == 200
            assert await resp.json() == {"queue_running": [], "queue_pending": []}
        async with http.get(url(server, "/api/queue"), headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 200
        async with http.get(url(server, "/healthz")) as resp:
            assert resp.status == 200
    assert [s.raw_path for s in backend.seen] == ["/queue", "/api/queue"]
    for seen in backend.seen:
        assert "Authorization" not in seen.headers
        assert seen.headers["X-Forwarded-For"] == "127.0.0.1"


async def test_query_token_and_session_cookie_stay_in_front(backend, front) -> None:
    server = await front(token=TOKEN)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.get(url(server, f"/history?max_items=2&token={TOKEN}")) as resp:
            assert resp.status == 200
        async with http.post(url(server, "/login"), data={"token": TOKEN, "next": "/queue"},
                             allow_redirects=False) as resp:
            assert resp.status == 302
        http.cookie_jar.update_cookies({"theme": "dark"})
        async with http.get(url(server, "/queue")) as resp:
            assert resp.status == 200
    assert backend.seen[0].raw_path == "/history?max_items=2"
    assert backend.seen[1].headers["Cookie"] == "theme=dark"


async def test_percent_encoded_userdata_path_reaches_the_backend_encoded(backend, front) -> None:
    server = await front()
    async with aiohttp.ClientSession() as http:
        target = url(server, "/api/userdata/workflows%2Fmy%20flow.json?overwrite=true")
        async with http.post(aiohttp.client.URL(target, encoded=True), data=b'{"nodes": []}') as resp:
            status = resp.status
        assert backend.seen[-1].raw_path == "/api/userdata/workflows%2Fmy%20flow.json?overwrite=true"
        assert status == 200
        assert (backend.data_dir / "user" / "default" / "workflows" / "my flow.json").read_bytes() == b'{"nodes": []}'
        listing = url(server, "/api/userdata?dir=workflows")
        async with http.get(listing) as resp:
            assert await resp.json() == ["my flow.json"]


async def test_upload_and_view_through_the_front(backend, front) -> None:
    server = await front(token=TOKEN)
    image = png_bytes((40, 30))
    async with InstanceClient(url(server), TOKEN) as client:
        uploaded = await client.upload_image(image, "cat.png", subfolder="pets")
        assert uploaded == {"name": "cat.png", "subfolder": "pets", "type": "input"}
        assert (backend.data_dir / "input" / "pets" / "cat.png").read_bytes() == image
        assert await client.view("cat.png", "pets", "input") == image


async def test_large_bodies_stream_and_the_size_limit_holds(backend, front) -> None:
    server = await front(max_upload_size_mb=2)
    big = png_bytes((700, 700), mode="RGB", color=(1, 2, 3))
    noise = bytes(range(256)) * 4096  # 1 MiB, streamed (over the small-body threshold)
    async with InstanceClient(url(server)) as client:
        await client.upload_image(big + noise, "big.png", overwrite=True)
        assert (backend.data_dir / "input" / "big.png").stat().st_size == len(big) + len(noise)
    async with aiohttp.ClientSession() as http:
        form = aiohttp.FormData()
        form.add_field("image", b"x" * (3 * 1024 * 1024), filename="huge.png", content_type="image/png")
        async with http.post(url(server, "/upload/image"), data=form) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["type"] == "request_too_large"
    assert not (backend.data_dir / "input" / "huge.png").exists()


async def test_readyz_follows_the_backend_and_dead_backends_get_502(backend, front) -> None:
    server = await front(token=TOKEN)
    headers = {"Authorization": TOKEN}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(url(server, "/readyz")) as resp:
            assert resp.status == 200
            assert (await resp.json())["runtime"] == "comfyui-url"
        dead = await front(backend_url=f"http://127.0.0.1:{free_port()}", token=TOKEN)
        async with http.get(url(dead, "/readyz")) as resp:
            assert resp.status == 503
        async with http.get(url(dead, "/queue")) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]["type"] == "backend_unavailable"
        async with http.get(url(dead, "/healthz")) as resp:
            assert resp.status == 200


async def test_websocket_declines_permessage_deflate(front) -> None:
    """Offered deflate (as browsers do), the front's /ws answers plain frames: no zlib state per socket."""
    server = await front(token=TOKEN)
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url(server, "/ws?clientId=plain"), headers={"Authorization": TOKEN},
                                   compress=15) as ws:
            assert (await ws.receive_json(timeout=10))["type"] == "status"
            assert ws.compress == 0


async def test_websocket_relays_text_and_binary_both_ways(backend, front) -> None:
    server = await front(token=TOKEN)
    prompt_server = backend.app[keys.PROMPT_SERVER]
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url(server, "/ws?clientId=abc"), headers={"Authorization": TOKEN}) as ws:
            first = await ws.receive_json(timeout=10)
            assert first["type"] == "status" and first["data"]["sid"] == "abc"
            await ws.send_str(json.dumps({"type": "feature_flags", "data": {}}))  # client -> backend
            reply = await ws.receive_json(timeout=10)
            assert reply["type"] == "feature_flags"
            preview = png_bytes((4, 4))
            await prompt_server.send_bytes(1, struct.pack(">I", 2) + preview, "abc")
            msg = await ws.receive(timeout=10)
            assert msg.type == aiohttp.WSMsgType.BINARY
            assert msg.data == struct.pack(">II", 1, 2) + preview
    ws_seen = [s for s in backend.seen if s.raw_path.startswith("/ws")]
    assert ws_seen and "Authorization" not in ws_seen[0].headers


async def test_websocket_needs_the_token(backend, front) -> None:
    server = await front(token=TOKEN)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(url(server, "/ws?clientId=x"))
        assert info.value.status == 401
    async with InstanceClient(url(server), "wrong") as client:
        with pytest.raises(InstanceError):
            async for _ in client.events("x", reconnect=False):
                pass


async def test_client_events_through_the_front_include_previews(backend, front) -> None:
    server = await front(token=TOKEN)
    prompt_server = backend.app[keys.PROMPT_SERVER]
    async with InstanceClient(url(server), TOKEN) as client:
        events = client.events("viewer")
        first = await asyncio.wait_for(anext(events), 10)
        assert first["type"] == "status"
        await prompt_server.send_bytes(1, struct.pack(">I", 1) + b"jpegbytes", "viewer")
        frame = await asyncio.wait_for(anext(events), 10)
        assert isinstance(frame, BinaryFrame)
        assert (frame.image_format, frame.image) == ("JPEG", b"jpegbytes")
        await events.aclose()


async def test_backend_closing_the_socket_closes_the_client_side(backend, front) -> None:
    server = await front()
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url(server, "/ws?clientId=gone")) as ws:
            await ws.receive_json(timeout=10)
            await backend.app[keys.PROMPT_SERVER].sockets["gone"].close(code=1001, message=b"bye")
            msg = await ws.receive(timeout=10)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


async def test_run_a_prompt_through_the_front(backend, front) -> None:
    server = await front(token=TOKEN)
    async with InstanceClient(url(server), TOKEN) as client:
        result = await client.run(tiny_graph("proxied"), timeout_s=30)
        assert result.ok, result.error
        images = result.outputs["2"]["images"]
        assert images[0]["filename"] == "proxied_00001_.png"
        assert [e["data"]["node"] for e in result.executed] == ["2"]
        data = await client.view(images[0]["filename"], images[0]["subfolder"], images[0]["type"])
        assert data.startswith(b"\x89PNG")
    assert (backend.data_dir / "output" / "proxied_00001_.png").exists()


async def test_restart_and_metrics_through_a_url_front(backend, front) -> None:
    server = await front(token=TOKEN)
    async with aiohttp.ClientSession(headers={"Authorization": TOKEN}) as http:
        async with http.post(url(server, "/api/restart")) as resp:  # the backend reloads itself
            assert resp.status == 200
            body = await resp.json()
            assert body["restarted"] is True and body["runtime"] == "embedded"
        async with http.get(url(server, "/queue")):
            pass
        async with http.get(url(server, "/metrics")) as resp:
            assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
            metrics = parse(await resp.text())
    assert kinds(metrics) == {"comfyserve_ready": "gauge", "comfyserve_proxied_requests": "counter",
                              "comfyserve_proxied_websockets": "counter", "comfyserve_backend_errors": "counter"}
    assert value(metrics, "comfyserve_ready") == 1
    assert value(metrics, "comfyserve_proxied_requests_total") == 2
    assert value(metrics, "comfyserve_backend_errors_total") == 0
    assert [s.raw_path for s in backend.seen if s.method == "POST"] == ["/api/restart"]


async def test_the_restart_button_is_added_to_comfyuis_web_ui(backend, front) -> None:
    server = await front(token=TOKEN)
    async with aiohttp.ClientSession(headers={"Authorization": TOKEN}) as http:
        async with http.get(url(server, "/api/extensions")) as resp:
            urls = await resp.json()
        assert urls.count("/extensions/comfyserve/restart.js") == 1
        async with http.get(url(server, "/extensions/comfyserve/restart.js")) as resp:
            assert resp.status == 200
            assert "Comfyserve.RestartServer" in await resp.text()
    assert [s.raw_path for s in backend.seen] == ["/extensions"]  # the script itself is ours


async def test_files_comfyui_serves_from_view_get_the_file_policy(front, aiohttp_server) -> None:
    """A real ComfyUI serves an uploaded SVG inline; through the front it is a download."""
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'

    async def view(request: web.Request) -> web.Response:
        name = request.query["filename"]
        kind = "image/svg+xml" if name.endswith(".svg") else "image/png"
        return web.Response(body=svg if kind == "image/svg+xml" else png_bytes(), content_type=kind,
                                    headers={"Content-Disposition": f'filename="{name}"'})

    comfyui = web.Application()
    comfyui.router.add_get("/view", view)
    comfyui.router.add_get("/api/view", view)
    upstream = await aiohttp_server(comfyui)
    server = await front(backend_url=str(upstream.make_url("")).rstrip("/"))
    async with aiohttp.ClientSession() as http:
        for path in ("/view", "/api/view"):
            async with http.get(url(server, f"{path}?filename=evil.svg&type=input")) as resp:
                assert resp.status == 200 and await resp.read() == svg
                assert resp.headers["Content-Type"] == "application/octet-stream"
                assert resp.headers["Content-Disposition"].startswith("attachment;")
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
                assert "sandbox" in resp.headers["Content-Security-Policy"]
            async with http.get(url(server, f"{path}?filename=ok.png")) as resp:
                assert resp.headers["Content-Type"] == "image/png"
                assert resp.headers["Content-Disposition"].startswith("inline;")
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
