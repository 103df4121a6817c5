"""The routes of the front that go through its journal (``standard.backend.journal``).

``POST /prompt`` is recorded once ComfyUI accepted it (on the fast path from
the bytes relayed, see ``tap``; on the slow path here); ``POST /queue``,
``POST /history`` and the ``/jobs`` cancels are applied to the journal once
ComfyUI applied them; ``/history``, ``/history/<id>``, ``/jobs`` and
``/jobs/<id>`` are ComfyUI's answers merged with the stored history, so they
hold what ComfyUI forgot in a restart. The fast path leaves these requests to
the app (``is_local``); it relays everything else, e.g. a client polling
``/history/<id>`` of a prompt that is still running.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from ..http_util import BadJSON, JSONError, parse_json
from ..server import jobs
from ..server.prompt_queue import SENSITIVE_EXTRA_DATA_KEYS
from ..server.prompt_request import refused_while_draining
from ..serving import is_draining
from .inputs import PROMPT_INPUTS, forward_prompt
from .journal import FORWARDED_HEADERS, JOURNAL, PromptJournal
from .outputs import OUTPUTS, history_with_urls
from .proxy import backend_unavailable, relayed_headers, upstream_headers, upstream_url

log = logging.getLogger("comfyserve.backend")

WAIT_S = 30.0  # a request arriving while a supervised ComfyUI (re)starts waits this long for it
WRITES = frozenset({"/queue", "/history", "/jobs/cancel"})  # POST /prompt: the fast path's tap records it
PROMPT_PATHS = frozenset({"/prompt", "/api/prompt"})
MERGED = frozenset({"/history", "/jobs"})


def is_local(app: web.Application, method: str, path: str) -> bool:
    """Whether the fast path must leave this request to these routes: the writes they record, the
    merged listings, and the history entries of prompts stored here (answered without asking ComfyUI).
    Everything else (``GET /queue``, ``/history/<id>`` of a prompt still queued...) stays on the fast path."""
    journal = app.get(JOURNAL)
    if journal is None:
        return False
    if path.startswith("/api/"):
        path = path[4:]
    if method == "POST":
        return path in WRITES or (path.startswith("/jobs/") and path.endswith("/cancel"))
    if method != "GET":
        return False
    if path in MERGED:
        return True
    for prefix in ("/history/", "/jobs/"):
        if path.startswith(prefix):
            return path[len(prefix):] in journal.history
    return False


def tap(app: web.Application, method: str, path: str) -> Callable[[bytes, bytes], None] | None:
    """For the fast path: ``POST /prompt`` relayed there is recorded from the bytes that went through."""
    journal = app.get(JOURNAL)
    if journal is None or method != "POST" or path not in PROMPT_PATHS:
        return None
    return lambda request, response: _record_relayed(journal, request, response)


def _record_relayed(journal: PromptJournal, request: bytes, response: bytes) -> None:
    response_head, _, response_body = response.partition(b"\r\n\r\n")
    status_line, *response_lines = response_head.split(b"\r\n")
    if status_line.split(b" ", 2)[1:2] != [b"200"]:
        return
    if any(line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower() for line in response_lines):
        response_body = _unchunked(response_body)
    accepted = _body(response_body)
    if not isinstance(accepted.get("prompt_id"), str):
        log.warning("ComfyUI accepted a prompt with an answer not understood here: it is not recorded")
        return
    request_head, _, request_body = request.partition(b"\r\n\r\n")
    headers = {}
    for line in request_head.split(b"\r\n")[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        for wanted in FORWARDED_HEADERS:
            if name.strip().lower() == wanted.lower():
                headers[wanted] = value.strip()
    number = accepted.get("number")
    journal.record(accepted["prompt_id"], number if isinstance(number, (int, float)) else 0, _body(request_body),
                   headers)


def _unchunked(body: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        newline = body.find(b"\r\n", pos)
        if newline < 0:
            return bytes(out)
        try:
            size = int(body[pos:newline].split(b";", 1)[0], 16)
        except ValueError:
            return bytes(out)
        if size == 0:
            return bytes(out)
        out += body[newline + 2:newline + 2 + size]
        pos = newline + 2 + size + 2


def add_journal_routes(app: web.Application) -> None:
    for prefix in ("", "/api"):
        app.router.add_post(prefix + "/prompt", post_prompt)
        app.router.add_post(prefix + "/queue", post_queue)
        app.router.add_get(prefix + "/history", get_history)
        app.router.add_post(prefix + "/history", post_history)
        app.router.add_get(prefix + "/history/{prompt_id}", get_history_item)
        app.router.add_get(prefix + "/jobs", get_jobs)
        app.router.add_get(prefix + "/jobs/{job_id}", get_job)
        app.router.add_post(prefix + "/jobs/cancel", post_cancel)
        app.router.add_post(prefix + "/jobs/{job_id}/cancel", post_cancel)


class Answer:
    """ComfyUI's response, read whole."""

    def __init__(self, status: int, headers: CIMultiDict[str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=self.body, headers=self.headers)


async def _ask(request: web.Request, body: bytes | None = None, *, path: str | None = None) -> Answer:
    """The request (or ``GET path``) sent to ComfyUI, our credentials removed; 502/503 when it is not there."""
    journal = request.app[JOURNAL]
    assert journal.session is not None
    base_url = journal.backend.base_url
    if base_url is None:
        await journal.backend.wait_ready(WAIT_S)
        base_url = journal.backend.base_url
        if base_url is None:
            raise backend_unavailable("ComfyUI is starting", 503)
    url = upstream_url(base_url, request, strip_token=journal.strip_auth) if path is None else base_url + path
    headers = upstream_headers(request, strip_auth=journal.strip_auth)
    headers.popall("Content-Length", None)
    try:
        async with journal.session.request(request.method if path is None else "GET", url, headers=headers,
                                           data=body, allow_redirects=False) as upstream:
            data = await upstream.read()
            return Answer(upstream.status, relayed_headers(request, upstream, keep_length=False), data)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise backend_unavailable(repr(exc)) from None


async def _ask_to_read(request: web.Request, *, path: str | None = None) -> Answer | None:
    """``_ask`` for a read the stored history can answer alone: None while ComfyUI is not there (a
    supervised one restarting), so the history is served while it restarts."""
    try:
        return await _ask(request, path=path)
    except JSONError:
        return None


def _body(raw: bytes) -> dict[str, Any]:
    try:
        value = parse_json(raw) if raw.strip() else {}
    except BadJSON:
        return {}
    return value if isinstance(value, dict) else {}


def _ids(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key)
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


async def post_prompt(request: web.Request) -> web.StreamResponse:
    if is_draining(request.app):
        raise refused_while_draining()
    if PROMPT_INPUTS in request.app:  # an oss:// data dir: the prompt's inputs are fetched first
        return await forward_prompt(request, lambda raw: _journaled_prompt(request, raw))
    return await _journaled_prompt(request, await request.read())


async def _journaled_prompt(request: web.Request, raw: bytes) -> web.StreamResponse:
    answer = await _ask(request, raw)
    accepted = answer.json() if answer.status == 200 else None
    if isinstance(accepted, dict) and isinstance(accepted.get("prompt_id"), str):
        number = accepted.get("number")
        headers = {name: request.headers[name] for name in FORWARDED_HEADERS if name in request.headers}
        request.app[JOURNAL].record(accepted["prompt_id"], number if isinstance(number, (int, float)) else 0,
                                          _body(raw), headers)
    return answer.response()


async def _clear_or_delete(body: dict[str, Any], forget: Callable[[list[str] | None], Awaitable[None]]) -> None:
    """What ComfyUI just did to its queue or history on ``{"clear": true}`` / ``{"delete": [...]}``, done to ours."""
    if body.get("clear"):
        await forget(None)
    ids = _ids(body, "delete")
    if ids:
        await forget(ids)


async def post_queue(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    answer = await _ask(request, raw)
    if answer.status == 200:
        await _clear_or_delete(_body(raw), request.app[JOURNAL].forget_pending)
    return answer.response()


async def post_cancel(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    answer = await _ask(request, raw)
    if answer.status == 200:
        job_id = request.match_info.get("job_id")
        await request.app[JOURNAL].forget_pending([job_id] if job_id else _ids(_body(raw), "job_ids"))
    return answer.response()


async def post_history(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    answer = await _ask(request, raw)
    if answer.status == 200:
        await _clear_or_delete(_body(raw), request.app[JOURNAL].forget_history)
    return answer.response()


async def get_history_item(request: web.Request) -> web.StreamResponse:
    prompt_id = request.match_info["prompt_id"]
    stored = request.app[JOURNAL].history.get(prompt_id)
    if stored is not None:  # a copy of what ComfyUI answered, and what it forgets in a restart
        return web.json_response({prompt_id: stored})
    answer = await _ask(request)
    if OUTPUTS in request.app and answer.status == 200:  # an oss:// data dir: finished means uploaded
        return await history_with_urls(request.app[OUTPUTS], prompt_id, answer.json())
    return answer.response()


def _merged_history(journal: PromptJournal, theirs: Any) -> dict[str, Any]:
    """The stored entries (in the order they finished), then ComfyUI's that are not among them."""
    merged = dict(journal.history)
    for prompt_id, entry in (theirs.items() if isinstance(theirs, dict) else ()):
        merged.setdefault(prompt_id, entry)
    return merged


async def get_history(request: web.Request) -> web.StreamResponse:
    answer = await _ask_to_read(request, path="/history")
    if answer is not None and answer.status != 200:
        return answer.response()
    merged = _merged_history(request.app[JOURNAL], answer.json() if answer is not None else {})
    max_items = _int(request.query.get("max_items"))
    offset = _int(request.query.get("offset"))
    offset = -1 if offset is None else offset
    if offset < 0 and max_items is not None:  # ComfyUI's paging: without an offset, the newest max_items
        offset = len(merged) - max_items
    keys = list(merged)[max(offset, 0):]
    if max_items is not None:
        keys = keys[:max(max_items, 0)]
    return web.json_response({key: merged[key] for key in keys})


def _int(raw: str | None) -> int | None:
    try:
        return int(raw) if raw not in (None, "") else None
    except ValueError:
        return None


async def get_job(request: web.Request) -> web.StreamResponse:
    job_id = request.match_info["job_id"]
    stored = request.app[JOURNAL].history.get(job_id)
    if stored is not None:
        return web.json_response(jobs.history_job(job_id, _public(stored), include_outputs=True))
    return (await _ask(request)).response()


async def get_jobs(request: web.Request) -> web.StreamResponse:
    """ComfyUI's jobs (filtered and sorted by it, fetched unpaged) plus stored ones it forgot, then paged."""
    query = {k: v for k, v in request.query.items() if k not in ("limit", "offset")}
    path = "/jobs" + ("?" + urlencode(query) if query else "")
    answer = await _ask_to_read(request, path=path)
    listing = {"jobs": []} if answer is None else answer.json() if answer.status == 200 else None
    if answer is not None and (not isinstance(listing, dict) or not isinstance(listing.get("jobs"), list)):
        return answer.response()
    assert isinstance(listing, dict)
    found = list(listing["jobs"])
    known = {job.get("id") for job in found if isinstance(job, dict)}
    statuses = {part.strip().lower() for part in query.get("status", "").split(",") if part.strip()}
    workflow_id = query.get("workflow_id")
    for prompt_id, entry in request.app[JOURNAL].history.items():
        if prompt_id in known:
            continue
        job = jobs.history_job(prompt_id, _public(entry))
        if (not statuses or job["status"] in statuses) and (not workflow_id or job.get("workflow_id") == workflow_id):
            found.append(job)
    if len(found) > len(listing["jobs"]):
        found = jobs.sort_jobs(found, query.get("sort_by", "created_at").lower(),
                               query.get("sort_order", "desc").lower() == "desc")
    offset = max(_int(request.query.get("offset")) or 0, 0)
    limit = _int(request.query.get("limit"))
    page = found[offset:] if limit is None else found[offset:offset + limit]
    return web.json_response({"jobs": page, "pagination": {
        "offset": offset, "limit": limit, "total": len(found), "has_more": offset + len(page) < len(found)}})


def _public(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry as /jobs may show it: no sensitive extra_data."""
    item = entry.get("prompt")
    if isinstance(item, list) and len(item) > 3 and isinstance(item[3], dict):
        extra = {k: v for k, v in item[3].items() if k not in SENSITIVE_EXTRA_DATA_KEYS}
        return {**entry, "prompt": [*item[:3], extra, *item[4:]]}
    return entry
