"""Operations routes: /healthz, /readyz, /metrics and /restart.

``POST /restart`` reloads in place (re-scans models, re-imports plugins) and is
refused with 409 while a prompt runs: waiting could block the caller for the
length of a whole workflow, and a 409 tells an operator exactly what to do
(interrupt, or retry later). Queued prompts wait for the reload and then run.
"""

from __future__ import annotations

from aiohttp import web

from ..http_util import json_error
from ..serving import draining_headers, is_draining
from ..supervised import instance_identity
from .context import prompt_server
from .prompt_server import RestartRefused

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """This process answers; a supervised child also names itself (``standard.supervised``)."""
    return web.json_response({"status": "ok", **instance_identity()})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    detail = prompt_server(request).engine_status()
    if is_draining(request.app):  # a load balancer sends no new work here
        return web.json_response({**detail, "ready": False, "draining": True}, status=503,
                                 headers=draining_headers())
    return web.json_response(detail, status=200 if detail["ready"] else 503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    return prompt_server(request).metrics.response()


@routes.post("/restart")
async def restart(request: web.Request) -> web.Response:
    server = prompt_server(request)
    try:
        status = await server.reload()
    except RestartRefused as exc:
        raise json_error(409, "prompt_running", "cannot restart while a prompt runs", str(exc)) from None
    return web.json_response({"restarted": True, **status}, status=200 if status["ready"] else 503)
