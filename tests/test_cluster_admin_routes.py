"""The admin page's form routes (``POST /admin/users``, ``POST /admin/instances``): who may call them,
and hostile input (bad or huge instance URLs, control characters, long names) answered with a clear 4xx."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import pytest
from test_access_guard_editions import browser
from test_cluster_store import _task, store  # noqa: F401 (the store fixture: SQLite and Redis)

from cluster_proxy.app import ACCOUNTS_KEY
from cluster_proxy.store import now_ms
from standard.guard import AccessPolicy
from support.access import EVIL_ORIGINS
from support.cluster import PASSWORD, graph
from support.wait import until

FORMS = (("/admin/users", {"action": "make-admin", "name": "alice"}),
         ("/admin/users", {"action": "remove", "name": "alice"}),
         ("/admin/instances", {"action": "add", "url": "http://127.0.0.1:9"}),
         ("/admin/instances", {"action": "drain", "url": "http://127.0.0.1:9"}))


async def login_as(session: aiohttp.ClientSession, url: str, name: str) -> None:
    resp = await session.post(url + "/login", data={"name": name, "password": PASSWORD, "next": "/"},
                              headers={"Origin": url}, allow_redirects=False)
    assert resp.status == 302


async def csrf_of(session: aiohttp.ClientSession, url: str) -> str:
    page = await (await session.get(url + "/admin", headers={"Accept": "text/html"})).text()
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, page[:300]
    return found.group(1)


async def unchanged(cluster: Any) -> None:
    """Nothing the refused forms named happened: alice is a plain user and no instance came or went."""
    alice = await cluster.app[ACCOUNTS_KEY].get("alice")
    assert alice is not None and not alice.is_admin
    assert list(cluster.pool.instances) == [str(s.make_url("")).rstrip("/") for s in cluster.instances]
    assert await cluster.core.store.instance_urls() == []


@pytest.mark.parametrize(("path", "form"), FORMS)
async def test_admin_forms_refuse_everyone_but_an_admins_own_page(start_cluster, path: str,
                                                                  form: dict[str, str]) -> None:
    cluster = await start_cluster(instances=1, users=("root", "alice"), admin="root",
                                  access=AccessPolicy.build(allowed_hosts=["127.0.0.1"]))
    async with cluster.http(None) as anonymous:
        assert (await anonymous.post(path, data=form)).status == 401
        assert (await anonymous.post(path, data=form, headers={"Authorization": "Bearer nope"})).status == 401
    async with cluster.http("alice") as alice:  # a user, with the right form
        resp = await alice.post(path, data=form)
        assert resp.status == 403 and (await resp.json())["error"]["type"] == "forbidden"
    async with cluster.http("root") as script:  # an admin's token: no page, so no CSRF value to send
        resp = await script.post(path, data={**form, "csrf": "x"})
        assert resp.status == 403 and "CSRF" in (await resp.json())["error"]["message"]
    async with browser() as root:
        await login_as(root, cluster.url, "root")
        csrf = await csrf_of(root, cluster.url)
        for origin in EVIL_ORIGINS:  # a page elsewhere posting with the admin's cookie
            resp = await root.post(cluster.url + path, data={**form, "csrf": csrf}, headers={"Origin": origin})
            assert resp.status == 403, origin
        resp = await root.post(cluster.url + path, data={**form, "csrf": csrf[:-2] + "00"},
                               headers={"Origin": cluster.url})
        assert resp.status == 403  # a forged CSRF value
        resp = await root.post(cluster.url + path, data={**form, "csrf": csrf},
                               headers={"Origin": "http://evil.example", "Host": "evil.example"})
        assert resp.status == 421  # a rebound DNS name
    await unchanged(cluster)


HOSTILE_URLS = ("", "http://", "https://", "http://:80", "http:///x", "http://[::1", "http://host:99999",
                "http://host:-1", "http://a b.example", "http://\x00host", "http://host\r\nX-Evil: 1",
                "http://user:pw@127.0.0.1:9", "file:///etc/passwd", "javascript:alert(1)", "ftp://host",
                "http://" + "a" * 5000 + ".example", "http://127.0.0.1:9/" + "p" * 20000, "\x1b[31mhttp://x")


@pytest.mark.parametrize("url", HOSTILE_URLS, ids=lambda u: repr(u[:30]))
async def test_hostile_instance_urls_get_a_clear_400(start_cluster, url: str) -> None:
    cluster = await start_cluster(instances=1, users=("root", "alice"), admin="root")
    async with browser() as root:
        await login_as(root, cluster.url, "root")
        csrf = await csrf_of(root, cluster.url)
        for action in ("add", "remove", "drain"):
            resp = await root.post(cluster.url + "/admin/instances", data={"action": action, "url": url, "csrf": csrf},
                                   headers={"Origin": cluster.url, "Accept": "text/html"})
            page = await resp.text()
            assert resp.status == 400, (action, resp.status, page[-400:])
            notice = re.search(r'<p class="notice" role="status">([^<]*)</p>', page)
            assert notice and len(notice.group(1)) < 400, action  # said, and short: never the whole input back
            assert "\x00" not in page and "\x1b" not in page and "X-Evil" not in resp.headers
    await unchanged(cluster)


@pytest.mark.parametrize("name", ["", "x" * 5000, "alice\x00", "alice\r\nX-Evil: 1", "../root", "<b>bob</b>",
                                  "\u202ealice"], ids=lambda n: repr(n[:20]))
async def test_hostile_user_names_get_a_clear_400(start_cluster, name: str) -> None:
    cluster = await start_cluster(instances=1, users=("root", "alice"), admin="root")
    async with browser() as root:
        await login_as(root, cluster.url, "root")
        csrf = await csrf_of(root, cluster.url)
        for action in ("make-admin", "drop-admin", "disable", "enable", "reset-token", "remove", "passwd", "add"):
            resp = await root.post(cluster.url + "/admin/users",
                                   data={"action": action, "name": name, "password": "long enough pw", "csrf": csrf},
                                   headers={"Origin": cluster.url, "Accept": "text/html"})
            page = await resp.text()
            assert resp.status == 400, (action, resp.status, page[-400:])
            assert "<b>bob</b>" not in page and "\x00" not in page and "X-Evil" not in resp.headers
        resp = await root.post(cluster.url + "/admin/users", data={"action": "x" * 5000, "name": "alice",
                                                                   "csrf": csrf}, headers={"Origin": cluster.url})
        assert resp.status == 400
    await unchanged(cluster)
    assert {u.name for u in await cluster.app[ACCOUNTS_KEY].list()} == {"alice", "root"}


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_usage_counts_the_instance_time_of_a_handed_back_attempt(start_cluster, request, backend: str) -> None:
    settings = {"redis_url": request.getfixturevalue("redis_url")} if backend == "redis" else {}
    cluster = await start_cluster(instances=2, users=("root", "alice"), admin="root", **settings)
    alice = cluster.user("alice")
    prompt_id = await alice.submit(graph("billed", color=31, seconds=30.0))
    await until(lambda: any(i.task_id for i in cluster.pool.instances.values()), timeout_s=20)
    busy = next(i for i in cluster.pool.instances.values() if i.task_id)
    first = await cluster.core.store.get("alice", prompt_id)
    assert first is not None and first.started_ms is not None
    # The condition measured: the first attempt has held its instance for at least a second.
    await until(lambda: now_ms() - first.started_ms >= 1000, timeout_s=10)
    removed_at_ms = now_ms()
    assert await cluster.core.remove_instance(busy.url, drain=False)
    await until(lambda: any(run.task.prompt_id == prompt_id and run.last_node == "2"  # sleeping elsewhere now
                            for run in cluster.core.runs.values()), timeout_s=20)
    await alice.interrupt(prompt_id)  # the second attempt need not sleep 30 s
    await until(lambda: alice.history_entry(prompt_id), timeout_s=30)
    done = await cluster.core.store.get("alice", prompt_id)
    assert done is not None and done.ended_ms is not None and done.started_ms is not None
    at_least_ms = (removed_at_ms - first.started_ms) + (done.ended_ms - done.started_ms)
    async with cluster.http("root") as root:
        report = await (await root.get("/cluster/usage?days=1")).json()
    row = next(r for r in report["users"] if r["user"] == "alice")
    assert row["tasks"] == 1 and row["instance_seconds"] >= round(at_least_ms / 1000, 1)


async def test_a_finish_and_its_usage_are_one_write(store) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """Nothing but ``finish``: a proxy dying right after it must not lose the task's usage."""
    task = _task("alice", "p1", 1)
    assert await store.add(task)
    assert await store.claim(task.id, "http://a:1", "proxy") is not None
    assert await store.requeue(task.id, "handed back: test") is not None
    claimed = await store.claim(task.id, "http://b:2", "proxy")
    assert claimed is not None and claimed.earlier_attempts_ms >= 0
    done = await store.finish(task.id, {"outputs": {}, "status": {"status_str": "success"}, "meta": {}})
    assert done is not None
    [usage] = await store.usage(0, now_ms() + 1)
    assert (usage.task_id, usage.user, usage.status) == (task.id, "alice", "success")
    assert usage.instance_ms == done.earlier_attempts_ms + done.ended_ms - done.started_ms
    assert await store.finish(task.id, {}) is None and len(await store.usage(0, now_ms() + 1)) == 1


