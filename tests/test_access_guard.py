"""Who may call what: Host, Origin, cookies, wrong-token slow-down, login redirects.

Through a real instance on loopback (embedded engine and the real-ComfyUI
gateway on both of its sites), the cluster proxy, the API front and the queue.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from standard.auth import SESSION_COOKIE
from standard.guard import HOST_ANSWERS_MAX, AccessPolicy
from standard.server.app import create_embedded_app
from standard.settings import StandardSettings
from support.access import BAD_NEXTS, EVIL_ORIGINS

TOKEN = "a-long-enough-service-token"


def origin_of(client: Any) -> str:
    return str(client.make_url("/")).rstrip("/")


async def login_cookie(client: Any) -> None:
    resp = await client.post("/login", data={"token": TOKEN, "next": "/queue"}, allow_redirects=False,
                             headers={"Origin": origin_of(client)})
    assert resp.status == 302 and SESSION_COOKIE in resp.cookies


# -- no token: only the network protects the server ------------------------------------------------------


@pytest.mark.parametrize("origin", EVIL_ORIGINS)
async def test_without_token_opaque_and_foreign_origins_are_refused(instance, origin: str) -> None:
    client = await instance()
    for method, path, body in (("POST", "/prompt", {"prompt": {}}), ("POST", "/queue", {"clear": True}),
                               ("GET", "/queue", None)):
        resp = await client.request(method, path, json=body, headers={"Origin": origin})
        assert resp.status == 403, (method, path)
        assert (await resp.json())["error"]["type"] == "forbidden"
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/ws?clientId=x", headers={"Origin": origin})
    assert info.value.status == 403


async def test_without_token_a_rebound_host_is_refused(instance) -> None:
    """A DNS-rebinding page is same-origin with itself: Host is what gives it away."""
    client = await instance()
    rebound = f"attacker.example:{client.port}"
    page = {"Host": rebound, "Origin": f"http://{rebound}"}
    for method, path, headers in (("GET", "/queue", {"Host": rebound}), ("GET", "/history", page),
                                  ("POST", "/prompt", page), ("POST", "/queue", page)):
        resp = await client.request(method, path, json={} if method == "POST" else None, headers=headers)
        assert resp.status == 421, (method, path)
        body = await resp.json()
        assert body["error"]["type"] == "misdirected_request" and "--allowed-host" in body["error"]["message"]
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/ws?clientId=x", headers=page)
    assert info.value.status == 421
    # the names we are reached by still work, with and without their Origin
    for host in (f"localhost:{client.port}", f"127.0.0.1:{client.port}", f"[::1]:{client.port}",
                 f"LocalHost.:{client.port}", f"app.localhost:{client.port}"):
        resp = await client.post("/queue", json={"clear": True}, headers={"Host": host, "Origin": f"http://{host}"})
        assert resp.status == 200, host
    assert (await client.get("/healthz", headers={"Host": rebound})).status == 200


async def test_allowed_host_adds_names_and_star_allows_any(instance) -> None:
    client = await instance(access=AccessPolicy.build(allowed_hosts=["comfy.lan", "Box.Example:8188"]))
    for name in ("comfy.lan", "box.example"):
        host = f"{name}:{client.port}"
        assert (await client.get("/queue", headers={"Host": host})).status == 200, name
    assert (await client.get("/queue", headers={"Host": "other.lan"})).status == 421
    anything = await instance(access=AccessPolicy.build(allowed_hosts=["*"]))
    assert (await anything.get("/queue", headers={"Host": "whatever.example"})).status == 200


def test_host_answers_are_remembered_and_stay_right(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request asks about its Host: the header is parsed once per value, within a bound."""
    import standard.guard as guard

    policy = AccessPolicy.build(allowed_hosts=["comfy.lan"])
    parses = 0
    real_urlsplit = guard.urlsplit

    def counting_urlsplit(*args: Any, **kwargs: Any) -> Any:
        nonlocal parses
        parses += 1
        return real_urlsplit(*args, **kwargs)

    monkeypatch.setattr(guard, "urlsplit", counting_urlsplit)
    for _ in range(50):
        assert policy.host_allowed("127.0.0.1:8188") and policy.host_allowed("Comfy.LAN:8188")
        assert not policy.host_allowed("attacker.example:8188")
    assert parses == 3
    for index in range(2 * HOST_ANSWERS_MAX):  # a client writing a new Host each time
        assert not policy.host_allowed(f"a{index}.example")
        assert policy.host_allowed(f"10.0.{index // 256}.{index % 256}")
    assert policy.host_allowed("comfy.lan") and not policy.host_allowed("attacker.example:8188")
    assert not policy.host_allowed("user@comfy.lan") and not policy.host_allowed("comfy.lan:99999")


