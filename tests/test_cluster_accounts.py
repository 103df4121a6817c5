"""Cluster accounts and login: the users CLI, API tokens, sessions, throttling, CSRF, admin pages."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from cluster_proxy.accounts import Accounts, User
from cluster_proxy.login import SESSION_COOKIE, USER, SessionSigner, setup_login
from standard.datadir import init_data_dir

SECRET = "test-secret"


def users_cli(data_dir: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "standard.cli", "users", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)


def test_users_cli_add_list_reset_remove(data_dir: Path, cli_env: dict[str, str]) -> None:
    added = users_cli(data_dir, "add", "alice", "--admin", "--password", "correct horse", env=cli_env)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"csu_[\w-]{40,}", token)
    generated = users_cli(data_dir, "add", "bob", env=cli_env)
    assert generated.returncode == 0 and "generated password for bob" in generated.stdout
    assert (data_dir / "users" / "bob" / "output").is_dir()
    assert users_cli(data_dir, "list", env=cli_env).stdout.split("\n")[:2] == ["alice  admin", "bob"]
    again = users_cli(data_dir, "add", "alice", "--password", "whatever1", env=cli_env)
    assert again.returncode == 1 and "already exists" in again.stderr
    bad = users_cli(data_dir, "add", "../evil", "--password", "whatever1", env=cli_env)
    assert bad.returncode == 1 and "invalid user name" in bad.stderr
    short = users_cli(data_dir, "add", "carol", "--password", "short", env=cli_env)
    assert short.returncode == 1 and "too short" in short.stderr
    reset = users_cli(data_dir, "reset-token", "alice", env=cli_env)
    assert reset.returncode == 0 and reset.stdout.strip().splitlines()[-1] != token
    assert users_cli(data_dir, "remove", "bob", env=cli_env).returncode == 0
    assert users_cli(data_dir, "remove", "bob", env=cli_env).returncode == 1
    assert users_cli(data_dir, "list", env=cli_env).stdout.strip() == "alice  admin"
    assert not (data_dir / ".comfyserve" / "cluster.sqlite").read_bytes().count(token.encode())


class Provider:
    def __init__(self) -> None:
        self.added: list[str] = []

    async def user_view(self, user: User) -> dict[str, Any]:
        return {"queue": [{"prompt_id": f"{user.name}-q1", "position": 1, "state": "pending"}],
                "history": [{"prompt_id": f"{user.name}-h1", "status": "success",
                             "outputs": [{"filename": "a_00001_.png", "subfolder": "", "type": "output"}]}],
                "instances": [{"url": u, "state": "ready", "running": None} for u in self.added]}

    async def add_instance(self, url: str) -> None:
        self.added.append(url)


@pytest.fixture
async def site(aiohttp_client: Any, data_dir: Path) -> Any:
    accounts = await Accounts.open(init_data_dir(data_dir))
    tokens = {"admin": await accounts.add("admin", "admin-password", admin=True),
              "alice": await accounts.add("alice", "alice-password")}

    async def whoami(request: web.Request) -> web.Response:
        user = request[USER]
        return web.json_response({"name": user.name, "admin": user.is_admin})

    app = web.Application()
    provider = Provider()
    setup_login(app, accounts, SECRET, dashboard=provider)
    app.router.add_get("/whoami", whoami)
    app.router.add_post("/whoami", whoami)
    client = await aiohttp_client(app)
    client.tokens, client.accounts, client.provider = tokens, accounts, provider
    yield client
    await accounts.aclose()


async def login(client: Any, name: str, password: str, **headers: str) -> Any:
    origin = {"Origin": str(client.make_url("/")).rstrip("/")}
    return await client.post("/login", data={"name": name, "password": password, "next": "/whoami"},
                             headers=origin | headers, allow_redirects=False)


async def test_api_tokens_raw_and_bearer(site: Any) -> None:
    token = site.tokens["alice"]
    for header in (token, f"Bearer {token}"):
        resp = await site.get("/whoami", headers={"Authorization": header})
        assert await resp.json() == {"name": "alice", "admin": False}
    resp = await site.get("/whoami", headers={"Authorization": "Bearer nope"})
    assert resp.status == 401 and (await resp.json())["error"]["type"] == "unauthorized"
    assert (await site.get("/whoami")).status == 401
    browser = await site.get("/whoami", headers={"Accept": "text/html"}, allow_redirects=False)
    assert browser.status == 302 and browser.headers["Location"] == "/login?next=/whoami"
    await site.accounts.reset_token("alice")
    assert (await site.get("/whoami", headers={"Authorization": token})).status == 401


async def test_login_session_logout_and_forged_or_stale_cookies(site: Any) -> None:
    page = await site.get("/login")
    assert page.status == 200 and 'name="password"' in await page.text()
    resp = await login(site, "alice", "alice-password")
    assert resp.status == 302 and resp.headers["Location"] == "/whoami"
    assert await (await site.get("/whoami")).json() == {"name": "alice", "admin": False}
    # a state-changing request with only the cookie must come from our origin
    cross = await site.post("/whoami", headers={"Origin": "http://evil.example"})
    assert cross.status == 403
    cookie = site.session.cookie_jar.filter_cookies(site.make_url("/"))[SESSION_COOKIE].value
    name, version, expires, mac = cookie.split("|")
    site.session.cookie_jar.clear()
    for forged in (f"admin|{version}|{expires}|{mac}", f"alice|{version}|{int(expires) + 99}|{mac}",
                   SessionSigner("other-secret").make("alice", int(version)),
                   SessionSigner(SECRET).make("alice", int(version), now_s=0)):
        resp = await site.get("/whoami", cookies={SESSION_COOKIE: forged})
        assert resp.status == 401, forged
    # a credential change ends old sessions
    await site.accounts.set_password("alice", "new-password-1")
    import asyncio
    await asyncio.sleep(2.1)  # the version cache's lifetime
    assert (await site.get("/whoami", cookies={SESSION_COOKIE: cookie})).status == 401
    resp = await login(site, "alice", "new-password-1")
    assert resp.status == 302
    out = await site.post("/logout", headers={"Origin": str(site.make_url("/")).rstrip("/")}, allow_redirects=False)
    assert out.status == 302 and (await site.get("/whoami")).status == 401


async def test_wrong_password_gives_no_hint_and_is_throttled(site: Any) -> None:
    wrong_name = await login(site, "nobody", "alice-password")
    wrong_password = await login(site, "alice", "not-her-password")
    assert wrong_name.status == wrong_password.status == 401
    assert "Wrong name or password." in await wrong_name.text()
    assert "Wrong name or password." in await wrong_password.text()
    for _ in range(4):
        await login(site, "alice", "guess")
    throttled = await login(site, "alice", "alice-password")
    assert throttled.status == 429 and int(throttled.headers["Retry-After"]) > 0
    cross = await site.post("/login", data={"name": "admin", "password": "admin-password"},
                            headers={"Origin": "http://evil.example"}, allow_redirects=False)
    assert cross.status == 403


async def test_dashboard_and_admin_pages_with_csrf(site: Any) -> None:
    await login(site, "alice", "alice-password")
    dashboard = await (await site.get("/dashboard")).text()
    assert "alice-q1" in dashboard and "a_00001_.png" in dashboard
    assert (await site.get("/admin")).status == 403
    site.session.cookie_jar.clear()
    await login(site, "admin", "admin-password")
    admin = await (await site.get("/admin")).text()
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', admin).group(1)
    origin = {"Origin": str(site.make_url("/")).rstrip("/")}
    refused = await site.post("/admin/users", data={"action": "add", "name": "carol", "password": "carol-password"},
                              headers=origin)
    assert refused.status == 403
    added = await site.post("/admin/users", data={"action": "add", "name": "carol", "password": "carol-password",
                                                  "csrf": csrf}, headers=origin)
    body = await added.text()
    assert added.status == 200 and "User carol added." in body
    carol_token = re.search(r'id="new-token">([^<]+)<', body).group(1)
    assert await (await site.get("/whoami", headers={"Authorization": carol_token})).json() == {
        "name": "carol", "admin": False}
    dup = await site.post("/admin/users", data={"action": "add", "name": "carol", "password": "carol-password",
                                                "csrf": csrf}, headers=origin)
    assert dup.status == 400 and "already exists" in await dup.text()
    added = await site.post("/admin/instances", data={"url": "http://127.0.0.1:9", "csrf": csrf}, headers=origin)
    assert added.status == 200 and site.provider.added == ["http://127.0.0.1:9"]
    bad = await site.post("/admin/instances", data={"url": "file:///etc", "csrf": csrf}, headers=origin)
    assert bad.status == 400
    removed = await site.post("/admin/users", data={"action": "remove", "name": "carol", "csrf": csrf}, headers=origin)
    assert removed.status == 200
    assert (await site.get("/whoami", headers={"Authorization": carol_token})).status == 401


async def test_redis_store_is_shared_by_two_proxies(data_dir: Path, redis_url: str) -> None:
    root = init_data_dir(data_dir)
    first, second = await Accounts.open(root, redis_url), await Accounts.open(root, redis_url)
    try:
        token = await first.add("dora", "dora-password")
        assert await second.verify_token(token) == User("dora", False)
        assert await second.verify_password("dora", "dora-password") == User("dora", False)
        assert await second.verify_password("dora", "wrong-password") is None
        new = await second.reset_token("dora")
        assert await first.verify_token(token) is None and await first.verify_token(new) == User("dora", False)
        assert [u.name for u in await first.list()] == ["dora"]
        assert await second.remove("dora") and await first.get("dora") is None
    finally:
        await first.aclose()
        await second.aclose()
