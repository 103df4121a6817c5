"""Who is asking: login pages, session cookies and API tokens for the cluster proxy.

``setup_login`` puts a middleware in front of every route that sets
``request[USER]`` (a :class:`~cluster_proxy.accounts.User`) from a signed
session cookie (browsers, after ``/login``) or a per-user API token in
``Authorization`` (raw or ``Bearer``). It also serves our own pages: login,
logout, a dashboard and the admin page (users, instances). Failed logins are
throttled per name and per address; state-changing requests carrying only a
cookie must come from our own origin, and our forms carry a CSRF token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp_jinja2
from aiohttp import web

from standard.auth import json_error, safe_next, same_origin, token_from_header, wants_html
from standard.guard import cross_origin_refusal
from standard.datadir import DataDir
from web import setup_templates

from .accounts import AccountError, Accounts, User

SESSION_COOKIE = "comfyserve_cluster_session"
SESSION_TTL_S = 7 * 24 * 3600
DEFAULT_PUBLIC_PATHS = frozenset({"/login", "/healthz", "/api/healthz", "/readyz", "/api/readyz"})
MAX_FAILURES = 5
FAILURE_WINDOW_S = 300.0
VERSION_CACHE_S = 2.0

ACCOUNTS = web.AppKey("cluster_accounts", Accounts)
SESSIONS = web.AppKey("cluster_sessions", "SessionSigner")
THROTTLE = web.AppKey("cluster_login_throttle", "LoginThrottle")
DASHBOARD = web.AppKey("cluster_dashboard", object)
USER = web.RequestKey("user", User)  # request[USER]: who is asking (set by the middleware)
_COOKIE_VALUE = web.RequestKey("cluster_session_cookie", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class DashboardProvider(Protocol):
    """What the cluster core shows on the dashboard and does from the admin page."""

    async def user_view(self, user: User) -> dict[str, Any]: ...
    async def add_instance(self, url: str) -> None: ...


def load_or_create_secret(data_dir: DataDir) -> str:
    """The signing key kept in the data dir, so restarts and sibling proxies accept old sessions."""
    path = data_dir.root / ".comfyserve" / "secret_key"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


class SessionSigner:
    """``name|version|expires|mac`` cookies; ``version`` ties a session to the user's credentials."""

    def __init__(self, secret_key: str) -> None:
        self._key = hashlib.sha256(("comfyserve-cluster-session:" + secret_key).encode()).digest()

    def _mac(self, payload: str) -> str:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()

    def make(self, name: str, version: int, now_s: float | None = None) -> str:
        expires = int((now_s if now_s is not None else time.time()) + SESSION_TTL_S)
        payload = f"{name}|{version}|{expires}"
        return f"{payload}|{self._mac(payload)}"

    def read(self, value: str | None, now_s: float | None = None) -> tuple[str, int] | None:
        """(name, version) of a valid, unexpired cookie, else None."""
        if not value or value.count("|") != 3:
            return None
        name, version, expires, mac = value.split("|")
        if not hmac.compare_digest(mac, self._mac(f"{name}|{version}|{expires}")):
            return None
        if not expires.isdigit() or not version.isdigit():
            return None
        if int(expires) < (now_s if now_s is not None else time.time()):
            return None
        return name, int(version)

    def csrf_token(self, cookie: str) -> str:
        return self._mac("csrf|" + cookie)[:32]


class LoginThrottle:
    """At most ``MAX_FAILURES`` failed logins per name and per address in ``FAILURE_WINDOW_S``."""

    def __init__(self) -> None:
        self._failures: dict[str, deque[float]] = defaultdict(deque)

    def _recent(self, key: str, now: float) -> deque[float]:
        failures = self._failures[key]
        while failures and failures[0] < now - FAILURE_WINDOW_S:
            failures.popleft()
        return failures

    def retry_after(self, keys: list[str], now: float | None = None) -> int:
        """Seconds until a login may be tried again (0 = now)."""
        now = now if now is not None else time.monotonic()
        waits = [self._recent(k, now)[0] + FAILURE_WINDOW_S - now for k in keys
                 if len(self._recent(k, now)) >= MAX_FAILURES]
        return int(max(waits, default=0)) + (1 if waits else 0)

    def failed(self, keys: list[str], now: float | None = None) -> None:
        now = now if now is not None else time.monotonic()
        for key in keys:
            self._recent(key, now).append(now)

    def succeeded(self, name_key: str) -> None:
        self._failures.pop(name_key, None)


