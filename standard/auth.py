"""Token auth for every comfyserve server: who may call what, the token's half of it.

API clients send ``Authorization: <token>`` (the cloud platform's raw form) or
``Authorization: Bearer <token>``. A browser logs in once at ``/login`` with
the token and then carries a signed session cookie. Tokens are compared in
constant time. Every role but the cluster (whose logins are its own) puts an
:class:`AccessGuard` first: it also holds the no-token mode's ``Host`` and
``Origin`` checks (the rules are in ``standard.guard``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import unquote

from aiohttp import web

from .guard import (
    DEFAULT_POLICY,
    POLICY,
    SHORT_TOKEN_CHARS,
    AccessPolicy,
    FailureThrottle,
    client_address,
    cookie_secure,
    cross_origin_refusal,
    origin_problem,
    request_host,
)
from .http_util import json_error, read_form

SESSION_COOKIE = "comfyserve_session"
SESSION_TTL_S = 7 * 24 * 3600
DEFAULT_PUBLIC_PATHS: frozenset[str] = frozenset({"/healthz"})
# A ComfyUI-protocol instance (embedded or in front of a ComfyUI) serves every route as /X and /api/X.
INSTANCE_PUBLIC_PATHS: frozenset[str] = frozenset({"/healthz", "/api/healthz"})
MAX_NEXT_CHARS = 2048

log = logging.getLogger("comfyserve.auth")

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
    """True when the request has no Origin header or it is this server's own (opaque origins are not)."""
    return origin_problem(request) is None


def wants_html(request: web.Request) -> bool:
    return request.method == "GET" and "text/html" in request.headers.get("Accept", "")


