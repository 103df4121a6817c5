"""Token auth for every comfyserve server (DESIGN §3).

API clients send ``Authorization: <token>`` (the cloud platform's raw form) or
``Authorization: Bearer <token>``. A browser logs in once at ``/login`` with
the token and then carries a signed session cookie. Tokens are compared in
constant time. The queue service and the editions use this same middleware.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import urlsplit

from aiohttp import web

from .server.http_util import read_form

SESSION_COOKIE = "comfyserve_session"
SESSION_TTL_S = 7 * 24 * 3600
DEFAULT_PUBLIC_PATHS: frozenset[str] = frozenset({"/healthz"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def tokens_equal(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented token with the expected one."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


def token_from_header(value: str | None) -> str | None:
    """The token in an Authorization header, raw or ``Bearer``."""
    if not value:
        return None
    value = value.strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer" and rest:
        return rest.strip()
    return value


def make_session_cookie(token: str, now_s: float | None = None) -> str:
    """A cookie value that proves a past login with ``token``; expires on its own."""
    expires = int((now_s if now_s is not None else time.time()) + SESSION_TTL_S)
    mac = hmac.new(token.encode(), f"session:{expires}".encode(), hashlib.sha256).hexdigest()
    return f"{expires}.{mac}"


def session_cookie_valid(value: str | None, token: str, now_s: float | None = None) -> bool:
    if not value or "." not in value:
        return False
    expires_s, _, mac = value.partition(".")
    if not expires_s.isdigit() or int(expires_s) < (now_s if now_s is not None else time.time()):
        return False
    expected = hmac.new(token.encode(), f"session:{expires_s}".encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac.encode(), expected.encode())


def same_origin(request: web.Request) -> bool:
    """True when the request has no Origin header or it names this host."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc == request.host


def json_error(status: int, message: str, kind: str = "unauthorized") -> web.Response:
    return web.json_response({"error": {"type": kind, "message": message}}, status=status)


def wants_html(request: web.Request) -> bool:
    return request.method == "GET" and "text/html" in request.headers.get("Accept", "")


def token_auth_middleware(
    token: str,
    *,
    public_paths: Iterable[str] = DEFAULT_PUBLIC_PATHS,
    public_prefixes: Iterable[str] = (),
    login_path: str | None = "/login",
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Middleware requiring ``token`` on every route but ``public_paths``.

    Accepted proofs: the Authorization header; the session cookie (not for
    state-changing requests from another origin, which is CSRF); a ``token``
    query parameter from the same origin (for ``<img src>`` and WebSocket
    clients that cannot set headers). A browser asking for HTML is sent to
    ``login_path`` instead of getting a 401.
    """
    public = frozenset(public_paths) | ({login_path} if login_path else frozenset())
    prefixes = tuple(public_prefixes)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path in public or (prefixes and path.startswith(prefixes)):
            return await handler(request)
        header_token = token_from_header(request.headers.get("Authorization"))
        if header_token is not None:
            if tokens_equal(header_token, token):
                return await handler(request)
            return json_error(401, "invalid token")
        query_token = request.query.get("token")
        if query_token is not None:
            if not same_origin(request):
                return json_error(403, "token in query string from another origin", "forbidden")
            if tokens_equal(query_token, token):
                return await handler(request)
            return json_error(401, "invalid token")
        if session_cookie_valid(request.cookies.get(SESSION_COOKIE), token):
            if request.method not in ("GET", "HEAD", "OPTIONS") and not same_origin(request):
                return json_error(403, "cross-origin request refused", "forbidden")
            return await handler(request)
        if login_path and wants_html(request):
            raise web.HTTPFound(f"{login_path}?next={request.rel_url.path_qs}")
        return json_error(401, "missing token: send 'Authorization: <token>' or 'Bearer <token>'")

    return middleware


def safe_next(target: str | None) -> str:
    """Only same-site relative paths are followed after login (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def token_login_routes(token: str, *, login_path: str = "/login") -> list[web.RouteDef]:
    """GET/POST ``/login`` (token form -> session cookie) and ``/logout``."""
    import aiohttp_jinja2

    async def login_form(request: web.Request) -> web.StreamResponse:
        return aiohttp_jinja2.render_template(
            "token_login.html", request, {"next": safe_next(request.query.get("next")), "error": None}
        )

    async def login_submit(request: web.Request) -> web.StreamResponse:
        if not same_origin(request):
            return json_error(403, "cross-origin login refused", "forbidden")
        form = await read_form(request)
        given = form.get("token")
        next_path = safe_next(str(form.get("next") or "/"))
        if not isinstance(given, str) or not tokens_equal(given, token):
            response = aiohttp_jinja2.render_template(
                "token_login.html", request, {"next": next_path, "error": "Wrong token."}
            )
            response.set_status(401)
            return response
        response = web.HTTPFound(next_path)
        response.set_cookie(
            SESSION_COOKIE, make_session_cookie(token), max_age=SESSION_TTL_S,
            httponly=True, samesite="Lax", path="/",
        )
        raise response

    async def logout(request: web.Request) -> web.StreamResponse:
        response = web.HTTPFound(login_path)
        response.del_cookie(SESSION_COOKIE, path="/")
        raise response

    return [
        web.get(login_path, login_form),
        web.post(login_path, login_submit),
        web.post("/logout", logout),
    ]
