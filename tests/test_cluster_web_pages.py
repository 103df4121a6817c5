"""Our pages of the cluster edition: the dashboard (times, place in line, node running, thumbnails,
live over Server-Sent Events) and the admin pages (non-admins get a 403 they can read)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from test_access_guard_editions import browser, cluster_login

from standard.guard import AccessPolicy
from support.access import EVIL_ORIGINS
from support.cluster import PASSWORD, graph
from support.server import install_gate_plugin, open_gate


async def login_as(session, url: str, name: str) -> None:  # type: ignore[no-untyped-def]
    resp = await session.post(url + "/login", data={"name": name, "password": PASSWORD, "next": "/"},
                              headers={"Origin": url}, allow_redirects=False)
    assert resp.status == 302


async def test_non_admin_browser_gets_an_html_403_with_a_way_back(start_cluster) -> None:
    cluster = await start_cluster(instances=0, users=("alice", "bob"), admin="alice")
    async with browser() as bob:
        await login_as(bob, cluster.url, "bob")
        resp = await bob.get(cluster.url + "/admin", headers={"Accept": "text/html,application/xhtml+xml"})
        assert resp.status == 403 and resp.content_type == "text/html"
        page = await resp.text()
        assert "Admins only" in page and 'id="back" href="/"' in page and "bob is not one" in page
        resp = await bob.get(cluster.url + "/admin", headers={"Accept": "application/json"})
        assert resp.status == 403 and (await resp.json())["error"]["type"] == "forbidden"
    async with cluster.http("bob") as script:
        assert (await script.get("/admin")).status == 403
        assert (await script.get("/admin")).content_type == "application/json"
    async with browser() as alice:
        assert (await cluster_login(alice, cluster.url)).status == 302
        assert (await alice.get(cluster.url + "/admin", headers={"Accept": "text/html"})).status == 200


async def next_tasks_event(stream) -> str:  # type: ignore[no-untyped-def]
    """The HTML of the next ``tasks`` event of the dashboard's stream."""
    lines: list[str] = []
    async for raw in stream.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("data: "):
            lines.append(line[len("data: "):])
        elif line == "" and lines:
            return "\n".join(lines)
    raise AssertionError("the stream ended")


async def test_dashboard_shows_place_node_times_and_thumbnails_live(start_cluster, data_dir: Path) -> None:
    install_gate_plugin(data_dir)
    cluster = await start_cluster(instances=1, users=("alice", "bob"))
    alice_api = cluster.user("alice")
    async with browser() as alice, browser() as bob:
        await login_as(alice, cluster.url, "alice")
        await login_as(bob, cluster.url, "bob")
        stream = await alice.get(cluster.url + "/dashboard/events")
        assert stream.status == 200 and stream.content_type == "text/event-stream"
        assert "Nothing queued." in await next_tasks_event(stream)
        first = await alice_api.submit(graph("slow", color=1, gate="slow"))  # held until the page showed it
        second = await alice_api.submit(graph("next", color=2))
        seen = ""
        while "2 · TestGate" not in seen or "#1 in line" not in seen:  # live: no reload
            seen = await next_tasks_event(stream)
        assert first[:8] in seen and second[:8] in seen
        assert re.search(r"since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", seen)
        open_gate(data_dir, "slow")
        while "No finished prompts yet." in seen or 'id="queue">Nothing queued.' not in seen:
            seen = await next_tasks_event(stream)
        assert 'src="/view?filename=slow_00001_.png&amp;subfolder=&amp;type=output"' in seen
        assert "success" in seen and "took " in seen
        for leak in ("None", "True", "False"):
            assert leak not in seen
        stream.close()
        page = await (await alice.get(cluster.url + "/dashboard", headers={"Accept": "text/html"})).text()
        thumbnail = re.search(r'<img src="([^"]+)"', page)
        assert thumbnail is not None
        image = await alice.get(cluster.url + thumbnail.group(1).replace("&amp;", "&"))
        assert image.status == 200 and image.content_type == "image/png"
        others = await (await bob.get(cluster.url + "/dashboard", headers={"Accept": "text/html"})).text()
        assert first[:8] not in others and "slow_00001_" not in others
        assert "your task" not in others


async def test_dashboard_stream_refuses_strangers(start_cluster) -> None:
    cluster = await start_cluster(instances=0, users=("alice",))
    async with cluster.http(None) as anonymous:
        assert (await anonymous.get("/dashboard/events")).status == 401
        assert (await anonymous.get("/dashboard/events", headers={"Authorization": "Bearer x"})).status == 401
    async with browser() as session:
        assert (await cluster_login(session, cluster.url)).status == 302
        for origin in EVIL_ORIGINS:
            resp = await session.get(cluster.url + "/dashboard/events", headers={"Origin": origin})
            assert resp.status == 403, origin


