"""The values ``standard.client`` hands out: timeouts, WS items, run results.

Kept apart from the client so the editions can name them without the
transport code; ``standard.client`` re-exports every one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

PREVIEW_IMAGE = 1
IMAGE_FORMATS = {1: "JPEG", 2: "PNG"}
TERMINAL_EVENTS = frozenset({"execution_success", "execution_error", "execution_interrupted"})


def in_last_step(data: Any, prompt_id: str) -> bool:
    """A ``progress`` event's data says ``prompt_id``'s sampler is in its last step: ``value`` (steps done)
    reached ``max - 1``. ComfyUI's samplers report each step as it ends, so waiting for ``value == max``
    would leave no time to queue the next task before this one ends (on the simulated GPU, none at all);
    one step ahead leaves a step's time, plus the decode and save after sampling on a real graph. The
    cluster and the API worker both fill an instance's next slot then.

    Only an event naming the prompt counts: one naming none, or another prompt (a task run before it, another
    client's), says nothing about this one.
    """
    if not isinstance(data, dict) or data.get("prompt_id") != prompt_id:
        return False
    value, total = data.get("value"), data.get("max")
    if isinstance(value, bool) or isinstance(total, bool):
        return False
    return isinstance(value, (int, float)) and isinstance(total, (int, float)) and 0 < total <= value + 1


@dataclass(frozen=True)
class ClientTimeouts:
    """Timeouts and retry pacing, in seconds.

    ``run_s`` bounds a whole ``run()`` (None: as long as the workflow takes);
    ``disconnected_s`` is how long the event socket may stay down before
    ``events()`` gives up (None: keep trying).
    """

    connect_s: float = 5.0
    request_s: float = 30.0
    ws_open_s: float = 10.0
    run_s: float | None = None
    disconnected_s: float | None = 60.0
    reconnect_min_s: float = 0.05
    reconnect_max_s: float = 2.0
    history_poll_s: float = 0.25
    idle_check_s: float = 5.0
    get_retries: int = 2


DEFAULT_TIMEOUTS = ClientTimeouts()


@dataclass(frozen=True)
class BinaryFrame:
    """A binary WS frame: ``>I`` event type, then the payload (previews: ``>I`` format + image)."""

    event_type: int
    payload: bytes

    @property
    def image_format(self) -> str | None:
        if self.event_type != PREVIEW_IMAGE or len(self.payload) < 4:
            return None
        return IMAGE_FORMATS.get(struct.unpack(">I", self.payload[:4])[0], "unknown")

    @property
    def image(self) -> bytes | None:
        return self.payload[4:] if self.event_type == PREVIEW_IMAGE else None


@dataclass(frozen=True)
class Connected:
    """Marker from ``events(..., markers=True)``: the socket (re)connected (attempt 0 = first)."""

    attempt: int


@dataclass(frozen=True)
class Disconnected:
    """Marker from ``events(..., markers=True)``: the socket broke; a reconnect follows."""

    reason: str


WsItem = dict[str, Any] | BinaryFrame | Connected | Disconnected


@dataclass
class RunResult:
    """What ``run()`` saw: the prompt's end state, its ``executed`` events and history outputs."""

    prompt_id: str
    status: str  # "success" | "error" | "interrupted"
    executed: list[dict[str, Any]]
    outputs: dict[str, Any]
    history: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    reconnects: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "success"


def queued_id(item: Any) -> str | None:
    """ComfyUI's queue items are ``[number, prompt_id, prompt, extra_data, outputs]``."""
    return item[1] if isinstance(item, list) and len(item) > 1 else None


def status_from_history(entry: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    status = entry.get("status") or {}
    messages = status.get("messages") or []
    for kind, data in messages:
        if kind == "execution_error":
            return "error", data
        if kind == "execution_interrupted":
            return "interrupted", None
    if status.get("status_str") == "error":
        return "error", None
    return "success", None
