"""Ending helper tasks without losing a cancel: ``cancel_and_wait`` and ``finish``.

The usual way to stop a helper task, ``task.cancel()`` then ``await task`` under
``contextlib.suppress(asyncio.CancelledError)``, cannot tell the helper's cancel from one aimed at the
caller: a cancel that lands on the caller while it waits (a worker stopped while it waits for its
progress writer) is swallowed, and the caller goes on as if never cancelled. These helpers wait with
``asyncio.wait``, which never mistakes the two: the helper's own cancellation is its result, and a cancel
of the caller is raised to the caller, once the helper has ended (it was told to end, so that is soon;
ending it is what the caller came for, as with a ``TaskGroup``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


async def _wait_out(tasks: set[asyncio.Future[Any]]) -> asyncio.CancelledError | None:
    """Wait until every task has ended, whatever cancels the caller meanwhile: the caller's cancel, if
    one came, is returned for the caller to raise."""
    cancelled: asyncio.CancelledError | None = None
    while pending := {task for task in tasks if not task.done()}:
        try:
            await asyncio.wait(pending)
        except asyncio.CancelledError as exc:  # aimed at the caller, not at the tasks: raised once they end
            cancelled = exc
    return cancelled


async def cancel_and_wait(*tasks: asyncio.Future[Any]) -> None:
    """Cancel ``tasks`` and return once every one has ended.

    A cancel of the caller that lands meanwhile is raised (after the tasks have ended), never swallowed.
    A task that had failed before it could be cancelled has its error raised, as ``await task`` would (the
    first such, once all have ended; a caller that does not care wraps the call in
    ``contextlib.suppress(Exception)``); the caller's own cancel comes first.
    """
    for task in tasks:
        task.cancel()
    cancelled = await _wait_out(set(tasks))
    errors = [task.exception() for task in tasks if not task.cancelled()]  # also marks each as retrieved
    if cancelled is not None:
        raise cancelled
    for error in errors:
        if error is not None:
            raise error


async def finish(work: Awaitable[T]) -> T:
    """Run ``work`` to its end even if the caller is cancelled meanwhile; that cancel is raised after.

    For a step that must not be cut in the middle, such as a store write whose outcome the caller has to
    know (a write cut off may still land, and then nobody knows to remove it).
    """
    task = asyncio.ensure_future(work)
    cancelled = await _wait_out({task})
    if cancelled is not None:
        if not task.cancelled():
            task.exception()  # retrieved: the caller gets its own cancel, not the work's outcome
        raise cancelled
    return task.result()
