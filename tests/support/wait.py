"""Waiting on a condition instead of sleeping: ``await until(lambda: ..., what="...")``.

A test waits for the state it needs (a metric, a file, a log line, a queue length) with a bounded poll,
never for a fixed time that hopes the state has arrived on a loaded machine.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any


async def until(condition: Callable[[], Any | Awaitable[Any]], timeout_s: float = 30.0,
                what: str = "condition") -> None:
    """Wait for ``condition()`` (awaited if it returns an awaitable; checked every few ms) to be truthy;
    fail after ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                result = condition()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"{what} did not happen within {timeout_s}s") from None
