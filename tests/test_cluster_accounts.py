"""Cluster accounts and login: the users CLI, API tokens, sessions, throttling, CSRF, admin pages."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from cluster_proxy.accounts import SESSION_CACHE_S, Accounts, User
from cluster_proxy.login import SESSION_COOKIE, USER, setup_login
from cluster_proxy.throttle import LoginThrottle
from standard.datadir import init_data_dir
from support.clock import FakeClock
from support.cluster import PASSWORD, files_under, graph
from support.wait import until

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
        self.removed: list[str] = []
        self.disconnected: list[str] = []

    async def user_view(self, user: User) -> dict[str, Any]:
        return {"queue": [{"prompt_id": f"{user.name}-q1", "what": "SaveImage · 2 nodes", "submitted": "",
                           "state": "waiting", "detail": "#2 in line", "notes": ""}],
                "history": [{"prompt_id": f"{user.name}-h1", "what": "", "submitted": "", "ended": "", "took": "",
                             "status": "success", "notes": "",
                             "outputs": [{"name": "a_00001_.png", "url": "/view?filename=a_00001_.png",
                                          "thumbnail": "yes"}]}],
                "instances": [{"name": u, "state": "up", "running": "", "tasks_run": "0"} for u in self.added]}

    async def add_instance(self, url: str) -> None:
        self.added.append(url)

    async def remove_instance(self, url: str, *, drain: bool) -> bool:
        return False

    async def remove_user(self, name: str, account_id: str) -> None:
        self.removed.append(name)

    async def disconnect_user(self, name: str) -> None:
        self.disconnected.append(name)


@pytest.fixture
async def make_site(aiohttp_client: Any, data_dir: Path) -> Any:
    """``await make_site(redis_url=None)``: a login-protected app; several share one accounts store."""
    opened: list[Accounts] = []

    async def factory(redis_url: str | None = None, *, with_users: bool = True) -> Any:
        clock = FakeClock()
        accounts = await Accounts.open(init_data_dir(data_dir), redis_url, clock=clock)
        opened.append(accounts)
        tokens = {}
        if with_users:
            tokens = {"admin": await accounts.add("admin", "admin-password", admin=True),
                      "alice": await accounts.add("alice", "alice-password")}

        async def whoami(request: web.Request) -> web.Response:
            user = request[USER]
            return web.json_response({"name": user.name, "admin": user.is_admin})

        app = web.Application()
        provider = Provider()
        setup_login(app, accounts, SECRET, dashboard=provider, throttle=LoginThrottle(clock, clock.pause))
        app.router.add_get("/whoami", whoami)
        app.router.add_post("/whoami", whoami)
        client = await aiohttp_client(app)
        client.tokens, client.accounts, client.provider, client.clock = tokens, accounts, provider, clock
        return client

    yield factory
    for accounts in opened:
        await accounts.aclose()


@pytest.fixture
async def site(make_site: Any) -> Any:
    return await make_site()


def origin_of(client: Any) -> dict[str, str]:
    return {"Origin": str(client.make_url("/")).rstrip("/")}


async def login(client: Any, name: str, password: str, **headers: str) -> Any:
    return await client.post("/login", data={"name": name, "password": password, "next": "/whoami"},
                             headers=origin_of(client) | headers, allow_redirects=False)


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
    site.session.cookie_jar.clear()
    for forged in ("", "alice", cookie[:-1], cookie + "x", "alice|1|9999999999|" + "0" * 64):
        resp = await site.get("/whoami", cookies={SESSION_COOKIE: forged})
        assert resp.status == 401, forged
    assert (await site.get("/whoami", cookies={SESSION_COOKIE: cookie})).status == 200
    out = await site.post("/logout", headers={"Origin": str(site.make_url("/")).rstrip("/")},
                          cookies={SESSION_COOKIE: cookie}, allow_redirects=False)
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
        session = await first.start_session("dora", 3600)
        assert await second.session_user(session) == User("dora", False)
        await second.set_disabled("dora", True)
        assert await first.verify_token(new) is None and await second.session_user(session) is None
        await first.set_disabled("dora", False)
        assert await second.verify_token(new) == User("dora", False)
        session = await first.start_session("dora", 3600)
        assert await second.remove("dora") and await first.get("dora") is None
        await first.add("dora", "dora-password")
        assert await first.session_user(session) is None and await first.verify_token(new) is None
    finally:
        await first.aclose()
        await second.aclose()


# -- sessions are revoked server-side (issue 12, item 5) ------------------------------------------------


def cookie_of(client: Any) -> str:
    return client.session.cookie_jar.filter_cookies(client.make_url("/"))[SESSION_COOKIE].value


async def logged_in(site: Any, name: str, password: str) -> str:
    """Log in with a fresh cookie jar; returns the session cookie (the jar is left empty)."""
    site.session.cookie_jar.clear()
    assert (await login(site, name, password)).status == 302
    cookie = cookie_of(site)
    site.session.cookie_jar.clear()
    return cookie


async def whoami(site: Any, cookie: str) -> int:
    return (await site.get("/whoami", cookies={SESSION_COOKIE: cookie})).status


async def test_a_cookie_replayed_after_logout_is_refused(site: Any) -> None:
    cookie = await logged_in(site, "alice", "alice-password")
    other = await logged_in(site, "alice", "alice-password")
    out = await site.post("/logout", headers=origin_of(site), cookies={SESSION_COOKIE: cookie}, allow_redirects=False)
    assert out.status == 302 and out.headers["Location"] == "/login"
    assert await whoami(site, cookie) == 401
    page = await site.get("/dashboard", cookies={SESSION_COOKIE: cookie}, headers={"Accept": "text/html"},
                          allow_redirects=False)
    assert page.status == 302 and page.headers["Location"].startswith("/login")
    assert await whoami(site, other) == 200  # logging out one browser leaves the others
    again = await site.post("/logout", headers=origin_of(site), cookies={SESSION_COOKIE: cookie},
                            allow_redirects=False)
    assert again.status == 302 and again.headers["Location"] == "/login"  # a dead session still gets out


async def test_logout_reaches_a_sibling_proxy_within_the_cache_time(make_site: Any, redis_url: str) -> None:
    first = await make_site(redis_url)
    second = await make_site(redis_url, with_users=False)
    cookie = await logged_in(first, "alice", "alice-password")
    assert await whoami(second, cookie) == 200  # one store: the sibling accepts the session (and caches it)
    await first.post("/logout", headers=origin_of(first), cookies={SESSION_COOKIE: cookie}, allow_redirects=False)
    assert await whoami(first, cookie) == 401  # at once where the logout happened
    assert await whoami(second, cookie) == 200  # the sibling's look is at most SESSION_CACHE_S old ...
    second.clock.advance(SESSION_CACHE_S)
    assert await whoami(second, cookie) == 401  # ... then it asks the store again


async def test_changing_my_password_signs_out_my_other_sessions(site: Any) -> None:
    here = await logged_in(site, "alice", "alice-password")
    elsewhere = await logged_in(site, "alice", "alice-password")
    page = await (await site.get("/account", cookies={SESSION_COOKIE: here})).text()
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
    form = {"csrf": csrf, "current_password": "alice-password", "new_password": "new-alice-pw",
            "new_password_again": "new-alice-pw"}
    no_csrf = await site.post("/account", data=form | {"csrf": "0" * 32}, headers=origin_of(site),
                              cookies={SESSION_COOKIE: here})
    assert no_csrf.status == 403
    wrong = await site.post("/account", data=form | {"current_password": "not-it"}, headers=origin_of(site),
                            cookies={SESSION_COOKIE: here})
    assert wrong.status == 400 and "current password is wrong" in await wrong.text()
    changed = await site.post("/account", data=form, headers=origin_of(site), cookies={SESSION_COOKIE: here})
    assert changed.status == 200 and "Password changed" in await changed.text()
    assert await whoami(site, here) == 200 and await whoami(site, elsewhere) == 401
    assert (await login(site, "alice", "alice-password")).status == 401
    # the API: the token and the current password; every session ends (none came with the request)
    token = {"Authorization": f"Bearer {site.tokens['alice']}"}
    bad = await site.post("/account/password", json={"current_password": "alice-password",
                                                      "new_password": "third-alice-pw"}, headers=token)
    assert bad.status == 400 and (await bad.json())["error"]["message"] == "The current password is wrong."
    short = await site.post("/account/password", json={"current_password": "new-alice-pw", "new_password": "x"},
                            headers=token)
    assert short.status == 400 and "too short" in (await short.json())["error"]["message"]
    ok = await site.post("/account/password", json={"current_password": "new-alice-pw",
                                                     "new_password": "third-alice-pw"}, headers=token)
    assert ok.status == 200 and (await ok.json())["ok"] is True
    assert await whoami(site, here) == 401
    assert (await login(site, "alice", "third-alice-pw")).status == 302
    site.session.cookie_jar.clear()
    assert (await site.post("/account/password", json={"current_password": "third-alice-pw",
                                                        "new_password": "fourth-alice-pw"})).status == 401


async def test_the_password_api_refuses_strangers_and_hostile_bodies_and_changes_nothing(site: Any) -> None:
    token = {"Authorization": f"Bearer {site.tokens['alice']}"}
    change = {"current_password": "alice-password", "new_password": "never-set-pw"}
    stranger = {"Authorization": "Bearer csu_nope"}
    assert (await site.post("/account/password", json=change, headers=stranger)).status == 401
    cookie = await logged_in(site, "alice", "alice-password")
    foreign = await site.post("/account/password", json=change, cookies={SESSION_COOKIE: cookie},
                              headers={"Origin": "http://evil.example"})
    assert foreign.status == 403
    for body in ("[" * 100_000 + "]" * 100_000, '{"current_password": NaN, "new_password": "x"}', "[]", "{"):
        resp = await site.post("/account/password", data=body, headers={**token, "Content-Type": "application/json"})
        assert resp.status == 400, body[:40]
    assert (await login(site, "alice", "alice-password")).status == 302  # nothing changed


async def admin_form(site: Any) -> tuple[str, str]:
    """(admin's session cookie, CSRF value of the admin page)."""
    cookie = await logged_in(site, "admin", "admin-password")
    page = await (await site.get("/admin", cookies={SESSION_COOKIE: cookie})).text()
    return cookie, re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)


