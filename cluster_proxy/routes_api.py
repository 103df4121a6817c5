"""The per-user ComfyUI API: /prompt, POST /queue, /interrupt, POST /history, /jobs cancel, /ws.

Everything acts on ``request[USER]``'s tasks only; an id that is not one of
the user's is answered 404 (never "it is someone else's"). The read routes
(``GET /queue``, ``/history``, ``/jobs``) are the standard edition's own
handlers run over the user's tasks (see ``scope.py``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import WSMsgType, web

from standard.auth import same_origin
from standard.http_util import event_socket, json_error, parse_json, read_json_object
from standard.server.context import instance_context
from standard.server.identity import refuse_foreign_origin
from standard.server.prompt_request import delete_ids, invalid_prompt, parse_prompt_request, refused_while_draining
from standard.server.routes_info import server_features
from standard.server.routes_jobs import cancel_ids
from standard.serving import is_draining

from .graph import GraphRefused, check_graph
from .keys import CORE, POOL
from .login import USER
from .store import Task
from .usage import PeriodError, parse_period

log = logging.getLogger("comfyserve.cluster.api")
routes = web.RouteTableDef()
MAX_CLIENT_ID_CHARS = 256


def _not_yours(what: str, ids: list[str]) -> web.HTTPException:
    return json_error(404, "not_found", f"no such {what} in your queue", ", ".join(ids)[:200])


@routes.post("/prompt")
async def post_prompt(request: web.Request) -> web.Response:
    if is_draining(request.app):
        raise refused_while_draining()
    core = request.app[CORE]
    user = request[USER].name
    body = parse_prompt_request(await read_json_object(request, kind="invalid_prompt"))
    prompt, targets = body.prompt, body.targets
    task_id = core.new_task_id()
    prompt_id = body.prompt_id or str(uuid.uuid4())  # ComfyUI's: a canonical UUID
    object_info = await request.app[POOL].cached_json("/object_info")
    try:
        outputs, models = await asyncio.to_thread(check_graph, prompt, object_info, core.workdirs(user), targets,
                                                 core.data_dir.root / "input")
    except GraphRefused as exc:
        node_errors = {}
        if exc.node_id is not None:
            node = prompt.get(exc.node_id)
            class_type = node.get("class_type") if isinstance(node, dict) else None
            node_errors[exc.node_id] = {"errors": [{**exc.error, "extra_info": {}}], "dependent_outputs": [],
                                        "class_type": class_type}
        return web.json_response({"error": exc.error, "node_errors": node_errors}, status=400)
    node_errors = {}
    if core.validator is not None:
        verdict = await core.validator.validate(prompt, targets, object_info, core.workdirs(user))
        if verdict is not None:
            valid, error, node_errors = verdict
            if not valid:
                return web.json_response({"error": error, "node_errors": node_errors}, status=400)
    seq = await core.store.next_seq()
    extra_data, sensitive = body.queued_extra_data()
    number = body.number if body.number is not None else (-seq if body.front else seq)  # an int, as ComfyUI's
    task = Task(id=task_id, user=user, prompt_id=prompt_id, number=number, seq=seq, prompt=prompt,
                extra_data=extra_data, outputs_to_execute=outputs, client_id=body.client_id, sensitive=sensitive,
                models=models)
    if not await core.submit(task):
        raise invalid_prompt(f"prompt_id {prompt_id} is already queued or running")
    return web.json_response({"prompt_id": prompt_id, "number": task.number, "node_errors": node_errors})


async def _clear_or_delete(request: web.Request, delete: Callable[[str, list[str] | None], Awaitable[list[str]]],
                           what: str) -> web.Response:
    """ComfyUI's ``{"clear": true}`` / ``{"delete": [ids]}`` body, applied to the user's own items only."""
    user = request[USER].name
    body = await read_json_object(request)
    ids = delete_ids(body)
    if body.get("clear"):
        await delete(user, None)
    if ids and not await delete(user, ids):
        raise _not_yours(what, ids)
    return web.Response(status=200)


@routes.post("/queue")
async def post_queue(request: web.Request) -> web.Response:
    return await _clear_or_delete(request, request.app[CORE].delete_pending, "pending prompt")


@routes.post("/interrupt")
async def post_interrupt(request: web.Request) -> web.Response:
    """ComfyUI's interrupt, limited to the user's own running tasks."""
    body = await read_json_object(request, allow_empty=True)
    prompt_id = body.get("prompt_id")
    if prompt_id is not None and not isinstance(prompt_id, str):
        raise json_error(400, "invalid_request", "prompt_id must be a string")
    matched = await request.app[CORE].interrupt(request[USER].name, prompt_id or None)
    if prompt_id and not matched:
        raise _not_yours("running prompt", [prompt_id])
    return web.Response(status=200)


@routes.post("/free")
async def post_free(request: web.Request) -> web.Response:
    """Instances are shared: a user cannot unload their models; accepted and ignored."""
    await read_json_object(request, allow_empty=True)
    return web.Response(status=200)


@routes.post("/history")
async def post_history(request: web.Request) -> web.Response:
    return await _clear_or_delete(request, request.app[CORE].delete_history, "history item")


async def _cancel(request: web.Request, job_ids: list[str]) -> list[str]:
    core, user = request.app[CORE], request[USER].name
    cancelled = list(await core.delete_pending(user, job_ids))
    for job_id in job_ids:
        if job_id not in cancelled and await core.interrupt(user, job_id):
            cancelled.append(job_id)
    return cancelled


@routes.post("/jobs/{job_id}/cancel")
async def cancel_job(request: web.Request) -> web.Response:
    """Idempotent, as ComfyUI's: ``{"cancelled": false}`` for a job that is not the user's pending or running one."""
    cancelled = await _cancel(request, [request.match_info["job_id"]])
    return web.json_response({"cancelled": bool(cancelled)})


@routes.post("/jobs/cancel")
async def cancel_jobs(request: web.Request) -> web.Response:
    job_ids = cancel_ids(await read_json_object(request))
    return web.json_response({"cancelled": bool(await _cancel(request, job_ids))})


@routes.get("/cluster/queue")
async def cluster_queue(request: web.Request) -> web.Response:
    """The user's running and waiting tasks with their wait positions (0: starts next)."""
    return web.json_response({"queue": await request.app[CORE].user_queue(request[USER].name)})


