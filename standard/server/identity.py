"""``GET /comfyserve/me``: who the page is signed in as, for our frontend extension's user menu.

The standard edition has one identity, the token holder: the answer says whether a login
(and so a logout) exists. The cluster edition answers with the account (see
``cluster_proxy.pages``), in the same shape, so one extension serves both editions.
The route is behind the role's access guard like every other API route.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..guard import origin_problem
from ..http_util import json_error

ME_PATH = "/comfyserve/me"


def identity(name: str | None, *, admin: bool, login: bool, links: dict[str, str]) -> dict[str, Any]:
    """The answer's shape: ``login`` tells the page a 401 means "log in again" at ``/login``."""
    return {"name": name, "admin": admin, "login": login, "links": links}


def refuse_foreign_origin(request: web.Request) -> None:
    """Who one is signed in as is for our own pages only: a page of another origin gets 403."""
    problem = origin_problem(request)
    if problem is not None:
        raise json_error(403, "forbidden", problem)


def token_identity_routes(*, login: bool) -> list[web.RouteDef]:
    """``/comfyserve/me`` and ``/api/comfyserve/me`` for a standard-edition app (``login``: a token is set)."""
    body = identity(None, admin=True, login=login, links={"logout": "/logout"} if login else {})

    async def me(request: web.Request) -> web.Response:
        refuse_foreign_origin(request)
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    return [web.get(ME_PATH, me), web.get("/api" + ME_PATH, me)]
