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


async def next_turns(count: int) -> None:
    """Let the event loop run ``count`` times (no clock involved): a test steps an interleaving turn by turn."""
    for _ in range(count):
        await asyncio.sleep(0)


async def cancelled_after(call: Callable[[], Awaitable[object]], turns: int) -> bool:
    """Start ``call`` in a task, cancel it ``turns`` loop turns later: True if it ended cancelled (or had
    already ended, so there was nothing to cancel), False if it returned normally after the cancel."""
    task = asyncio.ensure_future(call())
    await next_turns(turns)
    if not task.cancel():
        return True
    try:
        await task
    except asyncio.CancelledError:
        return True
    return False
