"""Query-string parsing shared by the handlers: one place that says what is a bad request.

Reserved parameters look like ``_name_`` (any key starting with '_' is reserved); every other
parameter is a tag.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from aiohttp import web

from standard.errors import RequestError

from .settings import GROUP_HEADER, IDEMPOTENCY_HEADER, USER_HEADER

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")
MAX_INDEXES = 10_000
MAX_KEY_CHARS = 256  # a task_id, requestId or idempotency key: echoed in a response header


class BadParam(RequestError):
    """A query parameter has a value the service cannot use (answered with 400)."""


def tags_of(query: Mapping[str, str]) -> dict[str, str]:
    """The tags among the parameters: keys starting with '_' are reserved, never tags."""
    return {key: value for key, value in query.items() if not key.startswith("_")}


def header_safe(name: str, value: str, max_chars: int = MAX_KEY_CHARS) -> str:
    """``value`` if it can travel in a response header: 1-``max_chars`` printable characters.

    Checked before anything is stored: a CR, LF or NUL would make the reply fail after the
    put, and a client that retries would then put twice.
    """
    if not value or len(value) > max_chars:
        raise BadParam(f"{name} must be 1-{max_chars} characters, got {len(value)}")
    if not value.isprintable():
        raise BadParam(f"{name} must not contain control characters, got {value[:40]!r}")
    return value


def idempotency_key(request: web.Request) -> str | None:
    """The request's ``Idempotency-Key`` header (checked), or None."""
    raw = request.headers.get(IDEMPOTENCY_HEADER)
    return None if raw is None else header_safe(IDEMPOTENCY_HEADER, raw)


def flag(query: Mapping[str, str], name: str, default: bool = False) -> bool:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise BadParam(f"{name} must be true or false, got {raw!r}")


def integer(query: Mapping[str, str], name: str, default: int, *, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise BadParam(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise BadParam(f"{name} must be between {low} and {high}, got {value}")
    return value


def duration_s(query: Mapping[str, str], name: str, default_s: float, *, high_s: float) -> float:
    """``5s``, ``500ms``, ``1m`` or a bare number of seconds."""
    raw = query.get(name)
    if raw is None or raw == "":
        return default_s
    match = _DURATION.match(raw)
    if match is None:
        raise BadParam(f"{name} must be a duration like 5s or 500ms, got {raw!r}")
    value = float(match.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[match.group(2)]
    if value > high_s:
        raise BadParam(f"{name} must be at most {high_s:g}s, got {raw!r}")
    return value


def indexes(query: Mapping[str, str], name: str = "_indexes_") -> list[int]:
    """A comma-separated list of positive indexes."""
    raw = query.get(name)
    if raw is None or not raw.strip():
        raise BadParam(f"{name} is required (comma-separated indexes)")
    parts = [part.strip() for part in raw.split(",") if part.strip()]
    if len(parts) > MAX_INDEXES:
        raise BadParam(f"{name} lists {len(parts)} indexes; at most {MAX_INDEXES} per request")
    out: list[int] = []
    for part in parts:
        if not part.isdigit() or int(part) <= 0 or int(part) >= 2**63:
            raise BadParam(f"{name} must list positive integers, got {part!r}")
        out.append(int(part))
    return out


def consumer_of(request: web.Request) -> str | None:
    """``gid/uid`` from the SDK's identity headers; None when the client sent no uid."""
    uid = request.headers.get(USER_HEADER, "").strip()
    if not uid:
        return None
    gid = request.headers.get(GROUP_HEADER, "").strip() or "eas"
    return f"{gid}/{uid}"
