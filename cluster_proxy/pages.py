"""Our own pages behind the login: the dashboard, the user's account, the admin page.

``/account`` (page) and ``POST /account/password`` (JSON, for API-token users)
change one's own password: the current password is needed (and its wrong
guesses are throttled like logins), and every other session of the account
ends. The admin page adds and removes users, resets their token or password,
disables and enables them, and adds instances; every form carries a CSRF value.
``setup_pages`` installs them, after ``login.setup_login`` (whose keys and
middleware they build on).
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import aiohttp_jinja2
from aiohttp import web

from standard.auth import wants_html
from standard.guard import client_address
from standard.http_util import json_error, parse_json, read_form
from standard.server.identity import ME_PATH, identity, refuse_foreign_origin
from standard.serving import is_draining

from .accounts import NAME_PATTERN, AccountError, User
from .dashboard import LIVE_CHECK_S
from .login import ACCOUNTS, SESSION_ID, THROTTLE, USER, check_csrf, page_context
from .pool import instance_url, shown
from .usage import PeriodError, parse_period

KEEPALIVE_S = 15.0
NAME_HINT = "A user name is letters, digits, '_', '.' and '-', at most 64, starting with a letter or digit."


class DashboardProvider(Protocol):
    """What the cluster core shows on the dashboard and does from the admin page."""

    async def user_view(self, user: User) -> dict[str, Any]: ...
    async def add_instance(self, url: str) -> None: ...
    async def remove_instance(self, url: str, *, drain: bool) -> bool: ...
    async def remove_user(self, name: str, account_id: str) -> None: ...
    async def disconnect_user(self, name: str) -> None: ...


DASHBOARD: web.AppKey[DashboardProvider | None] = web.AppKey("cluster_dashboard")


def setup_pages(app: web.Application, dashboard: DashboardProvider | None = None) -> None:
    """Serve the dashboard, account and admin pages on ``app``, which ``setup_login`` set up first."""
    app[DASHBOARD] = dashboard
    app.router.add_routes(page_routes())


def _require_admin(request: web.Request) -> User:
    """The admin asking; anyone else gets 403: an HTML page with a way back for a browser, JSON for scripts."""
    user = request[USER]
    if not user.is_admin:
        message = f"The admin pages are for admins; {user.name} is not one. Ask an admin if you need something here."
        if wants_html(request):
            response = aiohttp_jinja2.render_template("forbidden.html", request, page_context(request, message=message))
            response.set_status(403)
            raise web.HTTPForbidden(body=response.body, headers={"Content-Type": "text/html; charset=utf-8"})
        raise json_error(403, "forbidden", "admins only")
    return user


async def _change_own_password(request: web.Request, current: str, new: str) -> tuple[int, str, int]:
    """(status, message, retry-after seconds) of a user's own change; the session it came with stays."""
    user, accounts = request[USER], request.app[ACCOUNTS]
    throttle, address = request.app[THROTTLE], client_address(request)
    wait_s, pause_s = throttle.attempt(user.name, address)
    if wait_s:
        return 429, f"Too many wrong passwords. Try again in {wait_s} s.", wait_s
    if pause_s:
        await throttle.pause(pause_s)
    if await accounts.verify_password(user.name, current) is None:
        return 400, "The current password is wrong.", 0
    throttle.succeeded(user.name, address)
    try:
        await accounts.set_password(user.name, new, keep_session=request.get(SESSION_ID))
    except AccountError as exc:
        return 400, str(exc), 0
    return 200, "Password changed. Your other sessions were signed out.", 0


def _links(user: User) -> dict[str, str]:
    links = {"dashboard": "/dashboard", "account": "/account", "logout": "/logout"}
    return {**links, "admin": "/admin"} if user.is_admin else links