async def admin_form(session, url: str, action: str, form: dict[str, str]) -> tuple[int, str]:  # type: ignore
    page = await (await session.get(url + "/admin", headers={"Accept": "text/html"})).text()
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    resp = await session.post(url + action, data={**form, "csrf": csrf}, headers={"Origin": url})
    return resp.status, await resp.text()


async def test_an_unreachable_instance_url_is_refused(start_cluster) -> None:
    from standard.ports import free_port

    cluster = await start_cluster(instances=0, users=("root",), admin="root")
    dead = f"http://127.0.0.1:{free_port()}"
    async with browser() as root:
        await login_as(root, cluster.url, "root")
        status, page = await admin_form(root, cluster.url, "/admin/instances", {"url": dead})
        assert status == 400 and "is not a ready instance" in page
    assert dead not in cluster.pool.instances and await cluster.core.store.instance_urls() == []


async def test_removing_an_instance_hands_its_task_to_another(start_cluster, data_dir: Path) -> None:
    from support.wait import until

    install_gate_plugin(data_dir)
    cluster = await start_cluster(instances=2, users=("root", "alice"), admin="root")
    alice = cluster.user("alice")
    # Held at its gate (cut by an interrupt, as a sampler is) until the instance is removed.
    prompt_id = await alice.submit(graph("moved", color=5, gate="moved", interruptible=True))
    await until(lambda: any(i.task_id for i in cluster.pool.instances.values()), timeout_s=20)
    busy = next(i.url for i in cluster.pool.instances.values() if i.task_id)
    async with browser() as root:
        await login_as(root, cluster.url, "root")
        page = await (await root.get(cluster.url + "/admin", headers={"Accept": "text/html"})).text()
        assert "alice: " + prompt_id in page and "TestGate" in page  # whose task runs where
        status, page = await admin_form(root, cluster.url, "/admin/instances", {"url": busy, "action": "remove"})
        assert status == 200 and "runs again elsewhere" in page
    assert busy not in cluster.pool.instances
    open_gate(data_dir, "moved")
    await until(lambda: alice.history_entry(prompt_id), timeout_s=30, what="the handed-back task finished")
    entry = await alice.history_entry(prompt_id)
    assert entry["status"]["status_str"] == "success"
    assert any("removed by an admin" in note for note in entry["cluster"]["notes"])
    assert (cluster.user_dir("alice") / "output" / "moved_00001_.png").is_file()


async def test_draining_an_instance_lets_its_task_finish_there(start_cluster, data_dir: Path) -> None:
    from support.wait import until

    install_gate_plugin(data_dir)
    cluster = await start_cluster(instances=1, users=("root",), admin="root")
    root_api = cluster.user("root")
    prompt_id = await root_api.submit(graph("drained", color=6, gate="drained"))  # runs until the drain began
    await until(lambda: any(i.task_id for i in cluster.pool.instances.values()), timeout_s=20)
    url = next(iter(cluster.pool.instances))
    assert await cluster.core.remove_instance(url, drain=True)
    assert url in cluster.pool.instances and not cluster.pool.free()
    open_gate(data_dir, "drained")
    await until(lambda: url not in cluster.pool.instances, timeout_s=30)
    entry = await root_api.history_entry(prompt_id)
    assert entry is not None and entry["status"]["status_str"] == "success" and "cluster" not in entry


async def test_the_admin_grants_and_takes_back_the_admin_role(start_cluster) -> None:
    cluster = await start_cluster(instances=0, users=("root", "alice"), admin="root")
    async with browser() as root, browser() as alice:
        await login_as(root, cluster.url, "root")
        await login_as(alice, cluster.url, "alice")
        assert (await alice.get(cluster.url + "/admin")).status == 403
        status, page = await admin_form(root, cluster.url, "/admin/users", {"name": "alice", "action": "make-admin"})
        assert status == 200 and "alice is now an admin" in page
        assert (await alice.get(cluster.url + "/admin")).status == 401  # signed out: the role changed
        await login_as(alice, cluster.url, "alice")
        assert (await alice.get(cluster.url + "/admin")).status == 200
        status, page = await admin_form(root, cluster.url, "/admin/users", {"name": "alice", "action": "drop-admin"})
        assert status == 200 and "no longer an admin" in page
        status, page = await admin_form(root, cluster.url, "/admin/users", {"name": "root", "action": "drop-admin"})
        assert status == 400 and "you cannot drop-admin yourself" in page
    async with cluster.http("alice") as script:
        assert (await script.get("/admin")).status == 403


