"""``GET /comfyserve/me``: who the page is signed in as (the user menu of our frontend extension).

Who may call it: the signed-in user (session or API token) gets their own identity and nobody
else's; no credential or a wrong one gets 401; a page of another origin gets 403; a rebound
``Host`` gets 421.
"""

from __future__ import annotations

import aiohttp
import pytest
from test_access_guard_editions import browser, cluster_login

from standard.guard import AccessPolicy
from support.access import EVIL_ORIGINS
from support.backend import TOKEN

ME = "/api/comfyserve/me"


async def test_cluster_me_names_the_session_user_and_their_links(start_cluster) -> None:
    cluster = await start_cluster(instances=0, users=("alice", "bob"), admin="alice")
    async with browser() as alice:
        assert (await cluster_login(alice, cluster.url)).status == 302
        resp = await alice.get(cluster.url + ME, headers={"Origin": cluster.url})
        assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
        assert await resp.json() == {"name": "alice", "admin": True, "login": True, "links": {
            "dashboard": "/dashboard", "account": "/account", "logout": "/logout", "admin": "/admin"}}
    async with cluster.http("bob") as bob:
        body = await (await bob.get("/comfyserve/me")).json()
        assert body["name"] == "bob" and body["admin"] is False and "admin" not in body["links"]


async def test_cluster_me_refuses_strangers(start_cluster) -> None:
    cluster = await start_cluster(instances=0, users=("alice",),
                                  access=AccessPolicy.build(allowed_hosts=["comfy.lan", "127.0.0.1"]))
    async with cluster.http(None) as anonymous:
        assert (await anonymous.get(ME)).status == 401
        assert (await anonymous.get(ME, headers={"Authorization": "Bearer wrong"})).status == 401
        assert (await anonymous.get(ME, headers={"Accept": "text/html"}, allow_redirects=False)).status == 302
    async with cluster.http("alice") as alice:
        assert (await alice.get(ME, headers={"Host": "attacker.example"})).status == 421


@pytest.mark.parametrize("origin", EVIL_ORIGINS)
async def test_cluster_me_refuses_other_origins(start_cluster, origin: str) -> None:
    cluster = await start_cluster(instances=0, users=("alice",))
    async with browser() as session:
        assert (await cluster_login(session, cluster.url)).status == 302
        assert (await session.get(cluster.url + ME, headers={"Origin": origin})).status == 403


async def test_standard_me_says_whether_there_is_a_login(instance) -> None:
    client = await instance(token="secret-token")
    assert (await client.get(ME)).status == 401
    assert (await client.get(ME, headers={"Authorization": "Bearer wrong"})).status == 401
    resp = await client.get(ME, headers={"Authorization": "Bearer secret-token"})
    assert await resp.json() == {"name": None, "admin": True, "login": True, "links": {"logout": "/logout"}}
    for origin in EVIL_ORIGINS:
        resp = await client.get(ME, headers={"Authorization": "Bearer secret-token", "Origin": origin})
        assert resp.status == 403, origin


async def test_standard_me_without_token_has_no_login(instance) -> None:
    client = await instance()
    assert await (await client.get("/comfyserve/me")).json() == {"name": None, "admin": True, "login": False,
                                                                "links": {}}


async def test_the_front_of_real_comfyui_answers_me_itself(backend, front) -> None:
    server = await front(token=TOKEN)
    base = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession() as http:
        assert (await http.get(base + ME)).status == 401
        assert (await http.get(base + ME, headers={"Authorization": "Bearer wrong"})).status == 401
        resp = await http.get(base + ME, headers={"Authorization": f"Bearer {TOKEN}"})
        assert (await resp.json())["links"] == {"logout": "/logout"}
        urls = await (await http.get(base + "/api/extensions", headers={"Authorization": TOKEN})).json()
        assert "/extensions/comfyserve/identity.js" in urls
    assert [s.raw_path for s in backend.seen] == ["/extensions"]  # /comfyserve/me never reaches ComfyUI
