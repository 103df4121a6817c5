"""ComfyUI's ``comfy.utils``: the ``ProgressBar`` plugins report progress with."""

from __future__ import annotations

from typing import Any

from .. import context

PROGRESS_BAR_ENABLED = True


class ProgressBar:
    """``ProgressBar(total).update(n)`` / ``update_absolute(value)`` -> a ``progress`` event."""

    def __init__(self, total: int, node_id: str | None = None) -> None:
        self.total = total
        self.current: float = 0
        self.node_id = node_id

    def update_absolute(self, value: float, total: float | None = None, preview: Any = None) -> None:
        if total is not None:
            self.total = int(total)
        self.current = min(value, self.total)
        context.throw_if_interrupted()
        context.report_progress(self.current, self.total, self.node_id, preview)

    def update(self, value: float) -> None:
        self.update_absolute(self.current + value)


def set_progress_bar_enabled(enabled: bool) -> None:
    global PROGRESS_BAR_ENABLED
    PROGRESS_BAR_ENABLED = enabled
