"""The admin pages refuse non-admins in the form the asker reads: a browser gets an HTML 403 page
with a way back, a script gets the JSON error."""

from __future__ import annotations

from test_access_guard_editions import browser, cluster_login

from support.cluster import PASSWORD


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
