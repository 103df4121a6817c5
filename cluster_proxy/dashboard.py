"""What the dashboard and the admin page show, as plain values a template prints as is.

Every field is a string, a number or a list of them: no ``None``/``True`` reaches a page.
Times are UTC, written out; a waiting task shows its place in line, a running one the node it
is on (as the instance last reported it to this proxy), a finished one its outputs with
thumbnails. ``Changes`` wakes the dashboard's live stream (``GET /dashboard/events``) when a
queue changes; the stream also looks again every ``LIVE_CHECK_S`` for what changes without a
queue change (the node a task is on, a sibling proxy's work).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlencode

from .store import PENDING, RUNNING, Task

LIVE_CHECK_S = 1.0
HISTORY_ROWS = 50
THUMBNAIL_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif"})
OUTPUT_KINDS = ("images", "gifs", "video", "videos", "audio", "files")


class Changes:
    """A pulse: ``bump()`` wakes everyone waiting in ``wait()`` (no lost wake-ups, no polling)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def bump(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._event.wait()


def when(ms: int | None) -> str:
    """``2026-11-26 02:05:44 UTC``; empty for no time."""
    if not ms:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))


def duration(start_ms: int | None, end_ms: int | None) -> str:
    """``1 min 05 s`` / ``3.2 s``; empty when a bound is missing."""
    if not start_ms or not end_ms or end_ms < start_ms:
        return ""
    seconds = (end_ms - start_ms) / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s"


def describe(task: Task) -> str:
    """What the prompt is, in a few words: its output nodes' classes and its size."""
    kinds = sorted({str(node.get("class_type")) for node_id, node in task.prompt.items()
                    if isinstance(node, dict) and node_id in task.outputs_to_execute})
    count = len(task.prompt)
    return f"{', '.join(kinds) or 'prompt'} · {count} node{'s' if count != 1 else ''}"


def node_label(task: Task, node_id: str | None) -> str:
    if not node_id:
        return ""
    node = task.prompt.get(str(node_id))
    class_type = node.get("class_type") if isinstance(node, dict) else None
    return f"{node_id} · {class_type}" if class_type else str(node_id)


def outputs_of(history: dict[str, Any] | None) -> list[dict[str, str]]:
    """Each output file of a finished task with its ``/view`` link and whether it makes a thumbnail."""
    files: list[dict[str, str]] = []
    outputs = (history or {}).get("outputs") or {}
    if not isinstance(outputs, dict):
        return files
    for node_output in outputs.values():
        if not isinstance(node_output, dict):
            continue
        for kind in OUTPUT_KINDS:
            for item in node_output.get(kind) or []:
                if not isinstance(item, dict) or not isinstance(item.get("filename"), str) or not item["filename"]:
                    continue
                query = {"filename": item["filename"], "subfolder": str(item.get("subfolder") or ""),
                         "type": str(item.get("type") or "output")}
                thumbnail = PurePosixPath(item["filename"]).suffix.lower() in THUMBNAIL_SUFFIXES
                files.append({"name": item["filename"], "url": "/view?" + urlencode(query),
                              "thumbnail": "yes" if thumbnail else ""})
    return files


def status_of(task: Task) -> str:
    status = (task.history or {}).get("status") or {}
    text = status.get("status_str") if isinstance(status, dict) else None
    return str(text) if text else "done"


def queue_row(task: Task, position: int | None, node: str | None, instance_name: str) -> dict[str, str]:
    row = {"prompt_id": task.prompt_id, "what": describe(task), "submitted": when(task.created_ms),
           "state": "running" if task.shown_state == RUNNING else "waiting", "detail": "",
           "notes": "; ".join(task.notes)}
    if task.shown_state == PENDING:  # queued ahead on an instance too: not started yet
        row["detail"] = f"#{position + 1} in line" if position is not None else "waiting"
    elif task.state == RUNNING:
        where = f"on {instance_name}" if instance_name else "running"
        at = node_label(task, node)
        since = f", since {when(task.started_ms)}" if task.started_ms else ""
        row["detail"] = f"{where}{since}" + (f", node {at}" if at else "")
    return row


def history_row(task: Task) -> dict[str, Any]:
    return {"prompt_id": task.prompt_id, "what": describe(task), "submitted": when(task.created_ms),
            "ended": when(task.ended_ms), "took": duration(task.started_ms, task.ended_ms), "status": status_of(task),
            "outputs": outputs_of(task.history), "notes": "; ".join(task.notes)}