async def test_usage_per_user_matches_the_tasks_run(start_cluster) -> None:
    from support.metrics import parse, value

    cluster = await start_cluster(instances=2, users=("root", "alice", "bob"), admin="root")
    alice, bob = cluster.user("alice"), cluster.user("bob")
    await asyncio.gather(alice.run(graph("a1", color=11, seconds=0.3), timeout_s=30),
                         alice.run(graph("a2", color=12, seconds=0.3), timeout_s=30),
                         bob.run(graph("b1", color=13), timeout_s=30))
    done = {name: await cluster.core.store.user_tasks(name, "done") for name in ("alice", "bob")}
    expected = {name: round(sum(t.ended_ms - t.started_ms for t in tasks) / 1000, 1) for name, tasks in done.items()}
    async with cluster.http("alice") as alice_http:  # usage outlives the history its owner clears
        assert (await alice_http.post("/history", json={"clear": True})).status == 200
    async with cluster.http("root") as root:
        report = await (await root.get("/cluster/usage?days=1")).json()
        rows = {row["user"]: row for row in report["users"]}
        assert rows["alice"]["tasks"] == 2 and rows["bob"]["tasks"] == 1 and "root" not in rows
        assert rows["alice"]["failed"] == 0
        assert rows["alice"]["instance_seconds"] == expected["alice"] >= 0.6
        assert rows["bob"]["instance_seconds"] == expected["bob"]
        old = await (await root.get("/cluster/usage?since=2020-01-01&until=2020-01-31")).json()
        assert old["users"] == []
        scrape = parse(await (await root.get("/metrics")).text())
        assert value(scrape, "comfyserve_cluster_user_tasks_total", user="alice", status="success") == 2
        assert abs(value(scrape, "comfyserve_cluster_user_instance_seconds_total", user="alice")
                   - expected["alice"]) < 0.1
    async with browser() as session:
        await login_as(session, cluster.url, "root")
        page = await (await session.get(cluster.url + "/admin?days=30", headers={"Accept": "text/html"})).text()
        assert re.search(r"<td>alice</td><td>2</td><td>0</td><td>[0-9.]+</td>", page)
        assert '<option value="30" selected>' in page and "<title>Admin — comfyserve</title>" in page


@pytest.mark.parametrize("query", ["days=0", "days=-1", "days=abc", "days=99999", "since=2026-13-45",
                                   "since=" + "9" * 400, "since=2026-02-01&until=2026-01-01", "days=1e3"])
async def test_usage_refuses_unreadable_periods(start_cluster, query: str) -> None:
    cluster = await start_cluster(instances=0, users=("root",), admin="root")
    async with cluster.http("root") as root:
        resp = await root.get("/cluster/usage?" + query)
        assert resp.status == 400 and (await resp.json())["error"]["type"] == "invalid_request"


async def test_usage_and_metrics_are_for_admins_only(start_cluster) -> None:
    cluster = await start_cluster(instances=0, users=("root", "alice"), admin="root",
                                  access=AccessPolicy.build(allowed_hosts=["127.0.0.1"]))
    for path in ("/cluster/usage", "/metrics", "/api/cluster/usage"):
        async with cluster.http(None) as anonymous:
            assert (await anonymous.get(path)).status == 401
            assert (await anonymous.get(path, headers={"Authorization": "Bearer nope"})).status == 401
        async with cluster.http("alice") as alice:
            assert (await alice.get(path)).status == 403
        async with cluster.http("root") as root:
            assert (await root.get(path)).status == 200
            assert (await root.get(path, headers={"Host": "evil.example"})).status == 421
        async with browser() as session:
            await login_as(session, cluster.url, "root")
            for origin in EVIL_ORIGINS:
                assert (await session.get(cluster.url + path, headers={"Origin": origin})).status == 403


async def test_the_dashboard_stream_ends_when_the_proxy_drains(start_cluster) -> None:
    from standard.serving import drain_of

    cluster = await start_cluster(instances=0, users=("alice",))
    async with browser() as alice:
        await login_as(alice, cluster.url, "alice")
        stream = await alice.get(cluster.url + "/dashboard/events")
        assert "Nothing queued." in await next_tasks_event(stream)
        await drain_of(cluster.app).run(timeout_s=1.0)  # SIGTERM: an open stream must not hold the shutdown
        async with asyncio.timeout(10):
            assert await stream.content.read() == b""  # the server ended it
