"""/prompt, /queue, /interrupt, /free and /history with ComfyUI's request and response shapes."""

from __future__ import annotations

import logging
import uuid

from aiohttp import web

from ..http_util import json_error, query_int, read_json_object
from ..serving import is_draining
from .context import instance_context, prompt_server
from .prompt_queue import QueueItem
from .prompt_request import delete_ids, invalid_prompt, parse_prompt_request, refused_while_draining

log = logging.getLogger("comfyserve.server")
routes = web.RouteTableDef()


@routes.post("/prompt")
async def post_prompt(request: web.Request) -> web.Response:
    server = prompt_server(request)
    json_data = await read_json_object(request, kind="invalid_prompt")
    try:
        body = parse_prompt_request(json_data)
    except web.HTTPBadRequest:
        if not isinstance(json_data.get("prompt"), dict):  # no graph at all: counted as refused
            server.metrics.rejected.inc()
        raise
    prompt_id = body.prompt_id or str(uuid.uuid4())
    if server.queue.contains(prompt_id):
        raise invalid_prompt(f"prompt_id {prompt_id} is already queued or running")
    if is_draining(request.app):
        raise refused_while_draining()
    if not server.ready:
        raise json_error(503, "runtime_not_ready", "The embedded engine is not ready",
                         server.engine_error or "loading", extra={"node_errors": {}})
    valid, error, outputs_to_execute, node_errors = await server.validate(prompt_id, body.prompt, body.targets)
    if not valid:
        server.metrics.rejected.inc()
        log.warning("invalid prompt: %s", error)
        return web.json_response({"error": error, "node_errors": node_errors}, status=400)
    number = body.number if body.number is not None else server.next_number(body.front)
    extra_data, sensitive = body.queued_extra_data()
    server.queue.put(QueueItem(number, prompt_id, body.prompt, extra_data, outputs_to_execute, sensitive))
    return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})


@routes.get("/prompt")
async def get_prompt(request: web.Request) -> web.Response:
    return web.json_response(instance_context(request).server.queue_info())


@routes.get("/queue")
async def get_queue(request: web.Request) -> web.Response:
    running, pending = instance_context(request).server.queue.current_queue()
    return web.json_response({"queue_running": running, "queue_pending": pending})


@routes.post("/queue")
async def post_queue(request: web.Request) -> web.Response:
    server = prompt_server(request)
    json_data = await read_json_object(request)
    to_delete = delete_ids(json_data)
    if json_data.get("clear"):
        server.queue.wipe_queue()
    for prompt_id in to_delete:
        server.queue.delete_queue_item(prompt_id)
    await server.queue.flush()  # a 200 means it is off the disk too: a kill -9 now does not bring it back
    return web.Response(status=200)


@routes.post("/interrupt")
async def post_interrupt(request: web.Request) -> web.Response:
    """Global interrupt, or only the given ``prompt_id`` if it is the running one."""
    json_data = await read_json_object(request, allow_empty=True)
    prompt_id = json_data.get("prompt_id")
    if prompt_id is not None and not isinstance(prompt_id, str):
        raise json_error(400, "invalid_request", "prompt_id must be a string")
    prompt_server(request).interrupt(prompt_id or None)
    return web.Response(status=200)


@routes.post("/free")
async def post_free(request: web.Request) -> web.Response:
    json_data = await read_json_object(request, allow_empty=True)
    prompt_server(request).request_free(
        unload_models=bool(json_data.get("unload_models", False)),
        free_memory=bool(json_data.get("free_memory", False)),
    )
    return web.Response(status=200)


@routes.get("/history")
async def get_history(request: web.Request) -> web.Response:
    max_items = query_int(request, "max_items")
    offset = query_int(request, "offset")
    if max_items is not None and max_items < 0:
        raise json_error(400, "invalid_parameter", "max_items must not be negative")
    queue = instance_context(request).server.queue
    return web.json_response(text=queue.history_json(
        queue.get_history(max_items=max_items, offset=-1 if offset is None else offset)))


@routes.get("/history/{prompt_id}")
async def get_history_item(request: web.Request) -> web.Response:
    queue = instance_context(request).server.queue
    return web.json_response(text=queue.history_json(queue.get_history(request.match_info["prompt_id"])))


@routes.post("/history")
async def post_history(request: web.Request) -> web.Response:
    server = prompt_server(request)
    json_data = await read_json_object(request)
    to_delete = delete_ids(json_data)
    if json_data.get("clear"):
        server.queue.wipe_history()
    for prompt_id in to_delete:
        server.queue.delete_history_item(prompt_id)
    await server.queue.flush()
    return web.Response(status=200)