# -- a token: the credential is the protection -------------------------------------------------------------


@pytest.mark.parametrize("origin", EVIL_ORIGINS)
async def test_a_session_cookie_does_not_work_for_other_or_opaque_origins(instance, origin: str) -> None:
    client = await instance(token=TOKEN)
    await login_cookie(client)
    resp = await client.post("/queue", json={"clear": True}, headers={"Origin": origin})
    assert resp.status == 403
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/ws?clientId=x", headers={"Origin": origin})
    assert info.value.status == 403
    # our own page keeps working, HTTP and WS
    assert (await client.post("/queue", json={"clear": True}, headers={"Origin": origin_of(client)})).status == 200
    ws = await client.ws_connect("/ws?clientId=x", headers={"Origin": origin_of(client)})
    assert (await ws.receive_json(timeout=10))["type"] == "status"
    await ws.close()


async def test_the_authorization_header_works_from_anywhere_and_any_host(instance) -> None:
    """SDKs, curl and proxies behind a load balancer send the token; Host is not checked then."""
    client = await instance(token=TOKEN)
    for headers in ({}, {"Host": "lb.example.com"}, {"Origin": "http://tool.example"}):
        resp = await client.post("/queue", json={"clear": True}, headers={"Authorization": TOKEN, **headers})
        assert resp.status == 200, headers
    assert (await client.get("/queue", headers={"Host": "lb.example.com"})).status == 401
    checked = await instance(token=TOKEN, access=AccessPolicy.build(allowed_hosts=["lb.example.com"]))
    assert (await checked.get("/queue", headers={"Host": "lb.example.com", "Authorization": TOKEN})).status == 200
    assert (await checked.get("/queue", headers={"Host": "other.example", "Authorization": TOKEN})).status == 421


async def test_repeated_wrong_tokens_are_slowed_per_address(instance) -> None:
    client = await instance(token=TOKEN)
    statuses = [(await client.get("/queue", headers={"Authorization": f"guess-{i}"})).status for i in range(10)]
    assert statuses == [401] * 10
    slowed = await client.get("/queue", headers={"Authorization": "guess-10"})
    assert slowed.status == 429 and int(slowed.headers["Retry-After"]) >= 1
    assert (await slowed.json())["error"]["type"] == "too_many_failures"
    # the guesser's address learns nothing more, even with the right token, until it waits
    assert (await client.get("/queue", headers={"Authorization": TOKEN})).status == 429
    assert (await client.get(f"/queue?token={TOKEN}")).status == 429
    # a client at another address is not locked out
    other = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=other) as session:
        async with session.get(client.make_url("/queue"), headers={"Authorization": TOKEN}) as resp:
            assert resp.status == 200
        async with session.get(client.make_url("/queue"), headers={"Authorization": "wrong"}) as resp:
            assert resp.status == 401


async def test_forwarded_for_is_believed_only_from_a_trusted_proxy(instance) -> None:
    behind = await instance(token=TOKEN, access=AccessPolicy.build(trusted_proxies=["127.0.0.0/8"]))
    attacker = {"X-Forwarded-For": "198.51.100.7, 203.0.113.9"}
    for i in range(10):
        assert (await behind.get("/queue", headers={"Authorization": f"guess-{i}", **attacker})).status == 401
    assert (await behind.get("/queue", headers={"Authorization": TOKEN, **attacker})).status == 429
    user = {"X-Forwarded-For": "203.0.113.10"}
    assert (await behind.get("/queue", headers={"Authorization": TOKEN, **user})).status == 200
    # without --trusted-proxy a client cannot dodge the slow-down by writing the header itself
    direct = await instance(token=TOKEN)
    for i in range(10):
        spoofed = {"X-Forwarded-For": f"203.0.113.{i}"}
        assert (await direct.get("/queue", headers={"Authorization": f"guess-{i}", **spoofed})).status == 401
    assert (await direct.get("/queue", headers={"Authorization": TOKEN, **user})).status == 429


async def test_wrong_tokens_on_the_login_form_count_too(instance) -> None:
    client = await instance(token=TOKEN)
    own = {"Origin": origin_of(client)}
    for i in range(10):
        resp = await client.post("/login", data={"token": f"guess-{i}"}, headers=own, allow_redirects=False)
        assert resp.status == 401
    resp = await client.post("/login", data={"token": TOKEN}, headers=own, allow_redirects=False)
    assert resp.status == 429 and "Retry-After" in resp.headers


