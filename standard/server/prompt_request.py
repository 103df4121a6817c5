"""The body of ``POST /prompt``, checked once for every server that accepts it.

The instance (``routes_prompt``) and the cluster proxy both take ComfyUI's
request: ``prompt``, ``client_id``, ``extra_data``, ``partial_execution_targets``,
``prompt_id``, ``number``, ``front``. The shape checks and the ``extra_data``
that goes into the queue live here, so the two cannot drift apart.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..http_util import JSONError, json_error
from ..serving import draining_headers
from .prompt_queue import SENSITIVE_EXTRA_DATA_KEYS


def invalid_prompt(message: str, details: str = "") -> JSONError:
    """ComfyUI's 400 for a request it cannot take: ``invalid_prompt`` with empty ``node_errors``."""
    return json_error(400, "invalid_prompt", message, details, extra={"node_errors": {}})


@dataclass(frozen=True)
class PromptRequest:
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    client_id: str | None
    targets: list[str] | None  # partial_execution_targets
    prompt_id: str | None  # the request's own (a canonical UUID), or None (the server picks one)
    number: float | None  # the request's own, or None (the server numbers it)
    front: bool

    def queued_extra_data(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(extra_data as history shows it, with client_id and create_time; the sensitive keys kept apart)."""
        extra_data = dict(self.extra_data)
        if self.client_id is not None:
            extra_data["client_id"] = self.client_id
        sensitive = {key: extra_data.pop(key) for key in SENSITIVE_EXTRA_DATA_KEYS if key in extra_data}
        extra_data["create_time"] = int(time.time() * 1000)
        return extra_data, sensitive


def refused_while_draining() -> JSONError:
    """``POST /prompt`` after SIGTERM (standard and cluster): 503 in ComfyUI's error shape, with Retry-After."""
    return json_error(503, "server_draining", "The server is shutting down",
                      "it finishes what it accepted and takes no new prompts; send this one again "
                      "in a moment or elsewhere", extra={"node_errors": {}}, headers=draining_headers())


def parse_prompt_request(body: dict[str, Any]) -> PromptRequest:
    """Check the request's fields (not the graph itself); raises ComfyUI-shaped 400s."""
    if "prompt" not in body:
        raise json_error(400, "no_prompt", "No prompt provided", "No prompt provided", extra={"node_errors": {}})
    prompt = body["prompt"]
    if not isinstance(prompt, dict):
        raise invalid_prompt("Invalid prompt: the prompt must be a JSON object of nodes",
                             f"got {type(prompt).__name__}")
    extra_data = body.get("extra_data", {})
    if not isinstance(extra_data, dict):
        raise invalid_prompt("extra_data must be a JSON object", f"got {type(extra_data).__name__}")
    client_id = body.get("client_id")
    if client_id is not None and not isinstance(client_id, str):
        raise invalid_prompt("client_id must be a string", f"got {type(client_id).__name__}")
    targets = body.get("partial_execution_targets")
    if targets is not None and (not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)):
        raise invalid_prompt("partial_execution_targets must be a list of node ids")
    return PromptRequest(prompt, extra_data, client_id, targets, _prompt_id(body), _number(body),
                         bool(body.get("front")))


def _prompt_id(body: dict[str, Any]) -> str | None:
    """ComfyUI's ``validate_job_id``: a client's own id is a canonical UUID (lowercase, hyphenated).

    The id is compared verbatim everywhere (history keys, events, /interrupt), so
    another spelling is refused rather than silently rewritten."""
    raw = body.get("prompt_id")
    if raw is None:
        return None
    if not is_canonical_uuid(raw):
        raise json_error(400, "invalid_prompt_id", "prompt_id must be a valid UUID",
                         "prompt_id must be a UUID string in canonical lowercase hyphenated form; "
                         "omit it to let the server generate one", extra={"node_errors": {}})
    return str(raw)


def is_canonical_uuid(value: Any) -> bool:
    """``str(uuid.UUID(value)) == value``, as ComfyUI checks job ids."""
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def _number(body: dict[str, Any]) -> float | None:
    """ComfyUI's ``float(number)``, but finite: ``"inf"`` / ``"nan"`` would sort the queue wrongly
    and make ``/history`` invalid JSON."""
    if "number" not in body:
        return None
    raw = body["number"]
    if isinstance(raw, bool):
        raise invalid_prompt("number must be a number", repr(raw))
    try:
        number = float(raw)
    except (TypeError, ValueError):
        raise invalid_prompt("number must be a number", repr(raw)[:80]) from None
    if not math.isfinite(number):
        raise invalid_prompt("number must be a finite number", repr(raw)[:80])
    return number


def delete_ids(body: dict[str, Any]) -> list[str]:
    """The ``delete`` list of ``POST /queue`` and ``POST /history`` ([] when absent)."""
    ids = body.get("delete", [])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise json_error(400, "invalid_request", "delete must be a list of prompt ids")
    return ids