async def test_sibling_proxies_follow_the_admins_instance_list(start_cluster, aiohttp_server, redis_url: str) -> None:
    """Two proxies on one Redis: an instance an admin adds or removes on one joins or leaves the other too."""
    from cluster_proxy.app import create_cluster_app
    from cluster_proxy.keys import CORE, POOL
    from cluster_proxy.settings import ClusterSettings
    from standard.server.app import create_embedded_app
    from standard.settings import StandardSettings
    from support.cluster import INSTANCE_TOKEN

    first = await start_cluster(instances=1, users=("root", "alice"), admin="root", redis_url=redis_url)
    fixed = next(iter(first.pool.instances))
    sibling = await aiohttp_server(await create_cluster_app(ClusterSettings(
        data_dir=first.data_dir, instance_urls=(fixed,), instance_token=INSTANCE_TOKEN, health_interval_s=0.2,
        instance_lost_s=1.0, redis_url=redis_url)))
    other_pool = sibling.app[POOL]
    extra = await aiohttp_server(create_embedded_app(StandardSettings(data_dir=first.data_dir, token=INSTANCE_TOKEN)))
    url = str(extra.make_url("")).rstrip("/")
    await first.core.add_instance(url)
    await until(lambda: url in other_pool.instances and other_pool.instances[url].state == "up", timeout_s=15,
                what="the sibling took the added instance")
    assert await first.core.remove_instance(url, drain=False)
    await until(lambda: url not in other_pool.instances, timeout_s=15, what="the sibling let the instance go")
    assert fixed in other_pool.instances and fixed in first.pool.instances  # --instance-url ones stay
    assert sibling.app[CORE].fixed_urls == {fixed}


