"""Small helpers shared by every role's routes (and the login pages): JSON errors and body parsing.

:func:`json_error` is the one JSON error response of every role (its body is
``standard.errors.error_body``, ComfyUI's error object).

Every JSON body a route reads goes through :func:`parse_json` (also the API
front's and the cluster's): it refuses ``NaN`` / ``Infinity`` (not JSON; a
``/history`` holding them is unreadable to strict clients) and nesting deeper
than ``MAX_JSON_DEPTH`` (a ``RecursionError`` in whatever walks it next).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp import web
from multidict import MultiDictProxy

from .errors import ComfyServeError, RequestError, error_body

# ComfyUI's deepest bodies (a UI workflow with subgraphs in extra_pnginfo) nest about 20 levels.
MAX_JSON_DEPTH = 128
QUICK_WALK_CONTAINERS = 2048  # lists/objects walked before counting brackets is cheaper


class BadJSON(RequestError):
    """A body that is not JSON we take: invalid, non-finite numbers, or nested too deep."""


def _refuse_constant(name: str) -> Any:
    raise BadJSON(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadJSON(f"number {text[:40]} is out of range")
    return value


def _depth_exceeds(value: Any, limit: int, budget: int | None = None) -> bool | None:
    """True when ``value`` nests lists/objects deeper than ``limit`` (iterative: no recursion); None when
    it holds more than ``budget`` lists/objects (the walk stopped there)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        if budget is not None:
            budget -= 1
            if budget < 0:
                return None
        item, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def parse_json(raw: bytes | str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` for request bodies; raises :class:`BadJSON` (a ValueError) with a reason."""
    try:
        value = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise BadJSON(f"nested deeper than {max_depth} levels") from None
    except UnicodeDecodeError as exc:
        raise BadJSON(f"not UTF-8: {exc}") from None
    except json.JSONDecodeError as exc:
        raise BadJSON(str(exc)) from None
    # Few lists/objects (a graph, or an inline input's long string): the walk is quick. Many: the depth is
    # at most the number of opening brackets, so most such bodies skip the full walk after one count.
    exceeds = _depth_exceeds(value, max_depth, budget=QUICK_WALK_CONTAINERS)
    if exceeds is None:
        opened = raw.count(b"[") + raw.count(b"{") if isinstance(raw, bytes) else raw.count("[") + raw.count("{")
        exceeds = opened > max_depth and _depth_exceeds(value, max_depth)
    if exceeds:
        raise BadJSON(f"nested deeper than {max_depth} levels")
    return value


class JSONError(ComfyServeError, web.HTTPException):
    """An HTTP error of any status whose body is ComfyUI's error JSON; raise it (see :func:`json_error`).

    For a status aiohttp has a class for, the instance is also of that class
    (``except web.HTTPNotFound`` still catches a JSON 404).
    """

    def __init__(self, status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None) -> None:
        self.status_code = status  # aiohttp's HTTPException reads the status from here
        # Not super(): HTTPRequestEntityTooLarge & co. take other arguments; the body is ours.
        web.HTTPException.__init__(self, text=json.dumps(body), content_type="application/json",
                                   headers=headers)


_AIOHTTP_ERRORS: dict[int, type[web.HTTPException]] = {
    cls.status_code: cls for cls in vars(web).values()
    if isinstance(cls, type) and issubclass(cls, web.HTTPError) and cls.status_code > 0
}


@functools.cache
def _error_class(status: int) -> type[JSONError]:
    base = _AIOHTTP_ERRORS.get(status)
    if base is None:
        return JSONError
    return type(f"JSON{base.__name__}", (JSONError, base), {"__module__": __name__, "__doc__": JSONError.__doc__})


def json_error(status: int, kind: str, message: str, details: str = "", *,
               extra: dict[str, Any] | None = None, headers: Mapping[str, str] | None = None) -> JSONError:
    """The one JSON error response: ``{"error": error_body(...), **extra}`` with ``status``; to raise.

    ``extra`` adds top-level keys next to ``"error"`` (``/prompt``'s ``node_errors``).
    Raised rather than returned: aiohttp deprecates returning an HTTPException,
    and raising also reaches the client from inside helpers and middlewares.
    """
    return _error_class(status)(status, {"error": error_body(kind, message, details), **(extra or {})}, headers)


async def read_json_object(request: web.Request, *, allow_empty: bool = False,
                           kind: str = "invalid_request") -> dict[str, Any]:
    """The request body as a JSON object, or a 400 JSON error of ``kind`` (+ empty node_errors)."""
    raw = await request.read()
    if not raw.strip():
        if allow_empty:
            return {}
        raise json_error(400, kind, "Request body is empty", "expected a JSON object",
                         extra={"node_errors": {}})
    try:
        data = parse_json(raw)
    except BadJSON as exc:
        raise json_error(400, kind, "Request body is not valid JSON", str(exc),
                         extra={"node_errors": {}}) from None
    if not isinstance(data, dict):
        raise json_error(400, kind, "Request body must be a JSON object",
                         f"got {type(data).__name__}", extra={"node_errors": {}})
    return data


async def read_form(request: web.Request) -> MultiDictProxy[str | bytes | bytearray | web.FileField]:
    """The multipart / urlencoded form, or a 400 when it cannot be parsed (e.g. no boundary)."""
    try:
        return await request.post()
    except (ValueError, AssertionError) as exc:  # aiohttp's multipart reader also asserts on malformed parts
        raise json_error(400, "invalid_request", "the form body cannot be parsed", str(exc)) from None


def query_int(request: web.Request, name: str) -> int | None:
    """An integer query parameter, or a 400 naming it."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise json_error(400, "invalid_parameter", f"{name} must be an integer", f"got {raw!r}") from None


async def read_body_within(request: web.Request, limit: int) -> bytes | None:
    """The body, or None when it is longer than ``limit`` (refused before reading when the length is known)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    content = request.content
    if content.is_eof() and content.exception() is None:  # all of it came in already (a small body): no awaits
        data = content.read_nowait()
        return data if len(data) <= limit else None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


EVENT_SOCKET_HEARTBEAT_S = 30.0


def event_socket(**options: Any) -> web.WebSocketResponse:
    """The server side of an event ``/ws`` (every edition): heartbeat, and no permessage-deflate.

    aiohttp leaves a closed socket that had a heartbeat in a reference cycle (the
    connection keeps the socket's data-received callback after it is lost), so
    it is freed only by the cyclic GC, which native memory does not prompt. With
    deflate each closed socket held its zlib state there, and RSS grew without a
    plateau under connect/close churn (62 -> 241 MB in 12 rounds of 200). The
    events are small JSON and already-compressed previews: compression gains
    the frontend little, and a client that offers it simply gets plain frames
    (real ComfyUI negotiates it; the queue's watch socket never did).
    """
    return web.WebSocketResponse(heartbeat=EVENT_SOCKET_HEARTBEAT_S, compress=False, **options)