async def admin_action(site: Any, admin: tuple[str, str], action: str, name: str, **extra: str) -> Any:
    return await site.post("/admin/users", data={"csrf": admin[1], "action": action, "name": name, **extra},
                           headers=origin_of(site), cookies={SESSION_COOKIE: admin[0]})


async def test_admin_disables_enables_and_resets_a_password(site: Any) -> None:
    admin = await admin_form(site)
    session = await logged_in(site, "alice", "alice-password")
    token = {"Authorization": site.tokens["alice"]}
    disabled = await admin_action(site, admin, "disable", "alice")
    assert disabled.status == 200 and "User alice disabled." in await disabled.text()
    assert site.provider.disconnected == ["alice"]
    assert await whoami(site, session) == 401
    assert (await site.get("/whoami", headers=token)).status == 401
    refused = await login(site, "alice", "alice-password")
    assert refused.status == 403 and "disabled" in await refused.text()
    assert "disabled" in await (await site.get("/admin", cookies={SESSION_COOKIE: admin[0]})).text()
    assert (await admin_action(site, admin, "disable", "admin")).status == 400  # not yourself
    assert (await admin_action(site, admin, "enable", "alice")).status == 200
    fresh = await logged_in(site, "alice", "alice-password")
    assert await whoami(site, fresh) == 200 and await whoami(site, session) == 401
    assert (await site.get("/whoami", headers=token)).status == 200  # the token works again
    short = await admin_action(site, admin, "passwd", "alice", password="short")
    assert short.status == 400 and "too short" in await short.text()
    reset = await admin_action(site, admin, "passwd", "alice", password="given-by-admin")
    assert reset.status == 200 and "New password for alice" in await reset.text()
    assert await whoami(site, fresh) == 401
    assert (await login(site, "alice", "alice-password")).status == 401
    assert (await login(site, "alice", "given-by-admin")).status == 302
    assert await whoami(site, admin[0]) == 200
    mine = await admin_action(site, admin, "passwd", "admin", password="new-admin-pw")
    assert mine.status == 200 and await whoami(site, admin[0]) == 200  # my own reset keeps my session


