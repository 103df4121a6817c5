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

import asyncio
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from queue_service import params
from queue_service.params import BadParam
from queue_service.settings import REQUEST_ID_HEADER
from queue_service.store import REQUEST_ID_TAG, QueueFull
from standard.http_util import JSONError, json_error
from standard.model_files import model_key, models_of
from standard.serving import draining_headers, is_draining
from standard.storage.errors import StorageError
from standard.tasks import cancel_and_wait

from .cancel import api_task_cancel
from .events import api_events
from .graph import GraphError, graph_of
from .inbox import Inbox, InboxUnavailable
from .input_bucket import InputBucket, input_bucket
from .input_request import Submission, read_submission
from .inputs import InputRefused, envelope, rewrite, sweep_forever
from .metrics import ApiMetrics
from .outputs import OUTPUT_PATH, output_handler
from .settings import MODELS_TAG, TASK_ID_TAG, WEBHOOK_TAG, ApiSettings
from .status import INDEX_KEY, STATUS_KEY, api_task
from .webhook import WebhookPolicy, WebhookRefused
from .workflows import WorkflowRefused, Workflows

log = logging.getLogger("comfyserve.api.front")

SETTINGS_KEY = web.AppKey("api_settings", ApiSettings)
INBOX_KEY = web.AppKey("api_inbox", Inbox)
METRICS_KEY = web.AppKey("api_metrics", ApiMetrics)
POLICY_KEY = web.AppKey("api_webhook_policy", WebhookPolicy)
INPUT_POLICY_KEY = web.AppKey("api_input_policy", WebhookPolicy)
WORKFLOWS_KEY = web.AppKey("api_workflows", Workflows)
INPUT_BUCKET_KEY = web.AppKey("api_input_bucket", InputBucket)  # only for an oss:// data dir
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
    try:
        submission = await read_submission(request, max_json_bytes=settings.max_payload_bytes,
                                           limits=settings.input_limits, data_dir=settings.data_dir,
                                           policy=request.app[INPUT_POLICY_KEY])
    except InputRefused as exc:
        raise _refused(request, exc.status, exc.kind, exc.message) from None
    try:
        index, request_id = await _queue(request, settings, submission, tags, priority, idempotency_key)
    except BaseException:
        await submission.discard()  # not queued: its files go with it
        raise
    request.app[METRICS_KEY].accepted.inc()
    headers = {REQUEST_ID_HEADER: request_id, "X-Task-Id": tags[TASK_ID_TAG]}
    if "application/json" in request.headers.get("Accept", ""):
        return web.json_response({"index": index, "request_id": request_id, "task_id": tags[TASK_ID_TAG]},
                                 headers=headers)
    return web.Response(text=str(index), headers=headers)


async def _graph(request: web.Request, submission: Submission) -> dict[str, Any]:
    """The task's graph: the one sent, or with ``?workflow=NAME`` that saved workflow with the ``params`` set."""
    document = submission.document
    name = request.query.get("workflow")
    if name is not None:
        if document is not None and (not isinstance(document, dict) or set(document) - {"params", "inputs"}):
            raise _refused(request, 400, "bad_request", "with ?workflow= the body is {\"params\": {...}, "
                                                        "\"inputs\": [...]} (both optional)")
        try:
            workflow = await request.app[WORKFLOWS_KEY].get(name)
            return workflow.build(document.get("params") if document else None)
        except WorkflowRefused as exc:
            raise _refused(request, exc.status, exc.kind, exc.message) from None
    if document is None:
        raise _refused(request, 400, "empty_body", "the body is empty: send the workflow graph (API format) as JSON")
    try:
        return graph_of(document)
    except GraphError as exc:
        raise _refused(request, 400, exc.kind, exc.message) from None


async def _task_data(request: web.Request, settings: ApiSettings, submission: Submission,
                     tags: dict[str, str]) -> bytes:
    """The queued item: the bare graph, or the inputs envelope when the task brought files. ``tags`` get
    the graph's models (``MODELS_TAG``: the workers' watches prefer tasks whose models their instance holds)."""
    graph = await _graph(request, submission)
    key = model_key(models_of(graph))
    if key:
        tags[MODELS_TAG] = key
    else:
        tags.pop(MODELS_TAG, None)  # the tag is ours: a client's would mislead the workers
    value: dict[str, Any] = graph
    if submission.folder is not None:
        rewrite(graph, submission.names, submission.folder)
        value = envelope(graph, submission.folder, submission.fetch)
    data = json.dumps(value, separators=(",", ":")).encode()
    if len(data) > settings.max_payload_bytes:
        raise _refused(request, 413, "payload_too_large", f"the workflow exceeds {settings.max_payload_bytes} bytes")
    return data


