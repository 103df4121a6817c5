"""Registering every route twice, as ``/X`` and ``/api/X``, like ComfyUI's server does.

The frontend calls ``/api/X``; older clients and scripts call ``/X``.
"""

from __future__ import annotations

from aiohttp import web


def add_routes_with_api_prefix(app: web.Application, routes: web.RouteTableDef) -> None:
    """Add each route of ``routes`` under its own path and under ``/api`` + path.

    Static routes are added once, unprefixed (ComfyUI does the same).
    """
    prefixed: list[web.AbstractRouteDef] = []
    plain: list[web.AbstractRouteDef] = []
    for route in routes:
        plain.append(route)
        if isinstance(route, web.RouteDef):
            prefixed.append(web.route(route.method, "/api" + route.path, route.handler, **route.kwargs))
    app.router.add_routes(prefixed)
    app.router.add_routes(plain)