async def test_removal_ends_token_and_sessions_and_a_new_account_of_that_name_starts_fresh(site: Any) -> None:
    admin = await admin_form(site)
    session = await logged_in(site, "alice", "alice-password")
    token = {"Authorization": site.tokens["alice"]}
    removed = await admin_action(site, admin, "remove", "alice")
    assert removed.status == 200 and site.provider.removed == ["alice"]
    assert await whoami(site, session) == 401 and (await site.get("/whoami", headers=token)).status == 401
    await site.accounts.add("alice", "alice-password")  # the same name and password, a new account
    assert await whoami(site, session) == 401 and (await site.get("/whoami", headers=token)).status == 401


def test_users_cli_passwd_disable_enable(data_dir: Path, cli_env: dict[str, str]) -> None:
    token = users_cli(data_dir, "add", "erin", "--password", "erin-password", env=cli_env).stdout.splitlines()[-1]

    async def check(password: str) -> tuple[User | None, User | None]:
        accounts = await Accounts.open(init_data_dir(data_dir))
        try:
            return await accounts.verify_password("erin", password), await accounts.verify_token(token)
        finally:
            await accounts.aclose()

    changed = subprocess.run([sys.executable, "-m", "standard.cli", "users", "passwd", "erin", "--data-dir",
                              str(data_dir)], input="from-stdin-pw\n", capture_output=True, text=True, env=cli_env,
                             timeout=60)
    assert changed.returncode == 0, changed.stderr
    assert "from-stdin-pw" not in changed.stdout + changed.stderr
    assert asyncio.run(check("erin-password"))[0] is None
    assert asyncio.run(check("from-stdin-pw")) == (User("erin", False), User("erin", False))
    assert users_cli(data_dir, "disable", "erin", env=cli_env).returncode == 0
    assert users_cli(data_dir, "list", env=cli_env).stdout.strip() == "erin  disabled"
    assert asyncio.run(check("from-stdin-pw")) == (User("erin", False, disabled=True), None)
    assert users_cli(data_dir, "enable", "erin", env=cli_env).returncode == 0
    assert asyncio.run(check("from-stdin-pw"))[1] == User("erin", False)
    missing = users_cli(data_dir, "passwd", "nobody", env=cli_env)
    assert missing.returncode == 1 and "no user 'nobody'" in missing.stderr


