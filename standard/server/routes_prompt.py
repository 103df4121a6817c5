"""/prompt, /queue, /interrupt, /free and /history with ComfyUI's request and response shapes."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from aiohttp import web

from . import keys
from .http_util import error_body, json_http_error, query_int, read_json_object
from .prompt_queue import SENSITIVE_EXTRA_DATA_KEYS, QueueItem
from .prompt_server import PromptServer

log = logging.getLogger("comfyserve.server")
routes = web.RouteTableDef()
MAX_PROMPT_ID_CHARS = 256


def _server(request: web.Request) -> PromptServer:
    return request.app[keys.PROMPT_SERVER]


def _invalid(message: str, details: str = "") -> web.HTTPException:
    return json_http_error(400, "invalid_prompt", message, details, {"node_errors": {}})


def _prompt_id(json_data: dict[str, Any]) -> str:
    raw = json_data.get("prompt_id")
    if raw is None:
        return str(uuid.uuid4())
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise _invalid("prompt_id must be a string", f"got {type(raw).__name__}")
    prompt_id = str(raw)
    if not prompt_id or len(prompt_id) > MAX_PROMPT_ID_CHARS or "/" in prompt_id:
        raise _invalid("prompt_id must be 1-256 characters without '/'", repr(prompt_id)[:80])
    return prompt_id


def _explicit_number(json_data: dict[str, Any]) -> float | None:
    """The request's own ``number`` (checked before validation), or None."""
    if "number" not in json_data:
        return None
    raw = json_data["number"]
    if isinstance(raw, bool):
        raise _invalid("number must be a number", repr(raw))
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise _invalid("number must be a number", repr(raw)[:80]) from None


@routes.post("/prompt")
async def post_prompt(request: web.Request) -> web.Response:
    server = _server(request)
    json_data = await read_json_object(request, kind="invalid_prompt")
    if "prompt" not in json_data:
        server.metrics.rejected_total += 1
        return web.json_response(
            {"error": error_body("no_prompt", "No prompt provided", "No prompt provided"), "node_errors": {}},
            status=400,
        )
    prompt = json_data["prompt"]
    if not isinstance(prompt, dict):
        server.metrics.rejected_total += 1
        raise _invalid("Invalid prompt: the prompt must be a JSON object of nodes",
                       f"got {type(prompt).__name__}")
    extra_data = json_data.get("extra_data", {})
    if not isinstance(extra_data, dict):
        raise _invalid("extra_data must be a JSON object", f"got {type(extra_data).__name__}")
    client_id = json_data.get("client_id")
    if client_id is not None and not isinstance(client_id, str):
        raise _invalid("client_id must be a string", f"got {type(client_id).__name__}")
    targets = json_data.get("partial_execution_targets")
    if targets is not None and (not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)):
        raise _invalid("partial_execution_targets must be a list of node ids")
    prompt_id = _prompt_id(json_data)
    explicit_number = _explicit_number(json_data)
    if server.queue.contains(prompt_id):
        raise _invalid(f"prompt_id {prompt_id} is already queued or running")
    if not server.ready:
        return web.json_response(
            {"error": error_body("runtime_not_ready", "The embedded engine is not ready",
                                 server.engine_error or "loading"), "node_errors": {}},
            status=503,
        )
    valid, error, outputs_to_execute, node_errors = await server.validate(prompt_id, prompt, targets)
    if not valid:
        server.metrics.rejected_total += 1
        log.warning("invalid prompt: %s", error)
        return web.json_response({"error": error, "node_errors": node_errors}, status=400)
    number = explicit_number if explicit_number is not None else server.next_number(bool(json_data.get("front")))
    extra_data = dict(extra_data)
    if client_id is not None:
        extra_data["client_id"] = client_id
    sensitive = {key: extra_data.pop(key) for key in SENSITIVE_EXTRA_DATA_KEYS if key in extra_data}
    extra_data["create_time"] = int(time.time() * 1000)
    server.queue.put(QueueItem(number, prompt_id, prompt, extra_data, outputs_to_execute, sensitive))
    return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})


@routes.get("/prompt")
async def get_prompt(request: web.Request) -> web.Response:
    return web.json_response(_server(request).queue_info())


@routes.get("/queue")
async def get_queue(request: web.Request) -> web.Response:
    running, pending = _server(request).queue.current_queue()
    return web.json_response({"queue_running": running, "queue_pending": pending})


def _id_list(json_data: dict[str, Any]) -> list[str]:
    ids = json_data.get("delete", [])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise json_http_error(400, "invalid_request", "delete must be a list of prompt ids")
    return ids


@routes.post("/queue")
async def post_queue(request: web.Request) -> web.Response:
    server = _server(request)
    json_data = await read_json_object(request)
    to_delete = _id_list(json_data)
    if json_data.get("clear"):
        server.queue.wipe_queue()
    for prompt_id in to_delete:
        server.queue.delete_queue_item(prompt_id)
    return web.Response(status=200)


@routes.post("/interrupt")
async def post_interrupt(request: web.Request) -> web.Response:
    """Global interrupt, or only the given ``prompt_id`` if it is the running one."""
    json_data = await read_json_object(request, allow_empty=True)
    prompt_id = json_data.get("prompt_id")
    if prompt_id is not None and not isinstance(prompt_id, str):
        raise json_http_error(400, "invalid_request", "prompt_id must be a string")
    _server(request).interrupt(prompt_id or None)
    return web.Response(status=200)


@routes.post("/free")
async def post_free(request: web.Request) -> web.Response:
    json_data = await read_json_object(request, allow_empty=True)
    _server(request).request_free(
        unload_models=bool(json_data.get("unload_models", False)),
        free_memory=bool(json_data.get("free_memory", False)),
    )
    return web.Response(status=200)


@routes.get("/history")
async def get_history(request: web.Request) -> web.Response:
    max_items = query_int(request, "max_items")
    offset = query_int(request, "offset")
    if max_items is not None and max_items < 0:
        raise json_http_error(400, "invalid_parameter", "max_items must not be negative")
    history = _server(request).queue.get_history(max_items=max_items, offset=-1 if offset is None else offset)
    return web.json_response(history)


@routes.get("/history/{prompt_id}")
async def get_history_item(request: web.Request) -> web.Response:
    return web.json_response(_server(request).queue.get_history(request.match_info["prompt_id"]))


@routes.post("/history")
async def post_history(request: web.Request) -> web.Response:
    server = _server(request)
    json_data = await read_json_object(request)
    to_delete = _id_list(json_data)
    if json_data.get("clear"):
        server.queue.wipe_history()
    for prompt_id in to_delete:
        server.queue.delete_history_item(prompt_id)
    return web.Response(status=200)
