"""Cluster edition: hostile input on the user routes gets a clear JSON 4xx and changes nothing."""

from __future__ import annotations

import json

import aiohttp
import pytest

from support.cluster import Cluster, files_under, graph, png_bytes

LONG = "a" * 300
DEEP = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


async def assert_json_400(response: aiohttp.ClientResponse) -> dict:
    assert response.status == 400, await response.text()
    body = await response.json()
    assert body["error"]["message"]
    return body


async def test_long_names_bad_forms_and_deep_json_are_400s(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=1)
    http = cluster.http("alice")
    before = files_under(cluster.data_dir)
    for method, url in (("GET", f"/view?filename={LONG}.png"), ("GET", f"/view?filename={LONG}.png&type=input"),
                        ("GET", f"/view?filename=x.png&subfolder={LONG}"), ("GET", f"/userdata/{LONG}.json"),
                        ("POST", f"/userdata/{LONG}.json"), ("GET", f"/userdata?dir={LONG}"),
                        ("GET", f"/view_metadata/checkpoints?filename={LONG}.safetensors"),
                        ("GET", f"/experiment/models/preview/checkpoints/0/{LONG}.safetensors")):
        await assert_json_400(await http.request(method, url, data=b"{}"))
    form = aiohttp.FormData()
    form.add_field("image", png_bytes(), filename=LONG + ".png", content_type="image/png")
    await assert_json_400(await http.post("/upload/image", data=form))
    await assert_json_400(await http.post("/upload/image", data=b"--x\r\n",
                                          headers={"Content-Type": "multipart/form-data"}))
    reply = await assert_json_400(await http.post("/prompt", data=DEEP))
    assert "nested deeper" in reply["error"]["details"]
    assert files_under(cluster.data_dir) == before


@pytest.mark.parametrize("number", [b"NaN", b"1e400", b'"inf"', b'"-inf"', b'"nan"'])
async def test_non_finite_numbers_are_refused_and_nothing_is_queued(start_cluster, number: bytes) -> None:
    cluster: Cluster = await start_cluster(instances=1)
    http = cluster.http("alice")
    body = b'{"prompt": ' + json.dumps(graph("n")).encode() + b', "number": ' + number + b"}"
    reply = await assert_json_400(await http.post("/prompt", data=body))
    assert reply["error"]["type"] == "invalid_prompt"
    assert await (await http.get("/queue")).json() == {"queue_running": [], "queue_pending": []}
    json.loads(await (await http.get("/history")).text(), parse_constant=lambda name: pytest.fail(name))


SVG = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(document.cookie)</script></svg>'


def assert_download(response: aiohttp.ClientResponse) -> None:
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["Content-Disposition"].startswith("attachment;")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "sandbox" in response.headers["Content-Security-Policy"]


async def test_svg_is_a_download_in_the_users_folder_and_the_shared_input(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=1)
    http = cluster.http("alice")
    form = aiohttp.FormData()
    form.add_field("image", SVG, filename="mine.svg", content_type="image/svg+xml")
    assert (await http.post("/upload/image", data=form)).status == 200
    assert_download(await http.get("/view", params={"filename": "mine.svg", "type": "input"}))
    (cluster.data_dir / "input" / "shared.html").write_bytes(SVG)
    assert_download(await http.get("/api/view", params={"filename": "shared.html", "type": "input"}))
    (cluster.data_dir / "input" / "shared.png").write_bytes(png_bytes())
    shared_png = await http.get("/view", params={"filename": "shared.png", "type": "input"})
    assert shared_png.headers["Content-Type"] == "image/png"
    assert shared_png.headers["Content-Disposition"].startswith("inline;")
    assert shared_png.headers["X-Content-Type-Options"] == "nosniff"


async def test_forms_without_a_boundary_are_400s(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=0, admin="alice")
    async with aiohttp.ClientSession(base_url=cluster.url) as anonymous:
        await assert_json_400(await anonymous.post("/login", data=b"--x\r\n",
                                                   headers={"Content-Type": "multipart/form-data"}))
    http = cluster.http("alice")
    for route in ("/admin/users", "/admin/instances"):
        await assert_json_400(await http.post(route, data=b"--x\r\n",
                                              headers={"Content-Type": "multipart/form-data"}))