def page_routes() -> list[web.RouteDef]:
    async def me(request: web.Request) -> web.StreamResponse:
        refuse_foreign_origin(request)
        user = request[USER]
        return web.json_response(identity(user.name, admin=user.is_admin, login=True, links=_links(user)),
                                 headers={"Cache-Control": "no-store"})

    async def dashboard_view(request: web.Request) -> dict[str, Any]:
        provider = request.app[DASHBOARD]
        view = await provider.user_view(request[USER]) if provider is not None else {}
        return page_context(request, queue=view.get("queue", []), history=view.get("history", []),
                            instances=view.get("instances", []))

    async def dashboard(request: web.Request) -> web.StreamResponse:
        return aiohttp_jinja2.render_template("dashboard.html", request, await dashboard_view(request))

    async def dashboard_events(request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: the dashboard's task tables (HTML), sent again whenever they change."""
        refuse_foreign_origin(request)
        changes = getattr(request.app[DASHBOARD], "changes", None)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        template = aiohttp_jinja2.get_env(request.app).get_template("_dashboard_tasks.html")
        sent, quiet_s = None, 0.0
        # Ends when the page goes away or the proxy drains (an open stream must not hold a shutdown).
        while not is_draining(request.app):
            html = template.render(await dashboard_view(request))
            try:
                if html != sent:
                    data = "".join(f"data: {line}\n" for line in html.splitlines())
                    await response.write(f"event: tasks\n{data}\n".encode())
                    sent, quiet_s = html, 0.0
                elif quiet_s >= KEEPALIVE_S:  # a comment, so proxies keep an idle stream open
                    await response.write(b": keep-alive\n\n")
                    quiet_s = 0.0
            except (ConnectionError, RuntimeError):  # the page was closed
                return response
            if changes is None:
                return response
            started = time.monotonic()
            await changes.wait(LIVE_CHECK_S)
            quiet_s += time.monotonic() - started
        return response

    async def account_page(request: web.Request, message: str | None = None, status: int = 200) -> web.StreamResponse:
        response = aiohttp_jinja2.render_template("account.html", request, page_context(request, message=message))
        response.set_status(status)
        return response

    async def account(request: web.Request) -> web.StreamResponse:
        return await account_page(request)

    async def account_submit(request: web.Request) -> web.StreamResponse:
        form = await read_form(request)
        check_csrf(request, form)
        new = str(form.get("new_password") or "")
        if new != str(form.get("new_password_again") or ""):
            return await account_page(request, "The new passwords differ.", 400)
        status, message, wait_s = await _change_own_password(request, str(form.get("current_password") or ""), new)
        response = await account_page(request, message, status)
        if wait_s:
            response.headers["Retry-After"] = str(wait_s)
        return response

    async def account_password(request: web.Request) -> web.StreamResponse:
        try:
            body = parse_json(await request.read())  # the project's reader: depth-bounded, no NaN
        except ValueError:
            body = None
        if not isinstance(body, dict) or not all(isinstance(body.get(k), str)
                                                 for k in ("current_password", "new_password")):
            raise json_error(400, "invalid_request", 'send {"current_password": "...", "new_password": "..."}')
        status, message, wait_s = await _change_own_password(request, body["current_password"],
                                                             body["new_password"])
        if status != 200:
            raise json_error(status, "too_many_requests" if wait_s else "invalid_request", message,
                             headers={"Retry-After": str(wait_s)} if wait_s else None)
        return web.json_response({"ok": True, "message": message})

    async def admin_page(request: web.Request, message: str | None = None, new_token: str | None = None,
                         status: int = 200) -> web.StreamResponse:
        user = _require_admin(request)
        provider = request.app[DASHBOARD]
        view = await provider.user_view(user) if provider is not None else {}
        try:
            period = parse_period(request.query)
        except PeriodError as exc:
            period, message, status = parse_period({}), str(exc), 400
        meter = getattr(provider, "usage", None)
        usage = await meter.report(period) if meter is not None else None
        response = aiohttp_jinja2.render_template("admin.html", request, page_context(
            request, users=await request.app[ACCOUNTS].list(), instances=view.get("instances", []),
            message=message, new_token=new_token, usage=usage, query=request.query))
        response.set_status(status)
        return response

    async def admin(request: web.Request) -> web.StreamResponse:
        return await admin_page(request)

    async def admin_users(request: web.Request) -> web.StreamResponse:
        _require_admin(request)
        form = await read_form(request)
        check_csrf(request, form)
        action, name = str(form.get("action") or "add"), str(form.get("name") or "")
        accounts, provider = request.app[ACCOUNTS], request.app[DASHBOARD]
        if not NAME_PATTERN.match(name):  # never echo a huge or odd name back; no account has one
            return await admin_page(request, NAME_HINT, status=400)
        try:
            if action == "add":
                token = await accounts.add(name, str(form.get("password") or ""), admin=form.get("admin") == "on")
                return await admin_page(request, f"User {name} added.", token)
            if action in ("remove", "disable", "make-admin", "drop-admin") and name == request[USER].name:
                raise AccountError(f"you cannot {action} yourself")
            if action == "remove":
                account_id = await accounts.remove(name)
                if account_id is None:
                    return await admin_page(request, f"No user {name}.", status=400)
                if provider is not None:
                    await provider.remove_user(name, account_id)
                return await admin_page(request, f"User {name} removed; their files were moved aside.")
            if action == "reset-token":
                token = await accounts.reset_token(name)
                message, shown = f"New token for {name}.", token
            elif action == "passwd":
                mine = request.get(SESSION_ID) if name == request[USER].name else None
                await accounts.set_password(name, str(form.get("password") or ""), keep_session=mine)
                message, shown = f"New password for {name}; their sessions were signed out.", None
            elif action in ("make-admin", "drop-admin"):
                await accounts.set_admin(name, action == "make-admin")
                message, shown = f"User {name} is {'now' if action == 'make-admin' else 'no longer'} an admin.", None
            elif action in ("disable", "enable"):
                await accounts.set_disabled(name, action == "disable")
                message, shown = f"User {name} {action}d.", None
            else:
                return await admin_page(request, f"unknown action {action[:40]!r}", status=400)
            if provider is not None and name != request[USER].name:
                await provider.disconnect_user(name)
            return await admin_page(request, message, shown)
        except AccountError as exc:
            return await admin_page(request, str(exc), status=400)

    async def admin_instances(request: web.Request) -> web.StreamResponse:
        _require_admin(request)
        form = await read_form(request)
        check_csrf(request, form)
        action, provider = str(form.get("action") or "add"), request.app[DASHBOARD]
        try:
            url = instance_url(str(form.get("url") or "").strip())
        except ValueError as exc:
            return await admin_page(request, str(exc), status=400)
        if provider is None:
            return await admin_page(request, "This proxy has no pool.", status=400)
        if action in ("remove", "drain"):
            if not await provider.remove_instance(url, drain=action == "drain"):
                return await admin_page(request, f"No instance {shown(url)} in the pool.", status=400)
            if action == "drain":
                return await admin_page(request, f"Instance {url} takes no new task; it leaves when its task ends.")
            return await admin_page(request, f"Instance {url} removed; a task it was running runs again elsewhere.")
        if action != "add":
            return await admin_page(request, f"unknown action {action[:40]!r}", status=400)
        try:
            await provider.add_instance(url)
        except ValueError as exc:
            return await admin_page(request, str(exc), status=400)
        return await admin_page(request, f"Instance {url} added.")

    return [
        web.get(ME_PATH, me), web.get("/api" + ME_PATH, me),
        web.get("/dashboard", dashboard), web.get("/dashboard/events", dashboard_events),
        web.get("/account", account), web.post("/account", account_submit),
        web.post("/account/password", account_password), web.get("/admin", admin),
        web.post("/admin/users", admin_users), web.post("/admin/instances", admin_instances),
    ]