class _VersionCache:
    """A user's credential version, re-read from the store at most every couple of seconds."""

    def __init__(self, accounts: Accounts) -> None:
        self._accounts = accounts
        self._seen: dict[str, tuple[float, User | None, int | None]] = {}

    async def lookup(self, name: str) -> tuple[User | None, int | None]:
        now = time.monotonic()
        cached = self._seen.get(name)
        if cached is not None and now - cached[0] < VERSION_CACHE_S:
            return cached[1], cached[2]
        session = await self._accounts.session(name)
        user, version = session if session is not None else (None, None)
        self._seen[name] = (now, user, version)
        return user, version

    def forget(self, name: str) -> None:
        self._seen.pop(name, None)


def setup_login(app: web.Application, accounts: Accounts, secret_key: str, *,
                public_paths: frozenset[str] = DEFAULT_PUBLIC_PATHS,
                dashboard: DashboardProvider | None = None) -> None:
    """Install the middleware, the pages and the state they share on ``app``."""
    if aiohttp_jinja2.APP_KEY not in app:
        setup_templates(app)
    signer = SessionSigner(secret_key)
    versions = _VersionCache(accounts)
    app[ACCOUNTS] = accounts
    app[SESSIONS] = signer
    app[THROTTLE] = LoginThrottle()
    app[DASHBOARD] = dashboard
    app.middlewares.append(_auth_middleware(accounts, signer, versions, public_paths))
    app.router.add_routes(_routes(versions))


def current_user(request: web.Request) -> User:
    return request[USER]


def _auth_middleware(accounts: Accounts, signer: SessionSigner, versions: _VersionCache,
                     public_paths: frozenset[str]) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in public_paths:
            return await handler(request)
        header = token_from_header(request.headers.get("Authorization"))
        if header is not None:
            user = await accounts.verify_token(header)
            if user is None:
                return json_error(401, "invalid token")
            request[USER] = user
            return await handler(request)
        session = signer.read(request.cookies.get(SESSION_COOKIE))
        if session is not None:
            user, version = await versions.lookup(session[0])
            if user is not None and version == session[1]:
                problem = cross_origin_refusal(request)
                if problem is not None:
                    return json_error(403, problem, "forbidden")
                request[USER] = user
                request[_COOKIE_VALUE] = request.cookies[SESSION_COOKIE]
                return await handler(request)
        if wants_html(request):
            raise web.HTTPFound(f"/login?next={request.rel_url.path_qs}")
        return json_error(401, "log in at /login, or send 'Authorization: Bearer <your API token>'")

    return middleware


def _client_address(request: web.Request) -> str:
    return request.remote or "unknown"


def _check_csrf(request: web.Request, form: Any) -> None:
    expected = request.app[SESSIONS].csrf_token(request.get(_COOKIE_VALUE, ""))
    given = form.get("csrf")
    if not same_origin(request) or not isinstance(given, str) or not hmac.compare_digest(given, expected):
        raise web.HTTPForbidden(text='{"error": {"type": "forbidden", "message": "CSRF check failed"}}',
                                content_type="application/json")


def _page_context(request: web.Request, **values: Any) -> dict[str, Any]:
    cookie = request.get(_COOKIE_VALUE, "")
    return {"user": request.get(USER), "csrf": request.app[SESSIONS].csrf_token(cookie) if cookie else "",
            **values}


def _require_admin(request: web.Request) -> User:
    user = current_user(request)
    if not user.is_admin:
        raise web.HTTPForbidden(text='{"error": {"type": "forbidden", "message": "admins only"}}',
                                content_type="application/json")
    return user


