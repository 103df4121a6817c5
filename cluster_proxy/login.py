"""Who is asking: login pages, session cookies and API tokens for the cluster proxy.

``setup_login`` puts a middleware in front of every route that sets
``request[USER]`` (a :class:`~cluster_proxy.accounts.User`) from a
session cookie (browsers, after ``/login``) or a per-user API token in
``Authorization`` (raw or ``Bearer``). It also serves login and logout; the
dashboard, account and admin pages are in ``pages.py``. The cookie holds a
random session id whose record lives in the accounts store (see
``accounts_store.py``): logout, a password change, disabling or removing the
account delete it there, at once on this proxy and within
``accounts.SESSION_CACHE_S`` on proxies sharing Redis. Failed logins are
throttled (``throttle.py``); state-changing requests carrying only a cookie
must come from our own origin, and our forms carry a CSRF token.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp_jinja2
from aiohttp import web

from standard.auth import AccessGuard, safe_next, same_origin, token_from_header, wants_html
from standard.datadir import DataDir
from standard.guard import client_address, cross_origin_refusal
from standard.http_util import json_error, read_form
from standard.pages import setup_templates
from standard.private import load_or_create_key

from .accounts import AccountError, Accounts, User
from .throttle import LoginThrottle

SESSION_COOKIE = "comfyserve_cluster_session"
SESSION_TTL_S = 7 * 24 * 3600
# /logout is public so a browser whose session was already revoked can still clear its cookie.
DEFAULT_PUBLIC_PATHS = frozenset({"/login", "/logout", "/healthz", "/api/healthz", "/readyz", "/api/readyz"})

ACCOUNTS = web.AppKey("cluster_accounts", Accounts)
CSRF = web.AppKey("cluster_csrf", "CsrfTokens")
THROTTLE = web.AppKey("cluster_login_throttle", LoginThrottle)
DASHBOARD = web.AppKey("cluster_dashboard", object)
USER = web.RequestKey("user", User)  # request[USER]: who is asking (set by the middleware)
SESSION_ID = web.RequestKey("cluster_session_id", str)  # set when the request came with a live session cookie

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class DashboardProvider(Protocol):
    """What the cluster core shows on the dashboard and does from the admin page."""

    async def user_view(self, user: User) -> dict[str, Any]: ...
    async def add_instance(self, url: str) -> None: ...
    async def remove_instance(self, url: str, *, drain: bool) -> bool: ...
    async def remove_user(self, name: str, account_id: str) -> None: ...
    async def disconnect_user(self, name: str) -> None: ...


def load_or_create_secret(data_dir: DataDir) -> str:
    """The CSRF key kept in the data dir, so restarts and sibling proxies accept open pages' forms."""
    return load_or_create_key(data_dir.root / ".comfyserve" / "secret_key")


class CsrfTokens:
    """A form's CSRF value: a MAC of the session id, so it is worthless without the cookie."""

    def __init__(self, secret_key: str) -> None:
        self._key = hashlib.sha256(("comfyserve-cluster-session:" + secret_key).encode()).digest()

    def for_session(self, session_id: str) -> str:
        return hmac.new(self._key, ("csrf|" + session_id).encode(), hashlib.sha256).hexdigest()[:32]


def setup_login(app: web.Application, accounts: Accounts, secret_key: str, *,
                public_paths: frozenset[str] = DEFAULT_PUBLIC_PATHS,
                dashboard: DashboardProvider | None = None, throttle: LoginThrottle | None = None,
                guard: AccessGuard | None = None) -> None:
    """Install the middleware, the pages and the state they share on ``app``.

    ``guard`` is the role's access guard: wrong API tokens count in its per-address throttle, as wrong
    service tokens do on every other role.
    """
    from .pages import page_routes

    if aiohttp_jinja2.APP_KEY not in app:
        setup_templates(app)
    app[ACCOUNTS] = accounts
    app[CSRF] = CsrfTokens(secret_key)
    app[THROTTLE] = throttle or LoginThrottle()
    app[DASHBOARD] = dashboard
    app.middlewares.append(_auth_middleware(accounts, public_paths, guard))
    app.router.add_routes(_routes() + page_routes())


def current_user(request: web.Request) -> User:
    return request[USER]


