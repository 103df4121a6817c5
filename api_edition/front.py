"""``POST /api_prompt?task_id=T`` (also ``/api/predict/{service}/api_prompt``): check, then queue.

The reply is what the queue's put answers — the index as the body and the
``X-Eas-Queueservice-Request-Id`` header — plus ``X-Task-Id`` (generated when
the client sent none). ``Accept: application/json`` gets the three as JSON.
Refusals are final-looking JSON errors: 400 bad graph, a ``task_id`` that
cannot travel in a header (control characters, over 256 characters: checked
before queuing, so a retry never runs a task twice) or a webhook URL the
``WebhookPolicy`` refuses (``webhook_not_allowed``), 413 too big, 429 with
``Retry-After`` when the input queue is full, 503 when the store is down.

A ``task_id`` is the client's label, not a key: two puts with one ``task_id``
are two tasks with two results (as on the EAS queue). To make a retry safe,
send ``Idempotency-Key: K`` (e.g. the task_id itself): a key the queue saw
within ``IDEMPOTENCY_TTL_S`` (24 h) answers that first put's index and
requestId and queues nothing; without a task_id, one is derived from K (so the
retry gets the same one back). With ``--dedupe-task-id`` the task_id is the key
when no ``Idempotency-Key`` is sent, so a client that retries a 503 (whose put
may have landed) with the same task_id gets the first task back, not a second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid

from aiohttp import web

from queue_service import params
from queue_service.params import BadParam
from queue_service.settings import REQUEST_ID_HEADER
from queue_service.store import REQUEST_ID_TAG, QueueFull
from standard.http_util import JSONError, json_error, read_body_within
from standard.serving import draining_headers, is_draining

from .graph import GraphError, parse_graph
from .inbox import Inbox, InboxUnavailable
from .metrics import ApiMetrics
from .settings import TASK_ID_TAG, WEBHOOK_TAG, ApiSettings
from .webhook import WebhookPolicy, WebhookRefused

log = logging.getLogger("comfyserve.api.front")

SETTINGS_KEY = web.AppKey("api_settings", ApiSettings)
INBOX_KEY = web.AppKey("api_inbox", Inbox)
METRICS_KEY = web.AppKey("api_metrics", ApiMetrics)
POLICY_KEY = web.AppKey("api_webhook_policy", WebhookPolicy)
RETRY_AFTER_S = 1
MAX_TAG_CHARS = 1024
# Query parameters that are not tags: the auth fallback must not travel with the task.
NOT_TAGS = frozenset({"token"})


def _refused(request: web.Request, status: int, kind: str, message: str,
             headers: dict[str, str] | None = None) -> JSONError:
    """The JSON error to raise for a refused task, counted by reason."""
    request.app[METRICS_KEY].refused.labels(reason=kind).inc()
    return json_error(status, kind, message, headers=headers)


def _tags(request: web.Request) -> dict[str, str]:
    tags = {k: v for k, v in params.tags_of(request.query).items() if k not in NOT_TAGS}
    for key, value in tags.items():
        if len(key) + len(value) > MAX_TAG_CHARS:
            raise BadParam(f"query parameter {key!r} is too long (tags are at most {MAX_TAG_CHARS} chars)")
    return tags


def _generated_task_id(idempotency_key: str | None) -> str:
    """A fresh task id; derived from the idempotency key, so a retry is answered with the same one."""
    if idempotency_key is None:
        return f"task-{uuid.uuid4().hex}"
    return "task-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]


async def api_prompt(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS_KEY]
    if is_draining(request.app):  # the queue keeps what it has; new tasks go to a sibling or wait
        raise _refused(request, 503, "server_draining", "the service is shutting down, retry later",
                        headers=draining_headers())
    service = request.match_info.get("service")
    if service is not None and service != settings.service:
        raise _refused(request, 404, "not_found", f"this front serves service {settings.service!r}, not {service!r}")
    try:
        tags = _tags(request)
        priority = params.integer(request.query, "_priority_", 0, low=0, high=2**31)
        if TASK_ID_TAG in tags:
            params.header_safe(TASK_ID_TAG, tags[TASK_ID_TAG])
        idempotency_key = params.idempotency_key(request)
    except BadParam as exc:
        raise _refused(request, 400, "bad_request", str(exc)) from None
    if WEBHOOK_TAG in tags:
        try:
            request.app[POLICY_KEY].check(tags[WEBHOOK_TAG])
        except WebhookRefused as exc:
            raise _refused(request, 400, "webhook_not_allowed", str(exc)) from None
    body = await read_body_within(request, settings.max_payload_bytes)
    if body is None:
        raise _refused(request, 413, "payload_too_large",
                        f"the workflow exceeds {settings.max_payload_bytes} bytes")
    try:
        graph = parse_graph(body)
    except GraphError as exc:
        raise _refused(request, 400, exc.kind, exc.message) from None
    data = json.dumps(graph, separators=(",", ":")).encode()
    if len(data) > settings.max_payload_bytes:
        raise _refused(request, 413, "payload_too_large",
                        f"the workflow exceeds {settings.max_payload_bytes} bytes")
    if idempotency_key is None and settings.dedupe_task_id and TASK_ID_TAG in tags:
        idempotency_key = tags[TASK_ID_TAG]  # checked above: it travels in a header
    tags[TASK_ID_TAG] = tags.get(TASK_ID_TAG) or _generated_task_id(idempotency_key)
    tags.pop(REQUEST_ID_TAG, None)  # the queue names each task; a client cannot reuse another's id
    try:
        index, request_id = await request.app[INBOX_KEY].put(data, tags, priority, idempotency_key)
    except QueueFull as exc:
        raise _refused(request, 429, "queue_full", f"the input queue is full, retry later ({exc})",
                        headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except InboxUnavailable as exc:
        raise _refused(request, 503, "queue_unavailable", str(exc),
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    request.app[METRICS_KEY].accepted.inc()
    headers = {REQUEST_ID_HEADER: request_id, "X-Task-Id": tags[TASK_ID_TAG]}
    if "application/json" in request.headers.get("Accept", ""):
        return web.json_response({"index": index, "request_id": request_id, "task_id": tags[TASK_ID_TAG]},
                                 headers=headers)
    return web.Response(text=str(index), headers=headers)


async def metrics(request: web.Request) -> web.StreamResponse:
    metrics = request.app[METRICS_KEY]
    metrics.set_depths(await request.app[INBOX_KEY].depths())
    return metrics.response()


def add_front_routes(app: web.Application, settings: ApiSettings) -> None:
    """Register the front's routes; the service's own path is a plain route so it wins over the queue's."""
    app[POLICY_KEY] = WebhookPolicy(settings.webhook_allow)
    app.router.add_post("/api_prompt", api_prompt)
    app.router.add_post(f"/api/predict/{settings.service}/api_prompt", api_prompt)
    app.router.add_get("/metrics", metrics)