@routes.get("/ws")
async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    core, user = request.app[CORE], request[USER].name
    if not same_origin(request):  # another site's page must not open the user's socket with their cookie
        raise json_error(403, "forbidden", "cross-origin WebSocket refused")
    sid = request.query.get("clientId", "")[:MAX_CLIENT_ID_CHARS] or uuid.uuid4().hex  # ComfyUI's form
    ws = event_socket()
    await ws.prepare(request)
    core.hub.add(user, sid, ws)
    core.forget_sent(user)
    try:
        await ws.send_json({"type": "status", "data": {"status": await core.status_of(user), "sid": sid}})
        for run in list(core.runs.values()):
            if run.task.user == user and run.task.client_id == sid and run.last_node is not None:
                await ws.send_json({"type": "executing", "data": {"node": run.last_node,
                                                                  "prompt_id": run.task.prompt_id}})
        first = True
        async for msg in ws:
            if msg.type == WSMsgType.TEXT and first:
                first = False
                try:
                    data = parse_json(msg.data)
                except ValueError:
                    continue
                if isinstance(data, dict) and data.get("type") == "feature_flags":
                    features = server_features(instance_context(request).settings)
                    await ws.send_json({"type": "feature_flags", "data": features})
    finally:
        core.hub.remove(user, sid, ws)
    return ws


@routes.get("/cluster/instances")
async def list_instances(request: web.Request) -> web.Response:
    """Admins: the pool's instances with their URLs (users see only states, on the dashboard)."""
    if not request[USER].is_admin:
        raise json_error(403, "forbidden", "only admins see the instances")
    return web.json_response({"instances": request.app[POOL].status()})


@routes.post("/cluster/instances")
async def add_instance(request: web.Request) -> web.Response:
    """Admins: add an instance URL at run time (``{"url": "http://host:port"}``); kept in the store."""
    if not request[USER].is_admin:
        raise json_error(403, "forbidden", "only admins add instances")
    body = await read_json_object(request)
    url = body.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise json_error(400, "invalid_request", "url must be http(s)://host:port")
    await request.app[CORE].add_instance(url)
    return web.json_response({"instances": request.app[POOL].status()})


@routes.get("/cluster/usage")
async def usage(request: web.Request) -> web.Response:
    """Admins: tasks and instance-seconds per user over ``?days=N`` or ``?since=&until=`` (YYYY-MM-DD, UTC)."""
    refuse_foreign_origin(request)
    if not request[USER].is_admin:
        raise json_error(403, "forbidden", "only admins see the usage")
    try:
        period = parse_period(request.query)
    except PeriodError as exc:
        raise json_error(400, "invalid_request", str(exc)) from None
    return web.json_response(await request.app[CORE].usage.report(period))


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Admins (a scraper uses an admin's API token): per-user usage counters. They name users: not public."""
    refuse_foreign_origin(request)
    if not request[USER].is_admin:
        raise json_error(403, "forbidden", "only admins read the metrics")
    return request.app[CORE].usage.metrics.response()


@routes.post("/restart")
async def restart(request: web.Request) -> web.Response:
    """Admins: a rolling restart of the pool (see rolling.py), answered 202 at once; 409 while one runs."""
    if not request[USER].is_admin:
        raise json_error(403, "forbidden", "Only an admin can restart the pool: it reloads every instance's plugins. "
                         "Ask an admin of this cluster.")
    rolling = request.app[CORE].restart
    try:
        urls = rolling.start()
    except RuntimeError as exc:
        raise json_error(409, "restart_running", str(exc)) from None
    count = len(urls)
    return web.json_response({"restarting": True, "instances": count,
                              "message": f"Rolling restart of {count} instance{'s' if count != 1 else ''} started: "
                                         "each is drained, restarted and rejoins; queued work waits, none is lost."},
                             status=202)


@routes.get("/restart")
async def restart_status(request: web.Request) -> web.Response:
    """Admins: where the rolling restart is (the admin page and scripts follow it)."""
    refuse_foreign_origin(request)
    if not request[USER].is_admin:
        raise json_error(403, "forbidden", "only admins see the pool's restarts")
    return web.json_response(request.app[CORE].restart.status())