def _auth_middleware(accounts: Accounts, public_paths: frozenset[str], guard: AccessGuard | None
                     ) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in public_paths:
            return await handler(request)
        header = token_from_header(request.headers.get("Authorization"))
        if header is not None:
            if guard is not None:
                guard.refuse_if_throttled(request)
            user = await accounts.verify_token(header)
            if user is None:
                if guard is not None:
                    guard.throttle.failed(client_address(request))
                raise json_error(401, "unauthorized", "invalid token")
            request[USER] = user
            return await handler(request)
        session_id = request.cookies.get(SESSION_COOKIE)
        if session_id:
            user = await accounts.session_user(session_id)
            if user is not None:
                problem = cross_origin_refusal(request)
                if problem is not None:
                    raise json_error(403, "forbidden", problem)
                request[USER] = user
                request[SESSION_ID] = session_id
                return await handler(request)
        if wants_html(request):
            raise web.HTTPFound(f"/login?next={request.rel_url.path_qs}")
        raise json_error(401, "unauthorized", "log in at /login, or send 'Authorization: Bearer <your API token>'")

    return middleware


def check_csrf(request: web.Request, form: Any) -> None:
    expected = request.app[CSRF].for_session(request.get(SESSION_ID, ""))
    given = form.get("csrf")
    if not same_origin(request) or not isinstance(given, str) or not hmac.compare_digest(given, expected):
        raise json_error(403, "forbidden", "CSRF check failed")


def page_context(request: web.Request, **values: Any) -> dict[str, Any]:
    session_id = request.get(SESSION_ID, "")
    return {"user": request.get(USER), "csrf": request.app[CSRF].for_session(session_id) if session_id else "",
            **values}


def _login_page(request: web.Request, next_path: str, name: str, error: str, status: int) -> web.StreamResponse:
    response = aiohttp_jinja2.render_template("cluster_login.html", request, {
        "next": next_path, "name": name, "error": error})
    response.set_status(status)
    return response


def _routes() -> list[web.RouteDef]:
    async def login_form(request: web.Request) -> web.StreamResponse:
        return aiohttp_jinja2.render_template("cluster_login.html", request, {
            "next": safe_next(request.query.get("next")), "error": None, "name": ""})

    async def login_submit(request: web.Request) -> web.StreamResponse:
        if not same_origin(request):
            raise json_error(403, "forbidden", "cross-origin login refused")
        form = await read_form(request)
        name, password = str(form.get("name") or ""), str(form.get("password") or "")
        next_path = safe_next(str(form.get("next") or "/"))
        throttle, address = request.app[THROTTLE], client_address(request)
        wait_s, pause_s = throttle.attempt(name, address)
        if wait_s:
            response = _login_page(request, next_path, name, f"Too many failed logins. Try again in {wait_s} s.", 429)
            response.headers["Retry-After"] = str(wait_s)
            return response
        if pause_s:
            await throttle.pause(pause_s)
        accounts = request.app[ACCOUNTS]
        user = await accounts.verify_password(name, password)
        if user is None:
            return _login_page(request, next_path, name, "Wrong name or password.", 401)
        throttle.succeeded(name, address)
        if user.disabled:
            return _login_page(request, next_path, name, "This account is disabled. Ask an admin.", 403)
        try:
            session_id = await accounts.start_session(user.name, SESSION_TTL_S)
        except AccountError:  # removed or disabled in between
            return _login_page(request, next_path, name, "Wrong name or password.", 401)
        response = web.HTTPFound(next_path)
        response.set_cookie(SESSION_COOKIE, session_id, max_age=SESSION_TTL_S, httponly=True, samesite="Lax",
                            path="/")
        raise response

    async def logout(request: web.Request) -> web.StreamResponse:
        if not same_origin(request):
            raise json_error(403, "forbidden", "cross-origin logout refused")
        session_id = request.cookies.get(SESSION_COOKIE)
        if session_id:
            await request.app[ACCOUNTS].end_session(session_id)
        response = web.HTTPFound("/login")
        response.del_cookie(SESSION_COOKIE, path="/")
        raise response

    return [web.get("/login", login_form), web.post("/login", login_submit), web.post("/logout", logout)]