class AccessGuard:
    """The one auth middleware of a role, HTTP and WebSocket alike.

    Who may call what: the rules are in ``standard.guard``.

    ``token=None``: open mode (loopback, or ``--no-auth``): only ``Host`` and
    ``Origin`` protect the server (see ``standard.guard``). With a token the
    accepted proofs are: the Authorization header; the session cookie (not for
    state-changing requests or WebSocket upgrades from another or an opaque
    origin: CSRF); a ``token`` query parameter from the same origin (for
    ``<img src>`` and WebSocket clients that cannot set headers). A browser
    asking for HTML is sent to ``login_path`` instead of getting a 401. Wrong
    tokens are slowed per client address (429 + Retry-After). Cookies set
    behind it are marked ``Secure`` over https.
    ``external_auth=True``: another middleware (the cluster's logins) decides
    on credentials; this one only sets the policy and checks ``Host``.
    """

    def __init__(self, policy: AccessPolicy = DEFAULT_POLICY, *, token: str | None = None,
                 public_paths: Iterable[str] = DEFAULT_PUBLIC_PATHS, public_prefixes: Iterable[str] = (),
                 login_path: str | None = "/login", external_auth: bool = False,
                 throttle: FailureThrottle | None = None) -> None:
        self.policy = policy
        self.token = token
        self.login_path = login_path
        self.external_auth = external_auth
        self.open_access = token is None and not external_auth
        self.throttle = throttle or FailureThrottle()
        self.public = frozenset(public_paths) | ({login_path} if login_path and token is not None else frozenset())
        self.prefixes = tuple(public_prefixes)
        # Without a credential the network is the only protection: Host is always checked then.
        self.check_host = self.open_access or policy.hosts_configured
        if token is not None and len(token) < SHORT_TOKEN_CHARS:
            log.warning("the token has only %d characters: use at least %d random ones "
                        "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')",
                        len(token), SHORT_TOKEN_CHARS)

    def relay_allowed(self, host_header: str | None) -> bool:
        """For the byte-level fast path: may it relay a request with a good token and this Host itself?"""
        if self.check_host and (self.policy.trusted_proxies or not self.policy.host_allowed(host_header)):
            return False  # behind a trusted proxy the Host to check may be its X-Forwarded-Host: slow path
        return not self.throttle.busy()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        request[POLICY] = self.policy
        try:
            response = await self._decide(request, handler)
        except web.HTTPException as exc:  # a raised redirect may set a cookie too (the logins do)
            _secure_cookies(request, exc)
            raise
        _secure_cookies(request, response)
        return response

    async def _decide(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        public = path in self.public or bool(self.prefixes and path.startswith(self.prefixes))
        if self.check_host and not public and not self.policy.host_allowed(request_host(request)):
            log.warning("request for Host %r refused (not a name this server is reached by)", request_host(request))
            raise json_error(421, "misdirected_request", "this server is not reached by that host name: if it "
                                                         "is yours, start the server with --allowed-host NAME")
        if self.open_access:
            problem = origin_problem(request)
            if problem is not None:
                log.warning("%s %s from Origin %r refused: %s", request.method, path,
                            request.headers.get("Origin"), problem)
                raise json_error(403, "forbidden", problem)
            return await handler(request)
        if self.token is None or public:
            return await handler(request)
        header_token = token_from_header(request.headers.get("Authorization"))
        if header_token is not None:
            return await self._with_token(request, handler, header_token)
        query_token = request.query.get("token")
        if query_token is not None:
            if origin_problem(request) is not None:
                raise json_error(403, "forbidden", "token in query string from another origin")
            return await self._with_token(request, handler, query_token)
        if session_cookie_valid(request.cookies.get(SESSION_COOKIE), self.token):
            problem = cross_origin_refusal(request)
            if problem is not None:
                raise json_error(403, "forbidden", problem)
            return await handler(request)
        if self.login_path and wants_html(request):
            raise web.HTTPFound(f"{self.login_path}?next={request.rel_url.path_qs}")
        raise json_error(401, "unauthorized", "missing token: send 'Authorization: <token>' or 'Bearer <token>'")

    def refuse_if_throttled(self, request: web.Request) -> None:
        """Raises a 429 for an address out of tries (its credential is not even looked at)."""
        wait_s = self.throttle.retry_after_s(client_address(request))
        if wait_s:
            raise json_error(429, "too_many_failures", f"too many wrong tokens from this address: retry in {wait_s} s",
                             headers={"Retry-After": str(wait_s)})

    async def _with_token(self, request: web.Request, handler: Handler, given: str) -> web.StreamResponse:
        assert self.token is not None
        self.refuse_if_throttled(request)
        if tokens_equal(given, self.token):
            return await handler(request)
        self.throttle.failed(client_address(request))
        raise json_error(401, "unauthorized", "invalid token")

    def login_routes(self) -> list[web.RouteDef]:
        """GET/POST ``login_path`` (token form -> session cookie) and ``/logout``."""
        return token_login_routes(self)


def _secure_cookies(request: web.Request, response: web.StreamResponse) -> None:
    """Every cookie we set is ``Secure`` over https (``--secure-cookies``, TLS, a trusted proxy's word)."""
    if response.cookies and cookie_secure(request):
        for morsel in response.cookies.values():
            morsel["secure"] = True


def safe_next(target: str | None) -> str:
    r"""Only same-site relative paths are followed after login (no open redirect).

    Browsers drop tabs and newlines from URLs and read ``\`` as ``/``, so
    ``/<TAB>/evil.example`` or ``/\evil.example`` would become the
    scheme-relative ``//evil.example``. Only printable ASCII without
    backslashes is kept (percent-encode the rest), and neither the path nor
    its percent-decoded form may start with ``//`` or ``/\`` or hold a
    control character (for whatever decodes it once more).
    """
    if not target or len(target) > MAX_NEXT_CHARS or not target.startswith("/"):
        return "/"
    if any(not 0x21 <= ord(ch) <= 0x7E or ch == "\\" for ch in target):
        return "/"
    decoded = unquote(target)
    if target.startswith("//") or decoded.startswith(("//", "/\\")) or any(
            ord(ch) < 0x20 or ord(ch) == 0x7F for ch in decoded):
        return "/"
    return target


def token_login_routes(guard: AccessGuard) -> list[web.RouteDef]:
    """GET/POST ``/login`` (token form -> session cookie) and ``/logout``; wrong tokens count in ``guard``."""
    import aiohttp_jinja2

    token, login_path = guard.token, guard.login_path
    assert token is not None and login_path is not None

    async def login_form(request: web.Request) -> web.StreamResponse:
        return aiohttp_jinja2.render_template(
            "token_login.html", request, {"next": safe_next(request.query.get("next")), "error": None}
        )

    async def login_submit(request: web.Request) -> web.StreamResponse:
        if not same_origin(request):
            raise json_error(403, "forbidden", "cross-origin login refused")
        guard.refuse_if_throttled(request)
        form = await read_form(request)
        given = form.get("token")
        next_path = safe_next(str(form.get("next") or "/"))
        if not isinstance(given, str) or not tokens_equal(given, token):
            guard.throttle.failed(client_address(request))
            response = aiohttp_jinja2.render_template(
                "token_login.html", request, {"next": next_path, "error": "Wrong token."}
            )
            response.set_status(401)
            return response
        response = web.HTTPFound(next_path)
        response.set_cookie(
            SESSION_COOKIE, make_session_cookie(token), max_age=SESSION_TTL_S,
            httponly=True, samesite="Lax", path="/",  # Secure over https: AccessGuard
        )
        raise response

    async def logout(request: web.Request) -> web.StreamResponse:
        if not same_origin(request):
            raise json_error(403, "forbidden", "cross-origin logout refused")
        response = web.HTTPFound(login_path)
        response.del_cookie(SESSION_COOKIE, path="/")
        raise response

    return [
        web.get(login_path, login_form),
        web.post(login_path, login_submit),
        web.post("/logout", logout),
    ]
