"""ComfyUI's ``comfy.model_management`` as far as CPU plugins use it: interrupts and devices."""

from __future__ import annotations

from typing import Any

from .. import context
from ..context import InterruptProcessingException

__all__ = ["InterruptProcessingException", "interrupt_current_processing", "processing_interrupted",
           "throw_exception_if_processing_interrupted", "get_torch_device", "soft_empty_cache",
           "unload_all_models"]


def interrupt_current_processing(value: bool = True) -> None:
    event = context.current().interrupted
    event.set() if value else event.clear()


def processing_interrupted() -> bool:
    return context.current().interrupted.is_set()


def throw_exception_if_processing_interrupted() -> None:
    context.throw_if_interrupted()


def get_torch_device() -> Any:
    return "cpu"


def intermediate_device() -> Any:
    return "cpu"


def soft_empty_cache(force: bool = False) -> None:
    """Nothing to release: the embedded engine holds no accelerator memory."""


def unload_all_models() -> None:
    """Nothing to unload: the embedded engine loads no model weights."""
