"""/jobs: ComfyUI's job list, job detail and cancel, over the same queue and history.

Cancel is idempotent as in current ComfyUI: 200 ``{"cancelled": bool}`` whether
or not the job was still pending or running (the frontend reports any other
answer as an error, e.g. for a job that finished a moment before); a batch
refuses ids that are not canonical UUIDs up front (400, ``invalid_ids``).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..http_util import json_error, read_json_object
from . import jobs
from .context import ServerView, instance_context, prompt_server
from .prompt_request import is_canonical_uuid
from .prompt_server import PromptServer

routes = web.RouteTableDef()
MAX_CANCEL_IDS = 100


def _all_jobs(server: ServerView, statuses: set[str]) -> list[dict[str, Any]]:
    running, pending = server.queue.current_queue()
    found: list[dict[str, Any]] = []
    if jobs.IN_PROGRESS in statuses:
        found += [jobs.queue_job(item, jobs.IN_PROGRESS) for item in running]
    if jobs.PENDING in statuses:
        found += [jobs.queue_job(item, jobs.PENDING) for item in pending]
    if statuses & {jobs.COMPLETED, jobs.FAILED, jobs.CANCELLED}:
        for prompt_id, entry in server.queue.history_entries().items():
            job = jobs.history_job(prompt_id, entry, times=server.queue.times_ms(prompt_id))
            if job["status"] in statuses:
                found.append(job)
    return found


def _int_param(request: web.Request, name: str, default: int | None) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise json_error(400, "invalid_parameter", f"{name} must be an integer", repr(raw)) from None


@routes.get("/jobs")
async def list_jobs(request: web.Request) -> web.Response:
    query = request.query
    statuses = set(jobs.ALL_STATUSES)
    if query.get("status"):
        asked = {part.strip().lower() for part in query["status"].split(",") if part.strip()}
        invalid = sorted(asked - statuses)
        if invalid:
            raise json_error(400, "invalid_parameter", f"invalid status value(s): {', '.join(invalid)}",
                                  f"valid: {', '.join(jobs.ALL_STATUSES)}")
        statuses = asked
    sort_by = query.get("sort_by", "created_at").lower()
    sort_order = query.get("sort_order", "desc").lower()
    if sort_by not in jobs.SORT_FIELDS:
        raise json_error(400, "invalid_parameter", "sort_by must be created_at or execution_duration")
    if sort_order not in ("asc", "desc"):
        raise json_error(400, "invalid_parameter", "sort_order must be asc or desc")
    limit = _int_param(request, "limit", None)
    if limit is not None and limit <= 0:
        raise json_error(400, "invalid_parameter", "limit must be a positive integer")
    offset = max(_int_param(request, "offset", 0) or 0, 0)
    found = _all_jobs(instance_context(request).server, statuses)
    workflow_id = query.get("workflow_id")
    if workflow_id:
        found = [job for job in found if job.get("workflow_id") == workflow_id]
    found = jobs.sort_jobs(found, sort_by, sort_order == "desc")
    total = len(found)
    page = found[offset:] if limit is None else found[offset:offset + limit]
    return web.json_response({
        "jobs": page,
        "pagination": {"offset": offset, "limit": limit, "total": total, "has_more": offset + len(page) < total},
    })


@routes.get("/jobs/{job_id}")
async def get_job(request: web.Request) -> web.Response:
    server = instance_context(request).server
    job_id = request.match_info["job_id"]
    entry = server.queue.history_entries().get(job_id)
    if entry is not None:
        return web.json_response(
            jobs.history_job(job_id, entry, times=server.queue.times_ms(job_id), include_outputs=True)
        )
    running, pending = server.queue.current_queue()
    for items, status in ((running, jobs.IN_PROGRESS), (pending, jobs.PENDING)):
        for item in items:
            if item[1] == job_id:
                return web.json_response(jobs.queue_job(item, status, include_workflow=True))
    raise json_error(404, "not_found", "Job not found", job_id)


def _cancel(server: PromptServer, job_ids: list[str]) -> list[str]:
    """Pending jobs leave the queue; the running one is interrupted."""
    cancelled = []
    for job_id in job_ids:
        if server.queue.delete_queue_item(job_id) or server.interrupt(job_id):
            cancelled.append(job_id)
    return cancelled


@routes.post("/jobs/{job_id}/cancel")
async def cancel_job(request: web.Request) -> web.Response:
    cancelled = _cancel(prompt_server(request), [request.match_info["job_id"]])
    return web.json_response({"cancelled": bool(cancelled)})


def cancel_ids(body: dict[str, Any]) -> list[str]:
    """The ``job_ids`` of ``POST /jobs/cancel`` (the cluster's too): a list of canonical UUIDs, at most 100."""
    job_ids = body.get("job_ids")
    if not isinstance(job_ids, list) or len(job_ids) > MAX_CANCEL_IDS:
        raise json_error(400, "invalid_request", f"job_ids must be a list of at most {MAX_CANCEL_IDS} job ids")
    invalid = [i if isinstance(i, str) else repr(i) for i in job_ids if not is_canonical_uuid(i)]
    if invalid:
        raise json_error(400, "invalid_request", "job_ids contains invalid id(s)", ", ".join(invalid)[:200],
                         extra={"invalid_ids": invalid[:MAX_CANCEL_IDS]})
    return job_ids


@routes.post("/jobs/cancel")
async def cancel_jobs(request: web.Request) -> web.Response:
    job_ids = cancel_ids(await read_json_object(request))
    return web.json_response({"cancelled": bool(_cancel(prompt_server(request), job_ids))})