async def test_the_admin_page_shows_usage_for_chosen_dates(start_cluster) -> None:
    import time

    cluster = await start_cluster(instances=1, users=("root", "alice"), admin="root")
    await cluster.user("alice").run(graph("dated", color=41), timeout_s=30)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    async with browser() as root:
        await login_as(root, cluster.url, "root")

        async def page(query: str) -> tuple[int, str]:
            resp = await root.get(f"{cluster.url}/admin?{query}", headers={"Accept": "text/html"})
            return resp.status, await resp.text()

        status, html = await page("days=7&since=2020-01-01&until=2020-01-31")
        assert status == 200 and "2020-01-01 to 2020-01-31 (UTC)" in html and "No task finished" in html
        assert 'name="since" type="date" value="2020-01-01"' in html
        assert 'href="/cluster/usage?since=2020-01-01&amp;until=2020-01-31"' in html
        status, html = await page(f"days=7&since={today}&until=")
        assert status == 200 and re.search(r"<td>alice</td><td>1</td><td>0</td>", html)
        status, html = await page("since=%3Cscript%3Ealert(1)%3C/script%3E")
        assert status == 400 and "<script>alert" not in html and "a date is YYYY-MM-DD" in html


async def test_removing_an_instance_waits_for_the_result_its_last_task_left_there(start_cluster, aiohttp_server,
                                                                                   data_dir) -> None:
    """The end-of-prompt marker frees an instance before the proxy reads the task's history from it: an
    admin's removal in that moment must wait for the read (it closed the connection: the task failed)."""
    import asyncio

    from aiohttp import web

    from standard.server.app import create_embedded_app
    from standard.settings import StandardSettings
    from support.cluster import INSTANCE_TOKEN, write_sleep_plugin

    write_sleep_plugin(data_dir)
    cluster_box: list[Any] = []
    window, gate = asyncio.Event(), asyncio.Event()

    @web.middleware
    async def hold_history_reads(request: web.Request, handler: Any) -> Any:
        """Hold the proxy's history read once the task freed the instance (the window an admin may hit)."""
        if request.path.startswith("/history/") and cluster_box:
            instance = next(iter(cluster_box[0].pool.instances.values()))
            if instance.task_id is None and cluster_box[0].core.runs:
                window.set()
                await gate.wait()
        return await handler(request)

    app = create_embedded_app(StandardSettings(data_dir=data_dir, token=INSTANCE_TOKEN))
    app.middlewares.append(hold_history_reads)
    server = await aiohttp_server(app)
    url = str(server.make_url("")).rstrip("/")
    cluster = await start_cluster(instances=0, users=("root", "alice"), admin="root", instance_urls=(url,))
    cluster_box.append(cluster)
    alice = cluster.user("alice")
    prompt_id = await alice.submit(graph("last", color=51, seconds=0.2))
    async with asyncio.timeout(30):
        await window.wait()
    assert await cluster.core.remove_instance(url, drain=False)
    assert url in cluster.pool.instances  # not yet: the result is still being read
    gate.set()
    await until(lambda: url not in cluster.pool.instances, timeout_s=30, what="the instance left")
    entry = await alice.history_entry(prompt_id)
    assert entry is not None and entry["status"]["status_str"] == "success", entry
    assert (cluster.user_dir("alice") / "output" / "last_00001_.png").is_file()