async def _queue(request: web.Request, settings: ApiSettings, submission: Submission, tags: dict[str, str],
                 priority: int, idempotency_key: str | None) -> tuple[int, str]:
    data = await _task_data(request, settings, submission, tags)
    try:
        # Spawned instances read this machine's mirror: they find the files there without a download.
        spawned = settings.instances > 0 and not settings.instance_urls and not settings.stateless
        await submission.publish(request.app.get(INPUT_BUCKET_KEY), keep_local=spawned)
    except StorageError as exc:
        message = f"the task's inputs could not be put in the bucket: {exc}"
        raise _refused(request, 503, "storage_unavailable", message,
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    if idempotency_key is None and settings.dedupe_task_id and TASK_ID_TAG in tags:
        idempotency_key = tags[TASK_ID_TAG]  # checked in api_prompt: it travels in a header
    tags[TASK_ID_TAG] = tags.get(TASK_ID_TAG) or _generated_task_id(idempotency_key)
    tags.pop(REQUEST_ID_TAG, None)  # the queue names each task; a client cannot reuse another's id
    ours = None
    if submission.folder is not None and idempotency_key is not None:
        tags[REQUEST_ID_TAG] = ours = str(uuid.uuid4())  # another id back: a retry, whose files are not needed
    try:
        index, request_id = await request.app[INBOX_KEY].put(data, tags, priority, idempotency_key)
    except QueueFull as exc:
        raise _refused(request, 429, "queue_full", f"the input queue is full, retry later ({exc})",
                        headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except InboxUnavailable as exc:
        raise _refused(request, 503, "queue_unavailable", str(exc),
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    if ours is not None and request_id != ours:
        await submission.discard()  # the first put's task has its own folder
        return index, request_id
    index_writer = request.app.get(STATUS_KEY) or request.app.get(INDEX_KEY)
    if index_writer is not None:
        await index_writer.remember(tags[TASK_ID_TAG], request_id)
    return index, request_id


async def workflows(request: web.Request) -> web.StreamResponse:
    """``GET /workflows``: each saved workflow with its parameters (type, default, bounds), or its error."""
    return web.json_response({"workflows": await request.app[WORKFLOWS_KEY].describe_all()})


async def metrics(request: web.Request) -> web.StreamResponse:
    metrics = request.app[METRICS_KEY]
    metrics.set_depths(await request.app[INBOX_KEY].depths())
    return metrics.response()


def _input_janitor(data_dir: Path, retention_s: float) -> Callable[[web.Application], AsyncIterator[None]]:
    async def janitor(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(sweep_forever(data_dir, retention_s, app.get(INPUT_BUCKET_KEY)),
                                   name="comfyserve-input-janitor")
        yield
        await cancel_and_wait(task)

    return janitor


def add_front_routes(app: web.Application, settings: ApiSettings) -> None:
    """Register the front's routes; the service's own path is a plain route so it wins over the queue's."""
    app[POLICY_KEY] = WebhookPolicy(settings.webhook_allow)
    app[INPUT_POLICY_KEY] = WebhookPolicy(settings.input_url_allow, what="input URL", flag="--input-url-allow")
    bucket = input_bucket(settings.storage)
    if bucket is not None:
        app[INPUT_BUCKET_KEY] = bucket
    if settings.data_dir is not None and settings.input_retention_s > 0:
        app.cleanup_ctx.append(_input_janitor(settings.data_dir, settings.input_retention_s))
    app.router.add_post("/api_prompt", api_prompt)
    app.router.add_post(f"/api/predict/{settings.service}/api_prompt", api_prompt)
    app.router.add_get("/metrics", metrics)
    app[WORKFLOWS_KEY] = Workflows(settings.data_dir)
    app.router.add_get("/workflows", workflows)
    app.router.add_get("/api_task", api_task)
    app.router.add_get("/api_events", api_events)
    # Under the service root too, as plain routes: they win over the queue's /api/predict/{name}, which
    # took GET /api/predict/svc/api_task for a read of a queue "svc/api_task" (200, empty body).
    app.router.add_get(f"/api/predict/{settings.service}/api_task", api_task)
    app.router.add_get(f"/api/predict/{settings.service}/api_events", api_events)
    app.router.add_post("/api_task/cancel", api_task_cancel)
    app.router.add_post("/api/predict/{service}/api_task/cancel", api_task_cancel)
    app.router.add_get(OUTPUT_PATH, output_handler(settings.data_dir))
