"""Cluster edition: each user's files — uploads, /view, LoadImage, userdata, previews, any output node."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import aiohttp

from support.cluster import Cluster, files_under, graph, png_bytes
from support.server import is_done, next_json
from support.wait import until

TESTS_DIR = Path(__file__).resolve().parent

SILENT_SAVE_PLUGIN = '''
import os

import folder_paths


class TestSilentSave:
    """An output node that writes a file under its prefix and reports nothing."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "hello"}),
                             "filename_prefix": ("STRING", {"default": "notes/note"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def save(self, text, filename_prefix):
        path = os.path.join(folder_paths.get_output_directory(), filename_prefix + ".txt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(text)
        return {}


NODE_CLASS_MAPPINGS = {"TestSilentSave": TestSilentSave}
'''


async def _upload(http: aiohttp.ClientSession, name: str, data: bytes, **fields: str) -> aiohttp.ClientResponse:
    form = aiohttp.FormData()
    form.add_field("image", data, filename=name, content_type="image/png")
    for key, value in fields.items():
        form.add_field(key, value)
    return await http.post("/upload/image", data=form)


def _load_graph(image: str, prefix: str = "loaded") -> dict[str, Any]:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": image}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}


async def _prompt(http: aiohttp.ClientSession, prompt: dict[str, Any]) -> aiohttp.ClientResponse:
    return await http.post("/prompt", json={"prompt": prompt})


async def test_uploads_and_views_stay_in_the_users_folder(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=1)
    http_a, http_b = cluster.http("alice"), cluster.http("bob")
    response = await _upload(http_a, "cat.png", png_bytes(color=(1, 2, 3)), subfolder="pets")
    assert response.status == 200
    assert await response.json() == {"name": "cat.png", "subfolder": "pets", "type": "input"}
    assert files_under(cluster.user_dir("alice") / "input") == ["pets/cat.png"]
    assert files_under(cluster.data_dir / "input") == []
    view = {"filename": "cat.png", "subfolder": "pets", "type": "input"}
    assert (await http_a.get("/view", params=view)).status == 200
    assert (await http_b.get("/api/view", params=view)).status == 404
    # Traversal toward alice's file, every way round.
    for params in ({"filename": "../../alice/input/pets/cat.png", "type": "input"},
                   {"filename": "cat.png", "subfolder": "../../alice/input/pets", "type": "input"},
                   {"filename": "cat.png", "subfolder": "/etc", "type": "input"},
                   {"filename": "cat.png", "subfolder": "pets", "type": "../alice/input"}):
        response = await http_b.get("/view", params=params)
        assert response.status in (400, 403), params
    response = await _upload(http_b, "evil.png", png_bytes(), subfolder="../../alice/input")
    assert response.status == 400
    response = await _upload(http_b, "../evil.png", png_bytes())
    assert response.status == 400
    assert files_under(cluster.user_dir("alice") / "input") == ["pets/cat.png"]


async def test_upload_widgets_list_the_users_own_files(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=1)
    (cluster.data_dir / "input" / "shared.png").write_bytes(png_bytes())
    http_a, http_b = cluster.http("alice"), cluster.http("bob")
    await _upload(http_a, "cat.png", png_bytes(), subfolder="pets")
    choices_a = (await (await http_a.get("/object_info/LoadImage")).json())["LoadImage"]["input"]["required"]["image"]
    choices_b = (await (await http_b.get("/api/object_info")).json())["LoadImage"]["input"]["required"]["image"]
    assert choices_a[0] == ["pets/cat.png", "shared.png"] and choices_a[1]["image_upload"] is True
    assert choices_b[0] == ["shared.png"]


async def test_public_input_is_readable_by_everyone_but_not_writable(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=1)
    (cluster.data_dir / "input" / "shared.png").write_bytes(png_bytes(color=(9, 9, 9)))
    http_b = cluster.http("bob")
    assert (await http_b.get("/view", params={"filename": "shared.png", "type": "input"})).status == 200
    assert (await http_b.get("/view", params={"filename": "shared.png", "type": "output"})).status == 404
    response = await _prompt(http_b, _load_graph("shared.png"))
    assert response.status == 200
    bob = cluster.user("bob")
    prompt_id = (await response.json())["prompt_id"]
    await until(lambda: _history(bob, prompt_id))
    assert files_under(cluster.user_dir("bob") / "output") == ["loaded_00001_.png"]
    await _upload(http_b, "shared.png", png_bytes(color=(1, 1, 1)))
    assert (cluster.data_dir / "input" / "shared.png").read_bytes() == png_bytes(color=(9, 9, 9))


async def _history(client: Any, prompt_id: str) -> bool:
    return bool(await client.history(prompt_id))


async def test_loadimage_reads_the_users_own_file_and_nobody_elses(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=2)
    http_a, http_b = cluster.http("alice"), cluster.http("bob")
    await _upload(http_a, "cat.png", png_bytes(size=(5, 7), color=(250, 0, 0)), subfolder="pets")
    alice = cluster.user("alice")
    result = await alice.run(_load_graph("pets/cat.png"), timeout_s=30)
    assert result.ok, result.error
    assert files_under(cluster.user_dir("alice") / "output") == ["loaded_00001_.png"]
    assert files_under(cluster.data_dir / "input") == []  # the staged copy is gone
    # Bob names alice's file in every way he can think of: refused before anything runs.
    for value in ("pets/cat.png", "../users/alice/input/pets/cat.png", "../../users/alice/input/pets/cat.png",
                  "/etc/passwd", ".cluster/x/input/pets/cat.png", "loaded_00001_.png [output]",
                  "pets/cat.png [input]"):
        response = await _prompt(http_b, _load_graph(value))
        assert response.status == 400, value
        body = await response.json()
        assert body["error"]["type"] == "invalid_prompt"
        assert "1" in body["node_errors"]
    assert await cluster.user("bob").history() == {}
    # Alice may use her own output as an input.
    result = await alice.run(_load_graph("loaded_00001_.png [output]", "again"), timeout_s=30)
    assert result.ok, result.error


async def test_save_prefixes_cannot_leave_the_users_folder(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=1)
    http = cluster.http("bob")
    for prefix in ("../alice/output/x", "../../users/alice/output/x", "/tmp/x", ".cluster/abc/x"):
        response = await _prompt(http, graph(prefix))
        assert response.status == 400, prefix


async def test_any_output_node_writes_into_the_users_folder(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=1)
    (cluster.data_dir / "custom_nodes" / "silent_save.py").write_text(SILENT_SAVE_PLUGIN)
    for instance in cluster.instances:  # load the new plugin (process restart)
        assert (await instance_post(instance, "/restart")).status == 200
    cluster.pool._cache.clear()  # noqa: SLF001 (the next object_info must list it)
    alice = cluster.user("alice")
    result = await alice.run({"1": {"class_type": "TestSilentSave",
                                    "inputs": {"text": "alice's", "filename_prefix": "notes/note"}}}, timeout_s=30)
    assert result.ok, result.error
    assert (cluster.user_dir("alice") / "output" / "notes" / "note.txt").read_text() == "alice's"
    assert files_under(cluster.data_dir / "output") == []


async def instance_post(server: Any, path: str) -> aiohttp.ClientResponse:
    from support.cluster import INSTANCE_TOKEN

    async with aiohttp.ClientSession() as session:
        async with session.post(str(server.make_url(path)), headers={"Authorization": INSTANCE_TOKEN}) as response:
            await response.read()
            return response


async def test_previews_and_temp_files_reach_only_their_owner(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=1)
    shutil.copy(TESTS_DIR / "custom_nodes" / "progress_node.py", cluster.data_dir / "custom_nodes")
    for instance in cluster.instances:
        assert (await instance_post(instance, "/restart")).status == 200
    cluster.pool._cache.clear()  # noqa: SLF001
    http_a, http_b = cluster.http("alice"), cluster.http("bob")
    ws_a = await http_a.ws_connect("/ws?clientId=a")
    ws_b = await http_b.ws_connect("/ws?clientId=b")
    await next_json(ws_a)
    await next_json(ws_b)
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 4}},
              "2": {"class_type": "TestProgress", "inputs": {"image": ["1", 0], "steps": 3}},
              "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    response = await http_a.post("/prompt", json={"prompt": prompt, "client_id": "a"})
    prompt_id = (await response.json())["prompt_id"]
    binary = 0
    while True:
        msg = await ws_a.receive(timeout=20)
        if msg.type == aiohttp.WSMsgType.BINARY:
            assert msg.data[:4] == b"\x00\x00\x00\x01"
            binary += 1
            continue
        event = msg.json()
        if is_done(prompt_id)(event):
            break
        if event["type"] == "executed":
            preview = event["data"]["output"]["images"][0]
    assert binary >= 1
    assert preview["type"] == "temp"
    assert (await http_a.get("/view", params=preview)).status == 200
    assert (await http_b.get("/view", params=preview)).status == 404
    while True:  # bob's socket got no frame of alice's task
        try:
            msg = await ws_b.receive(timeout=0.3)
        except TimeoutError:
            break
        assert msg.type == aiohttp.WSMsgType.TEXT and prompt_id not in msg.data


async def test_userdata_and_settings_are_per_user(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=1)
    http_a, http_b = cluster.http("alice"), cluster.http("bob")
    assert (await http_a.post("/userdata/workflows%2Fmine.json", data=b'{"a": 1}')).status == 200
    assert (await http_a.post("/settings/Comfy.Theme", json="dark")).status == 200
    assert (await http_a.get("/userdata/workflows%2Fmine.json")).status == 200
    assert (await http_b.get("/userdata/workflows%2Fmine.json")).status == 404
    assert await (await http_b.get("/userdata?dir=workflows")).json() == []
    assert await (await http_a.get("/userdata?dir=workflows")).json() == ["mine.json"]
    assert await (await http_b.get("/settings")).json() == {}
    assert (await (await http_a.get("/settings")).json())["Comfy.Theme"] == "dark"
    for path in ("/userdata/..%2F..%2F..%2Falice%2Fuser%2Fdefault%2Fworkflows%2Fmine.json",
                 "/userdata/%2E%2E%2F%2E%2E%2Fsecret"):
        assert (await http_b.get(path)).status in (400, 403, 404), path
    assert files_under(cluster.user_dir("alice") / "user") == [
        "default/comfy.settings.json", "default/workflows/mine.json"]


async def test_nothing_without_a_login(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=1)
    anonymous = cluster.http(None)
    for method, path in (("POST", "/prompt"), ("GET", "/history"), ("GET", "/view?filename=x.png"),
                         ("GET", "/api/object_info"), ("GET", "/userdata?dir=workflows"), ("GET", "/ws"),
                         ("POST", "/upload/image"), ("GET", "/cluster/queue")):
        response = await anonymous.request(method, path, headers={"Accept": "application/json"})
        assert response.status == 401, path
    forged = aiohttp.ClientSession(base_url=cluster.url, headers={"Authorization": "Bearer forged-token"})
    cluster.sessions.append(forged)
    assert (await forged.get("/history")).status == 401
    assert (await anonymous.get("/healthz")).status == 200


async def test_another_sites_page_cannot_open_a_users_socket(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=1)
    http = cluster.http("alice")
    try:
        await http.ws_connect("/ws?clientId=x", headers={"Origin": "http://evil.example"})
    except aiohttp.WSServerHandshakeError as exc:
        assert exc.status == 403
    else:
        raise AssertionError("a cross-origin socket was accepted")
    ws = await http.ws_connect("/ws?clientId=x", headers={"Origin": cluster.url})
    await ws.close()


async def test_instances_are_not_reachable_through_the_proxy(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=1)
    http = cluster.http("alice")
    instance_url = str(cluster.instances[0].make_url("/history"))
    for path in ("/restart", f"/{instance_url}", "/api/internal/logs/raw"):
        response = await http.post(path) if path == "/restart" else await http.get(path)
        assert response.status in (200, 403, 404, 405), path  # /restart: for admins only
        assert "queue_running" not in await response.text()
    # An instance itself refuses anyone without the pool's token (users have none).
    async with aiohttp.ClientSession() as direct:
        response = await direct.get(instance_url, headers={"Authorization": f"Bearer {cluster.tokens['alice']}"})
        assert response.status == 401


async def test_outputs_continue_after_the_highest_counter_in_a_full_folder(start_cluster) -> None:
    """The user's folder already holds many ``x_NNNNN_.png``: each task's image lands past the highest
    (remembered, not walked name by name per task), and a name another proxy took is left alone."""
    cluster: Cluster = await start_cluster(instances=1, users=("alice",))
    output = cluster.user_dir("alice") / "output"
    output.mkdir(parents=True, exist_ok=True)
    for number in (1, *range(3, 501)):  # a gap at 2: the counter goes on after the highest, as ComfyUI's does
        (output / f"full_{number:05}_.png").write_bytes(b"older")
    alice = cluster.user("alice")

    async def one(color: int) -> str:
        result = await alice.run(graph("full", color=color), timeout_s=30)
        assert result.ok
        return (await alice.history_entry(result.prompt_id))["outputs"]["3"]["images"][0]["filename"]

    assert [await one(1), await one(2)] == ["full_00501_.png", "full_00502_.png"]
    (output / "full_00503_.png").write_bytes(b"another proxy's")
    assert await one(3) == "full_00504_.png"
    assert (output / "full_00503_.png").read_bytes() == b"another proxy's"
    assert not (output / "full_00002_.png").exists()
