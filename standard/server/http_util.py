"""Small helpers shared by the route modules: JSON errors and body parsing."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


def error_body(kind: str, message: str, details: str = "") -> dict[str, Any]:
    """ComfyUI's error object: ``{"type", "message", "details", "extra_info"}``."""
    return {"type": kind, "message": message, "details": details, "extra_info": {}}


def json_error(status: int, kind: str, message: str, details: str = "") -> web.Response:
    return web.json_response({"error": error_body(kind, message, details)}, status=status)


_ERRORS: dict[int, type[web.HTTPException]] = {
    400: web.HTTPBadRequest, 401: web.HTTPUnauthorized, 403: web.HTTPForbidden,
    404: web.HTTPNotFound, 409: web.HTTPConflict, 413: web.HTTPRequestEntityTooLarge,
    503: web.HTTPServiceUnavailable,
}


def json_http_error(status: int, kind: str, message: str, details: str = "",
                  extra: dict[str, Any] | None = None) -> web.HTTPException:
    """An HTTP error (to raise) whose body is our JSON error object."""
    body = {"error": error_body(kind, message, details), **(extra or {})}
    cls = _ERRORS[status]
    if cls is web.HTTPRequestEntityTooLarge:
        return cls(max_size=0, actual_size=0, text=json.dumps(body), content_type="application/json")
    return cls(text=json.dumps(body), content_type="application/json")


async def read_json_object(request: web.Request, *, allow_empty: bool = False,
                           kind: str = "invalid_request") -> dict[str, Any]:
    """The request body as a JSON object, or a 400 JSON error of ``kind`` (+ empty node_errors)."""
    raw = await request.read()
    if not raw.strip():
        if allow_empty:
            return {}
        raise json_http_error(400, kind, "Request body is empty", "expected a JSON object",
                            {"node_errors": {}})
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise json_http_error(400, kind, "Request body is not valid JSON", str(exc),
                            {"node_errors": {}}) from exc
    if not isinstance(data, dict):
        raise json_http_error(400, kind, "Request body must be a JSON object",
                            f"got {type(data).__name__}", {"node_errors": {}})
    return data


def query_int(request: web.Request, name: str) -> int | None:
    """An integer query parameter, or a 400 naming it."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise json_http_error(400, "invalid_parameter", f"{name} must be an integer", f"got {raw!r}") from None


async def read_body_within(request: web.Request, limit: int) -> bytes | None:
    """The body, or None when it is longer than ``limit`` (refused before reading when the length is known)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
