"""Cluster edition: each user's ComfyUI API through the proxy, over a pool of real instances."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from support.cluster import Cluster, files_under, graph, png_bytes
from support.server import events_until, install_gate_plugin, is_done, next_json, open_gate, prompt_uuid
from support.wait import until


async def test_two_users_run_prompts_and_see_only_their_own(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=2)
    alice, bob = cluster.user("alice"), cluster.user("bob")
    result_a, result_b = await asyncio.gather(
        alice.run(graph("mine", color=1), timeout_s=30), bob.run(graph("mine", color=2), timeout_s=30))
    assert result_a.ok and result_b.ok
    image_a = result_a.outputs["3"]["images"][0]
    assert image_a == {"filename": "mine_00001_.png", "subfolder": "", "type": "output"}
    assert files_under(cluster.user_dir("alice") / "output") == ["mine_00001_.png"]
    assert files_under(cluster.user_dir("bob") / "output") == ["mine_00001_.png"]
    assert files_under(cluster.data_dir / "output") == []  # nothing left in the shared folder
    # Each user's pixels are their own.
    assert await alice.view("mine_00001_.png") != await bob.view("mine_00001_.png")
    history_a, history_b = await alice.history(), await bob.history()
    assert list(history_a) == [result_a.prompt_id] and list(history_b) == [result_b.prompt_id]
    assert await bob.history(result_a.prompt_id) == {}
    queue = await alice.queue()
    assert queue == {"queue_running": [], "queue_pending": []}


async def test_event_socket_declines_permessage_deflate(start_cluster) -> None:
    """Offered deflate (as browsers do), /ws answers plain frames: closed sockets keep no zlib state alive."""
    cluster: Cluster = await start_cluster(instances=1)
    ws = await cluster.http("alice").ws_connect("/ws?clientId=tab", compress=15)
    assert (await next_json(ws))["type"] == "status"
    assert ws.compress == 0
    await ws.close()


async def test_events_reach_only_the_owner_with_the_users_own_ids(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=1)
    http_a, http_b = cluster.http("alice"), cluster.http("bob")
    ws_a = await http_a.ws_connect("/ws?clientId=tab-a")
    ws_b = await http_b.ws_connect("/ws?clientId=tab-b")
    assert (await next_json(ws_a))["data"]["sid"] == "tab-a"
    assert (await next_json(ws_b))["data"]["sid"] == "tab-b"
    own_id = prompt_uuid("my-own-id")
    response = await http_a.post("/prompt", json={"prompt": graph("e", color=3), "client_id": "tab-a",
                                                  "prompt_id": own_id})
    assert response.status == 200
    assert (await response.json())["prompt_id"] == own_id
    events = await events_until(ws_a, is_done(own_id))
    kinds = [e["type"] for e in events]
    assert {"execution_start", "executing", "executed", "execution_success"} <= set(kinds)
    executed = next(e for e in events if e["type"] == "executed")
    assert executed["data"]["output"]["images"][0]["subfolder"] == ""
    assert "progress_state" in kinds
    for event in events:
        assert "cluster-" not in str(event) and ".cluster/" not in str(event)
        if isinstance(event["data"], dict) and "prompt_id" in event["data"]:
            assert event["data"]["prompt_id"] == own_id
        if event["type"] == "progress_state":  # each node's state names the prompt too
            assert {n["prompt_id"] for n in event["data"]["nodes"].values()} == {own_id}
    # Bob saw nothing of it but his own status.
    # Bob's socket is ordered: anything of alice's sent to him would come before his own prompt's events.
    bobs_marker = prompt_uuid("bobs-marker")
    response = await http_b.post("/prompt", json={"prompt": graph("b", color=4), "client_id": "tab-b",
                                                  "prompt_id": bobs_marker})
    assert response.status == 200
    for event in await events_until(ws_b, is_done(bobs_marker)):
        assert own_id not in str(event)
        if isinstance(event["data"], dict) and "prompt_id" in event["data"]:
            assert event["data"]["prompt_id"] == bobs_marker


async def test_prompt_answers_a_canonical_uuid_and_an_integer_number_as_comfyui(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=1)
    http = cluster.http("alice")
    first = await (await http.post("/prompt", json={"prompt": graph("n1", color=1)})).json()
    second = await (await http.post("/prompt", json={"prompt": graph("n2", color=2), "front": True})).json()
    for body in (first, second):
        assert str(uuid.UUID(body["prompt_id"])) == body["prompt_id"]  # hyphenated, lowercase
        assert type(body["number"]) is int
    assert second["number"] == -(first["number"] + 1)
    refused = await http.post("/prompt", json={"prompt": graph("n3", color=3), "prompt_id": "my-own-id"})
    assert refused.status == 400 and (await refused.json())["error"]["type"] == "invalid_prompt_id"


async def test_partial_execution_targets_run_only_those_outputs(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=1)
    two_outputs = {**graph("wanted", color=5),
                   "4": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "skipped"}}}
    response = await cluster.http("alice").post("/prompt", json={"prompt": two_outputs,
                                                                 "partial_execution_targets": ["3"]})
    assert response.status == 200
    prompt_id = (await response.json())["prompt_id"]
    await until(lambda: _has_history(cluster.user("alice"), prompt_id))
    assert files_under(cluster.user_dir("alice") / "output") == ["wanted_00001_.png"]


async def test_the_same_prompt_id_for_two_users_is_two_tasks(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=1)
    for name, color in (("alice", 10), ("bob", 20)):
        response = await cluster.http(name).post("/prompt", json={"prompt": graph("s", color=color),
                                                                  "prompt_id": prompt_uuid("same")})
        assert response.status == 200
    alice, bob = cluster.user("alice"), cluster.user("bob")
    await until(lambda: _has_history(alice, prompt_uuid("same")))
    await until(lambda: _has_history(bob, prompt_uuid("same")))
    assert files_under(cluster.user_dir("alice") / "output") == ["s_00001_.png"]
    assert files_under(cluster.user_dir("bob") / "output") == ["s_00001_.png"]


async def _has_history(client, prompt_id: str) -> bool:
    return bool(await client.history(prompt_id))


async def test_outputs_of_repeated_runs_get_fresh_names_and_subfolders_stay(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=2)
    alice = cluster.user("alice")
    results = [await alice.run(graph("shots/pic", color=i), timeout_s=30) for i in range(3)]
    names = [r.outputs["3"]["images"][0] for r in results]
    assert [n["filename"] for n in names] == ["pic_00001_.png", "pic_00002_.png", "pic_00003_.png"]
    assert {n["subfolder"] for n in names} == {"shots"}
    assert files_under(cluster.user_dir("alice") / "output") == [
        "shots/pic_00001_.png", "shots/pic_00002_.png", "shots/pic_00003_.png"]
    history = await alice.history(results[2].prompt_id)
    assert history[results[2].prompt_id]["outputs"]["3"]["images"][0]["filename"] == "pic_00003_.png"
    assert await alice.view("pic_00003_.png", "shots")


async def test_work_spreads_over_the_instances(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=2)
    alice, bob = cluster.user("alice"), cluster.user("bob")
    runs = [alice.run(graph("w", color=i, seconds=0.3), timeout_s=30) for i in range(2)]
    runs += [bob.run(graph("w", color=10 + i, seconds=0.3), timeout_s=30) for i in range(2)]
    results = await asyncio.gather(*runs)
    assert all(r.ok for r in results)
    assert all(i.tasks_run >= 1 for i in cluster.pool.instances.values())


async def test_the_frontend_data_routes_come_from_the_pool(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=1)
    http = cluster.http("alice")
    info = await (await http.get("/api/object_info")).json()
    assert "SaveImage" in info and "TestSleep" in info
    one = await (await http.get("/object_info/EmptyImage")).json()
    assert list(one) == ["EmptyImage"]
    assert "checkpoints" in await (await http.get("/models")).json()
    assert await (await http.get("/embeddings")).json() == []
    assert (await http.get("/system_stats")).status == 200
    assert (await http.get("/api/features")).status == 200
    logs = await (await http.get("/internal/logs/raw")).json()
    assert logs["entries"] == []


async def test_a_bad_graph_is_refused_with_comfyuis_errors(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=1)
    http = cluster.http("alice")
    unknown = await http.post("/prompt", json={"prompt": {"1": {"class_type": "KSamplerX", "inputs": {}}}})
    assert unknown.status == 400
    body = await unknown.json()
    assert body["error"]["type"] == "invalid_prompt" and "KSamplerX" in body["error"]["message"]
    no_outputs = await http.post("/prompt", json={"prompt": {"1": graph()["1"]}})
    assert (await no_outputs.json())["error"]["type"] == "prompt_no_outputs"
    assert (await http.post("/prompt", json={"nothing": 1})).status == 400
    # Inputs are checked as ComfyUI does: 400 with node_errors the frontend paints on the nodes.
    bad = graph("x")
    bad["1"]["inputs"]["width"] = "wide"
    response = await http.post("/prompt", json={"prompt": bad})
    assert response.status == 400
    body = await response.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["1"]["errors"][0]["type"] == "invalid_input_type"
    # A user's own upload validates; a file they do not have does not.
    load = {"1": {"class_type": "LoadImage", "inputs": {"image": "mine.png"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "l"}}}
    (cluster.user_dir("alice") / "input" / "mine.png").write_bytes(png_bytes())
    assert (await http.post("/prompt", json={"prompt": load})).status == 200


async def test_without_local_validation_the_instance_reports_the_error(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=1, local_validation=False)
    http = cluster.http("alice")
    bad = graph("x")
    bad["1"]["inputs"]["width"] = "wide"
    response = await http.post("/prompt", json={"prompt": bad})
    assert response.status == 200
    prompt_id = (await response.json())["prompt_id"]
    alice = cluster.user("alice")
    await until(lambda: _has_history(alice, prompt_id))
    entry = (await alice.history(prompt_id))[prompt_id]
    assert entry["status"]["status_str"] == "error"


async def test_the_dashboard_shows_my_queue_history_and_the_pool(start_cluster) -> None:
    import aiohttp

    from support.cluster import PASSWORD

    cluster: Cluster = await start_cluster(instances=1)
    alice = cluster.user("alice")
    done = await alice.run(graph("d", color=42), timeout_s=30)
    bob_done = await cluster.user("bob").run(graph("d", color=43), timeout_s=30)
    session = aiohttp.ClientSession(base_url=cluster.url, cookie_jar=aiohttp.CookieJar(unsafe=True))
    cluster.sessions.append(session)
    response = await session.post("/login", data={"name": "alice", "password": PASSWORD, "next": "/dashboard"},
                                  headers={"Origin": cluster.url})
    assert response.status == 200 and response.url.path == "/dashboard"
    page = await response.text()
    assert done.prompt_id in page
    assert bob_done.prompt_id not in page
    assert next(iter(cluster.pool.instances)) not in page and "instance 1" in page  # URLs: admins only


async def test_three_users_two_instances_each_sees_only_their_own(start_cluster) -> None:
    """Work spreads over both instances; files and history stay with their owner."""
    users = ("ann", "ben", "cat")
    cluster: Cluster = await start_cluster(instances=2, users=users)
    clients = {name: cluster.user(name) for name in users}
    results = await asyncio.gather(*(
        clients[name].run(graph(name, color=10 * n + i, seconds=0.2), timeout_s=30)
        for n, name in enumerate(users) for i in range(2)))
    assert all(r.ok for r in results)
    assert all(i.tasks_run >= 2 for i in cluster.pool.instances.values())
    for name in users:
        assert files_under(cluster.user_dir(name) / "output") == [f"{name}_00001_.png", f"{name}_00002_.png"]
        history = await clients[name].history()
        assert len(history) == 2
        assert all(entry["prompt"][2]["3"]["inputs"]["filename_prefix"] == name for entry in history.values())


async def test_a_reconnecting_page_sees_its_running_task_again(start_cluster, data_dir: Path) -> None:
    install_gate_plugin(data_dir)
    cluster: Cluster = await start_cluster(instances=1)
    http = cluster.http("alice")
    ws = await http.ws_connect("/ws?clientId=tab")
    await next_json(ws)
    response = await http.post("/prompt", json={"prompt": graph("r", color=8, gate="r"), "client_id": "tab"})
    prompt_id = (await response.json())["prompt_id"]
    await events_until(ws, lambda e: e["type"] == "executing" and e["data"].get("node") == "2")
    await ws.close()  # the page reloads
    ws = await http.ws_connect("/ws?clientId=tab")
    status = await next_json(ws)
    assert status["data"]["status"]["exec_info"]["queue_remaining"] == 1
    again = await next_json(ws)
    while again["type"] in ("cluster_queue", "status"):  # broadcasts may come between the replayed events
        again = await next_json(ws)
    assert again == {"type": "executing", "data": {"node": "2", "prompt_id": prompt_id}}
    queue = await (await http.get("/queue")).json()
    assert [item[1] for item in queue["queue_running"]] == [prompt_id]
    open_gate(data_dir, "r")  # it ran on all along
    events = await events_until(ws, is_done(prompt_id))
    assert "execution_success" in [e["type"] for e in events]
