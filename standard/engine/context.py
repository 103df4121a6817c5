"""What the node code running on the execution thread may ask about: its folders,
whether it was interrupted, and where its progress goes.

ComfyUI keeps this in module globals (``folder_paths``, ``comfy.model_management``).
Here it lives in a context variable set by the executor for the thread that runs
a prompt, so several instances in one process (tests, proxies) never mix their
data dirs; outside a prompt the registry that loaded last is the answer.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..datadir import DataDir, WorkDirs
from ..errors import EngineError


class InterruptProcessingException(EngineError):
    """Raised inside a node when the running prompt was interrupted (ComfyUI's name)."""


@dataclass
class EngineContext:
    """Folders of one instance plus the hooks of the prompt running on it."""

    data_dir: DataDir
    workdirs: WorkDirs
    interrupted: threading.Event = field(default_factory=threading.Event)
    # (value, total, node_id, preview) -> None; set by the executor while a prompt runs.
    progress_hook: Callable[[float, float, str | None, Any], None] | None = None
    executing_node: str | None = None


_current: contextvars.ContextVar[EngineContext | None] = contextvars.ContextVar("comfyserve_engine", default=None)
_last_loaded: EngineContext | None = None


def set_default(context: EngineContext) -> None:
    """The context code outside a prompt falls back to (the registry that loaded last)."""
    global _last_loaded
    _last_loaded = context


@contextlib.contextmanager
def use(context: EngineContext) -> Iterator[EngineContext]:
    """Make ``context`` the answer for the calling thread while the block runs."""
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def current() -> EngineContext:
    context = _current.get() or _last_loaded
    if context is None:
        raise RuntimeError("no comfyserve engine is loaded in this process")
    return context


def throw_if_interrupted() -> None:
    """ComfyUI's ``throw_exception_if_processing_interrupted``."""
    context = _current.get() or _last_loaded
    if context is not None and context.interrupted.is_set():
        raise InterruptProcessingException()


def report_progress(value: float, total: float, node_id: str | None = None, preview: Any = None) -> None:
    """ComfyUI's ``ProgressBar.update``: send a progress event for the executing node."""
    context = _current.get() or _last_loaded
    if context is None or context.progress_hook is None:
        return
    context.progress_hook(value, total, node_id or context.executing_node, preview)