# -- throttling slows a guesser, not the user (issue 12, item 6) ---------------------------------------


async def test_backoff_per_name_and_address_answers_429_with_retry_after(site: Any) -> None:
    for _ in range(3):  # a few free mistakes
        assert (await login(site, "alice", "typo-password")).status == 401
    for wait_s in (1, 2, 4):  # then each failure doubles the wait
        throttled = await login(site, "alice", "alice-password")
        assert throttled.status == 429 and throttled.headers["Retry-After"] == str(wait_s)
        assert f"Try again in {wait_s} s." in await throttled.text()
        site.clock.advance(wait_s)
        assert (await login(site, "alice", "typo-password")).status == 401
    site.clock.advance(8)
    assert (await login(site, "alice", "alice-password")).status == 302
    for _ in range(3):  # a success starts this address again from zero
        assert (await login(site, "alice", "typo-password")).status == 401


async def test_a_guesser_at_one_address_does_not_lock_out_the_user_at_another(site: Any) -> None:
    import aiohttp

    base = str(site.make_url("")).rstrip("/")
    attacker = aiohttp.ClientSession(base_url=base, connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0)))
    try:
        failures = 0
        while failures < 20:
            resp = await attacker.post("/login", data={"name": "alice", "password": f"guess-{failures}"},
                                       headers={"Origin": base}, allow_redirects=False)
            if resp.status == 429:  # the guesser has to wait ...
                site.clock.advance(int(resp.headers["Retry-After"]))
                continue
            assert resp.status == 401
            failures += 1
        assert site.clock.now_s - 1000.0 > 60  # ... longer and longer
        blocked = await attacker.post("/login", data={"name": "alice", "password": "alice-password"},
                                      headers={"Origin": base}, allow_redirects=False)
        assert blocked.status == 429
    finally:
        await attacker.close()
    assert (await login(site, "alice", "alice-password")).status == 302  # alice, at her own address: at once
    assert site.clock.pauses == []


async def test_guessers_at_many_addresses_slow_the_name_but_the_user_still_gets_in(site: Any) -> None:
    import aiohttp

    base = str(site.make_url("")).rstrip("/")
    for n in range(7):  # 7 addresses x 3 free failures: more than the name's budget of 20, none refused
        guesser = aiohttp.ClientSession(base_url=base, connector=aiohttp.TCPConnector(local_addr=(f"127.0.1.{n}", 0)))
        try:
            for _ in range(3):
                resp = await guesser.post("/login", data={"name": "alice", "password": "guess"},
                                          headers={"Origin": base}, allow_redirects=False)
                assert resp.status == 401
        finally:
            await guesser.close()
    assert site.clock.pauses == [1.0]  # the 21st try already waited
    assert (await login(site, "alice", "alice-password")).status == 302  # slowed, not refused
    assert site.clock.pauses == [1.0, 1.0]


