"""The sink item of a task: what a client reads with ``watch`` on ``svc/sink``.

Success: a JSON list of the ``executed`` event objects of the nodes that
produced output, followed by the final ``outputs`` map (the platform's
documented shape). A cached node without UI output reports ``executed`` with
``output: null`` on the WebSocket, as ComfyUI does; such events stay out of
the sink item, where a client indexes ``ev["data"]["output"]["images"]``. Failure: a one-element
list holding the ``execution_error`` event (``execution_interrupted`` when the
run was stopped). Tags: the input's ``task_id`` and ``requestId`` (plus the
input's other tags), ``status`` and the instance's ``prompt_id``.
"""

from __future__ import annotations

import json
from typing import Any

from standard.client import RunResult
from standard.errors import PromptRejected

STATUS_TAG = "status"
PROMPT_ID_TAG = "prompt_id"


def encode(events: list[Any]) -> bytes:
    return json.dumps(events, separators=(",", ":")).encode()


def from_run(result: RunResult) -> tuple[str, list[Any]]:
    """(status, events) of a finished run."""
    if result.status == "success":
        return "success", [*(event for event in result.executed if _has_output(event)), result.outputs]
    if result.status == "interrupted":
        data = {"prompt_id": result.prompt_id, "node_id": None, "executed": []}
        return "error", [{"type": "execution_interrupted", "data": data}]
    error = dict(result.error or {})
    error.setdefault("prompt_id", result.prompt_id)
    error.setdefault("exception_message", "the prompt failed")
    return "error", [{"type": "execution_error", "data": error}]


def _has_output(event: Any) -> bool:
    data = event.get("data") if isinstance(event, dict) else None
    return isinstance(data, dict) and bool(data.get("output"))


def from_rejection(exc: PromptRejected) -> tuple[str, list[Any]]:
    """The instance refused the graph at validation (unknown node, bad input): ComfyUI's 400 body."""
    body = exc.body or {}
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    data = {
        "prompt_id": None,
        "node_id": None,
        "node_type": None,
        "exception_type": error.get("type", "invalid_prompt"),
        "exception_message": error.get("message") or str(exc),
        "details": error.get("details", ""),
        "node_errors": body.get("node_errors", {}),
        "traceback": [],
    }
    return "error", [{"type": "execution_error", "data": data}]


def from_failure(kind: str, message: str) -> tuple[str, list[Any]]:
    """A task that could not even be submitted (its data is not a graph)."""
    data = {"prompt_id": None, "node_id": None, "node_type": None, "exception_type": kind,
            "exception_message": message, "traceback": []}
    return "error", [{"type": "execution_error", "data": data}]
