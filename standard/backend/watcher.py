"""The front's watchers of ComfyUI: one loop that looks at it while there is something to follow.

The journal (prompts forwarded and not finished) and the oss:// inputs (copies held for prompts in
ComfyUI's queue) both follow prompts by polling ComfyUI; each says what it follows (``busy``), how it
looks (``look``) and how often (``interval_s``), and this loop does the rest the same way for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import aiohttp

from .runtime import Backend

log = logging.getLogger("comfyserve.backend")

READY_WAIT_S = 10.0  # how long one wait for a (re)starting ComfyUI lasts before the loop checks again


async def watch_comfyui(backend: Backend, wake: asyncio.Event, *, name: str, busy: Callable[[], bool],
                        look: Callable[[], Awaitable[None]], interval_s: Callable[[], float],
                        soon: asyncio.Event | None = None) -> None:
    """Forever (until cancelled): while ``busy()``, ``look()`` at ComfyUI every ``interval_s()`` once it is
    addressable (at once when ``soon`` is set meanwhile); while not, asleep until ``wake`` is set. A look
    that fails is logged and the next one comes as planned: the watcher must outlive anything one answer
    does to it."""
    soon = soon if soon is not None else asyncio.Event()  # never set: the looks come every interval_s()
    while True:
        if not busy():
            wake.clear()
            await wake.wait()
            continue
        if backend.base_url is None:
            await backend.wait_ready(READY_WAIT_S)
            continue
        try:
            await look()
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            log.debug("%s: ComfyUI did not answer: %r", name, exc)
        except Exception:
            log.exception("%s: a look at ComfyUI failed", name)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval_s()):
                await soon.wait()
        soon.clear()
