"""Running a server role until it is told to stop: the part every ``comfyserve`` role shares.

SIGTERM and SIGINT end the wait; the runner is then cleaned up, which lets
aiohttp close connections gracefully and run the app's cleanup hooks.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from .errors import ConfigError

log = logging.getLogger("comfyserve")


def refuse(role: str, message: str) -> int:
    """Say on stderr why ``comfyserve ROLE`` cannot start; the exit code for that (2)."""
    print(f"comfyserve {role}: {message}", file=sys.stderr, flush=True)
    return 2


def run_role(role: str, main: Coroutine[Any, Any, int]) -> int:
    """``asyncio.run(main)``: Ctrl-C is a clean stop (0); a configuration error found while starting is 2."""
    try:
        return asyncio.run(main)
    except ConfigError as exc:
        return refuse(role, str(exc))
    except KeyboardInterrupt:
        return 0


def stop_event() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (call from the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def serve_until_stopped(runner: web.AppRunner, site: web.BaseSite, *, role: str, banner: str) -> int:
    """Start ``site`` (of a set-up ``runner``), print ``banner`` and serve until SIGTERM/SIGINT.

    Returns 2, after saying why on stderr, when the address cannot be had; 0 after a clean stop.
    """
    stop = stop_event()
    try:
        try:
            await site.start()
        except OSError as exc:
            return refuse(role, f"cannot listen on {site.name}: {exc}")
        print(banner, flush=True)
        await stop.wait()
        log.info("%s: shutting down", role)
    finally:
        await runner.cleanup()
    return 0