def test_a_short_token_is_warned_about_without_showing_it(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        create_embedded_app(StandardSettings(data_dir=data_dir, token="x"))
    warned = [r.getMessage() for r in caplog.records if "characters" in r.getMessage()]
    assert warned and "at least 16" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        create_embedded_app(StandardSettings(data_dir=data_dir, token=TOKEN))
    assert not [r for r in caplog.records if "characters" in r.getMessage()]


async def test_session_cookie_is_secure_over_https_only(instance) -> None:
    plain = await instance(token=TOKEN)
    resp = await plain.post("/login", data={"token": TOKEN}, allow_redirects=False,
                            headers={"X-Forwarded-Proto": "https"})  # nobody we trust said so
    assert not resp.cookies[SESSION_COOKIE]["secure"]
    proxied = await instance(token=TOKEN, access=AccessPolicy.build(trusted_proxies=["127.0.0.1"]))
    resp = await proxied.post("/login", data={"token": TOKEN}, allow_redirects=False,
                              headers={"X-Forwarded-Proto": "https"})
    assert resp.cookies[SESSION_COOKIE]["secure"]
    flagged = await instance(token=TOKEN, access=AccessPolicy.build(secure_cookies=True))
    resp = await flagged.post("/login", data={"token": TOKEN}, allow_redirects=False)
    assert resp.cookies[SESSION_COOKIE]["secure"]


@pytest.mark.parametrize("target", BAD_NEXTS)
async def test_login_never_redirects_off_site(instance, target: str) -> None:
    client = await instance(token=TOKEN)
    resp = await client.post("/login", data={"token": TOKEN, "next": target}, allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "/"
    form = await client.get("/login", params={"next": target})
    assert "evil.example" not in await form.text()


async def test_login_keeps_a_same_site_next(instance) -> None:
    client = await instance(token=TOKEN)
    resp = await client.post("/login", data={"token": TOKEN, "next": "/queue?x=1%202"}, allow_redirects=False)
    assert resp.headers["Location"] == "/queue?x=1%202"


# -- the real-ComfyUI gateway, on its byte-level fast path and on plain aiohttp ---------------------------


async def test_gateway_without_token_refuses_rebound_host_and_opaque_origin(front) -> None:
    server = await front()
    base = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/queue") as resp:
            assert resp.status == 200
        async with session.get(base + "/queue", headers={"Host": f"attacker.example:{server.port}"}) as resp:
            assert resp.status == 421
        async with session.post(base + "/prompt", json={"prompt": {}}, headers={"Origin": "null"}) as resp:
            assert resp.status == 403
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await session.ws_connect(base + "/ws?clientId=x", headers={"Origin": "file://"})
        assert info.value.status == 403


async def test_gateway_slows_wrong_tokens_on_the_fast_path_too(front) -> None:
    server = await front(token=TOKEN)
    base = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession() as session:
        for i in range(10):
            async with session.get(base + "/queue", headers={"Authorization": f"guess-{i}"}) as resp:
                assert resp.status == 401
        async with session.get(base + "/queue", headers={"Authorization": TOKEN}) as resp:
            assert resp.status == 429


async def test_behind_a_trusted_proxy_the_forwarded_host_is_what_counts(instance) -> None:
    """nginx may talk to us as 127.0.0.1 while the browser asked for another name."""
    client = await instance(access=AccessPolicy.build(trusted_proxies=["127.0.0.1"]))
    rebound = {"X-Forwarded-Host": "attacker.example", "Origin": "http://attacker.example"}
    assert (await client.post("/queue", json={"clear": True}, headers=rebound)).status == 421
    ours = {"X-Forwarded-Host": "localhost", "Origin": "https://localhost"}
    assert (await client.post("/queue", json={"clear": True}, headers=ours)).status == 200
    cookie_site = await instance(token=TOKEN, access=AccessPolicy.build(trusted_proxies=["127.0.0.1"]))
    await login_cookie(cookie_site)
    public = {"X-Forwarded-Host": "comfy.example.com", "Origin": "https://comfy.example.com"}
    assert (await cookie_site.post("/queue", json={"clear": True}, headers=public)).status == 200
    # nobody we trust: the header is the client's own word and changes nothing
    direct = await instance()
    assert (await direct.post("/queue", json={"clear": True}, headers=ours | {"Host": "x.example"})).status == 421
