"""Per-node progress of the running prompt: ComfyUI's ``progress_state`` event.

The new frontend draws each node's bar from it. Whenever a node starts, reports
progress or finishes, the event carries the state of every node of the prompt
that left ``pending`` (``running`` / ``finished``), as ComfyUI's
``WebUIProgressHandler`` sends it. The graphs here have no subgraphs, so a
node's display and real ids are its own and it has no parent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

RUNNING, FINISHED = "running", "finished"


class ProgressState:
    """The progress registry of one prompt; ``send`` gets each ``progress_state`` payload."""

    def __init__(self, prompt_id: str, send: Callable[[dict[str, Any]], None]) -> None:
        self.prompt_id = prompt_id
        self._send = send
        self._nodes: dict[str, dict[str, Any]] = {}

    def start(self, node_id: str) -> None:
        self._set(node_id, RUNNING, 0.0, 1.0)

    def update(self, node_id: str, value: float, total: float) -> None:
        self._set(node_id, RUNNING, value, total)

    def finish(self, node_id: str) -> None:
        total = self._nodes.get(node_id, {}).get("max", 1.0)
        self._set(node_id, FINISHED, total, total)

    def _set(self, node_id: str, state: str, value: float, total: float) -> None:
        self._nodes[node_id] = {
            "value": value, "max": total, "state": state, "node_id": node_id, "prompt_id": self.prompt_id,
            "display_node_id": node_id, "parent_node_id": None, "real_node_id": node_id,
        }
        self._send({"prompt_id": self.prompt_id, "nodes": {key: dict(entry) for key, entry in self._nodes.items()}})
