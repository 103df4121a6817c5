"""Running a ``comfyserve`` role: the part every role shares.

A :class:`Role` is what a package registers (``comfyserve.roles`` entry
points); :func:`run_role` runs it the one way: a refusal (ConfigError, raised
while checking the flags or while starting, e.g. a busy port) is
``comfyserve ROLE: message`` on stderr and exit 2; Ctrl-C is a clean exit 0.

A server role serves until it is told to stop. SIGTERM and SIGINT end the
wait. Then the role *drains*: while its sites still listen, it refuses new
work (503 with ``Retry-After``) and its drain hooks finish — or, past
``--shutdown-timeout``, hand back — what it is running. Only then is the
runner cleaned up, which closes the sites and connections and runs the app's
cleanup hooks (e.g. stopping spawned instances). Exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .errors import ConfigError
from .options import add_option
from .private import read_secret_files

log = logging.getLogger("comfyserve")

DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
# What a hook may take past the timeout to hand its work back (interrupt, requeue, release).
HAND_BACK_GRACE_S = 10.0
RETRY_AFTER_S = 5  # told to clients refused while draining: a sibling or the restarted role takes it

DrainHook = Callable[[float], Awaitable[None]]


class Drain:
    """A role's drain: ``active`` from SIGTERM on; ``hooks`` finish or hand back the running work.

    Each hook gets the seconds it may wait for its work to finish; past them it
    hands the work back and returns (serving gives it ``HAND_BACK_GRACE_S`` more
    before cancelling it).
    """

    def __init__(self) -> None:
        self.active = False
        self.hooks: list[DrainHook] = []

    async def run(self, timeout_s: float) -> None:
        """Refuse new work from now on; run every hook at once within the limit."""
        self.active = True
        if not self.hooks:
            return
        log.info("draining: up to %.0fs for the running work", timeout_s)
        try:
            async with asyncio.timeout(timeout_s + HAND_BACK_GRACE_S):
                results = await asyncio.gather(*(hook(timeout_s) for hook in self.hooks), return_exceptions=True)
        except TimeoutError:
            log.error("draining took longer than %.0fs; stopping anyway", timeout_s + HAND_BACK_GRACE_S)
            return
        for result in results:
            if isinstance(result, BaseException):
                log.error("a drain hook failed: %r", result)


DRAIN: web.AppKey[Drain] = web.AppKey("comfyserve_drain", Drain)


def drain_of(app: web.Application) -> Drain:
    """The app's drain; created on first use (which must be before the app starts)."""
    drain = app.get(DRAIN)
    if drain is None:
        drain = app[DRAIN] = Drain()
    return drain


def is_draining(app: web.Application) -> bool:
    drain = app.get(DRAIN)
    return drain is not None and drain.active


def draining_headers() -> dict[str, str]:
    return {"Retry-After": str(RETRY_AFTER_S)}


def add_shutdown_timeout_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--shutdown-timeout`` (``COMFYSERVE_SHUTDOWN_TIMEOUT``), the same on every server role."""
    add_option(parser, "--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S, metavar="SECONDS",
               help="after SIGTERM: seconds the running work may take to finish before it is interrupted "
                    "and handed back; new work is refused meanwhile (503)")


def check_shutdown_timeout(value: float) -> float:
    """``value`` if it can be a ``--shutdown-timeout``; raises ConfigError when negative."""
    if not value >= 0:
        raise ConfigError("--shutdown-timeout must be >= 0 (seconds)")
    return value


def shutdown_timeout_of(args: argparse.Namespace) -> float:
    """The checked ``--shutdown-timeout`` of a role without a listen address (``comfyserve worker``)."""
    return check_shutdown_timeout(float(args.shutdown_timeout))


@dataclass(frozen=True)
class Role:
    """One ``comfyserve ROLE``, declared by its package in the ``comfyserve.roles`` entry-point group.

    ``start`` checks the parsed arguments (raising ConfigError) and returns
    what runs the role: a coroutine for :func:`run_role` to run, or, for a
    role with nothing to wait on, its exit code. ``passthrough`` names the flag
    (one shell-quoted string) that carries another program's arguments: it
    also takes a value that starts with ``-`` and everything after a bare ``--``
    (see :func:`standard.cli.with_passthrough`).
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    start: Callable[[argparse.Namespace], Coroutine[Any, Any, int] | int]
    passthrough: str | None = None


def refuse(role: str, message: str) -> int:
    """Say on stderr why ``comfyserve ROLE`` cannot start; the exit code for that (2)."""
    print(f"comfyserve {role}: {message}", file=sys.stderr, flush=True)
    return 2


def run_role(role: Role, args: argparse.Namespace) -> int:
    """Run ``role`` the one way every role runs: a refusal (ConfigError) is ``comfyserve ROLE: message``
    on stderr and exit 2, Ctrl-C (before or while it serves) a clean stop with exit 0."""
    try:
        read_secret_files(args)  # --token-file & co.
        started = role.start(args)
        return started if isinstance(started, int) else asyncio.run(started)
    except ConfigError as exc:
        return refuse(role.name, str(exc))
    except KeyboardInterrupt:
        return 0


def stop_event() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (call from the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def serve_until_stopped(runner: web.AppRunner, site: web.BaseSite, *, role: str, banner: str,
                              shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S) -> int:
    """Start ``site`` (of a set-up ``runner``), print ``banner``, serve until SIGTERM/SIGINT, drain.

    Raises ConfigError when the address cannot be had; returns 0 after a clean stop.
    """
    stop = stop_event()
    try:
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(f"cannot listen on {site.name}: {exc}") from None
        print(banner, flush=True)
        await stop.wait()
        log.info("%s: shutting down", role)
        drain = runner.app.get(DRAIN) if runner.app is not None else None
        if drain is not None:
            await drain.run(shutdown_timeout_s)
    finally:
        await runner.cleanup()
    log.info("%s: stopped", role)
    return 0