async def test_one_address_spraying_many_names_is_refused_and_memory_stays_bounded(make_site: Any) -> None:
    throttle = LoginThrottle(FakeClock(), address_limit=5, max_entries=50)
    for n in range(5):
        assert throttle.attempt(f"user{n}", "10.0.0.9") == (0, 0.0)
    wait_s, _ = throttle.attempt("user-next", "10.0.0.9")
    assert wait_s > 0 and throttle.attempt("user-next", "10.0.0.10") == (0, 0.0)
    for n in range(1000):
        throttle.attempt(f"spray{n}", f"10.1.{n // 250}.{n % 250}")
    assert throttle.entries() <= 150


# -- removal in a running cluster: work, history and files go with the account -------------------------


async def browser_login(cluster: Any, name: str) -> Any:
    import aiohttp

    session = aiohttp.ClientSession(base_url=cluster.url, cookie_jar=aiohttp.CookieJar(unsafe=True))
    cluster.sessions.append(session)
    resp = await session.post("/login", data={"name": name, "password": PASSWORD, "next": "/dashboard"},
                              headers={"Origin": cluster.url}, allow_redirects=False)
    assert resp.status == 302
    return session


async def test_removing_a_user_stops_their_work_and_the_name_comes_back_empty(start_cluster: Any,
                                                                                cli_env: dict[str, str]) -> None:
    cluster = await start_cluster(instances=1, users=("root", "alice"), admin="root")
    alice = cluster.user("alice")
    assert (await alice.run(graph("old", color=7), timeout_s=30)).ok
    alice_browser = await browser_login(cluster, "alice")
    running = await alice.submit(graph("long", color=8, seconds=60))
    waiting = await alice.submit(graph("later", color=9))

    async def is_running() -> bool:
        return [item[1] for item in (await alice.queue())["queue_running"]] == [running]

    await until(is_running)
    root = await browser_login(cluster, "root")
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', await (await root.get("/admin")).text()).group(1)
    removed = await root.post("/admin/users", data={"csrf": csrf, "action": "remove", "name": "alice"},
                              headers={"Origin": cluster.url})
    assert removed.status == 200 and "User alice removed" in await removed.text()
    assert (await alice_browser.get("/api/queue")).status == 401
    assert (await cluster.http("alice").get("/api/queue")).status == 401
    await until(lambda: all(i.task_id is None for i in cluster.pool.instances.values()))  # interrupted
    assert not cluster.user_dir("alice").exists()  # nothing the interrupted task wrote came back
    [moved] = (cluster.data_dir / "users" / ".removed").iterdir()
    assert moved.name.startswith("alice-") and files_under(moved / "output") == ["old_00001_.png"]

    added = users_cli(cluster.data_dir, "add", "alice", "--password", PASSWORD, env=cli_env)
    assert added.returncode == 0, added.stderr
    cluster.tokens["alice"] = added.stdout.splitlines()[-1]
    again = cluster.user("alice")
    assert await again.history() == {} and await again.queue() == {"queue_running": [], "queue_pending": []}
    assert (await cluster.http("alice").get("/api/view", params={"filename": "old_00001_.png"})).status == 404
    assert (await alice_browser.get("/api/queue")).status == 401  # the old session stays dead
    assert (await again.run(graph("old", color=10), timeout_s=30)).ok
    assert files_under(cluster.user_dir("alice") / "output") == ["old_00001_.png"]  # numbering starts afresh
    assert waiting not in await again.history() and running not in await again.history()


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_users_remove_from_the_cli_clears_what_the_running_proxy_shows(
        store: str, start_cluster: Any, cli_env: dict[str, str], request: pytest.FixtureRequest) -> None:
    redis_url = request.getfixturevalue("redis_url") if store == "redis" else None
    cluster = await start_cluster(instances=1, users=("alice",), redis_url=redis_url)
    done = await cluster.user("alice").run(graph("cli", color=11), timeout_s=30)
    assert done.ok
    store_flags = ("--redis-url", redis_url) if redis_url else ()
    removed = users_cli(cluster.data_dir, "remove", "alice", *store_flags, env=cli_env)
    assert removed.returncode == 0 and "files moved to" in removed.stdout, removed.stderr
    assert (await cluster.http("alice").get("/api/history")).status == 401
    cluster.tokens["alice"] = users_cli(cluster.data_dir, "add", "alice", "--password", PASSWORD, *store_flags,
                                        env=cli_env).stdout.splitlines()[-1]
    assert await cluster.user("alice").history() == {}
    assert files_under(cluster.user_dir("alice")) == []