def _routes(versions: _VersionCache) -> list[web.RouteDef]:
    async def login_form(request: web.Request) -> web.StreamResponse:
        return aiohttp_jinja2.render_template("cluster_login.html", request, {
            "next": safe_next(request.query.get("next")), "error": None, "name": ""})

    async def login_submit(request: web.Request) -> web.StreamResponse:
        if not same_origin(request):
            return json_error(403, "cross-origin login refused", "forbidden")
        form = await request.post()
        name, password = str(form.get("name") or ""), str(form.get("password") or "")
        next_path = safe_next(str(form.get("next") or "/"))
        throttle = request.app[THROTTLE]
        keys = [f"name:{name.lower()}", f"addr:{_client_address(request)}"]
        wait = throttle.retry_after(keys)
        if wait:
            response = aiohttp_jinja2.render_template("cluster_login.html", request, {
                "next": next_path, "name": name, "error": f"Too many failed logins. Try again in {wait} s."})
            response.set_status(429)
            response.headers["Retry-After"] = str(wait)
            return response
        user = await request.app[ACCOUNTS].verify_password(name, password)
        if user is None:
            throttle.failed(keys)
            response = aiohttp_jinja2.render_template("cluster_login.html", request, {
                "next": next_path, "name": name, "error": "Wrong name or password."})
            response.set_status(401)
            return response
        throttle.succeeded(keys[0])
        session = await request.app[ACCOUNTS].session(user.name)
        version = session[1] if session is not None else 0
        response = web.HTTPFound(next_path)
        response.set_cookie(SESSION_COOKIE, request.app[SESSIONS].make(user.name, version),
                            max_age=SESSION_TTL_S, httponly=True, samesite="Lax", path="/")
        raise response

    async def logout(request: web.Request) -> web.StreamResponse:
        if not same_origin(request):
            return json_error(403, "cross-origin logout refused", "forbidden")
        response = web.HTTPFound("/login")
        response.del_cookie(SESSION_COOKIE, path="/")
        raise response

    async def dashboard(request: web.Request) -> web.StreamResponse:
        user = current_user(request)
        provider = request.app[DASHBOARD]
        view = await provider.user_view(user) if provider is not None else {}
        return aiohttp_jinja2.render_template("dashboard.html", request, _page_context(
            request, queue=view.get("queue", []), history=view.get("history", []),
            instances=view.get("instances", [])))

    async def admin_page(request: web.Request, message: str | None = None, new_token: str | None = None,
                         status: int = 200) -> web.StreamResponse:
        user = _require_admin(request)
        provider = request.app[DASHBOARD]
        view = await provider.user_view(user) if provider is not None else {}
        response = aiohttp_jinja2.render_template("admin.html", request, _page_context(
            request, users=await request.app[ACCOUNTS].list(), instances=view.get("instances", []),
            message=message, new_token=new_token))
        response.set_status(status)
        return response

    async def admin(request: web.Request) -> web.StreamResponse:
        return await admin_page(request)

    async def admin_users(request: web.Request) -> web.StreamResponse:
        _require_admin(request)
        form = await request.post()
        _check_csrf(request, form)
        action, name = str(form.get("action") or "add"), str(form.get("name") or "")
        accounts = request.app[ACCOUNTS]
        try:
            if action == "add":
                token = await accounts.add(name, str(form.get("password") or ""), admin=form.get("admin") == "on")
                return await admin_page(request, f"User {name} added.", token)
            if action == "remove":
                if name == current_user(request).name:
                    raise AccountError("you cannot remove yourself")
                removed = await accounts.remove(name)
                versions.forget(name)
                return await admin_page(request, f"User {name} removed." if removed else f"No user {name}.")
            if action == "reset-token":
                token = await accounts.reset_token(name)
                versions.forget(name)
                return await admin_page(request, f"New token for {name}.", token)
        except AccountError as exc:
            return await admin_page(request, str(exc), status=400)
        return await admin_page(request, f"unknown action {action!r}", status=400)

    async def admin_instances(request: web.Request) -> web.StreamResponse:
        _require_admin(request)
        form = await request.post()
        _check_csrf(request, form)
        url = str(form.get("url") or "").strip()
        provider = request.app[DASHBOARD]
        if provider is None or not url.startswith(("http://", "https://")):
            return await admin_page(request, "Give an instance URL (http://host:port).", status=400)
        try:
            await provider.add_instance(url)
        except ValueError as exc:
            return await admin_page(request, str(exc), status=400)
        return await admin_page(request, f"Instance {url} added.")

    return [
        web.get("/login", login_form), web.post("/login", login_submit), web.post("/logout", logout),
        web.get("/dashboard", dashboard), web.get("/admin", admin),
        web.post("/admin/users", admin_users), web.post("/admin/instances", admin_instances),
    ]
