"""A rolling restart of the pool (admins, ``POST /restart`` in the cluster edition).

One instance at a time: it takes no new task (``retiring``), the tasks queued ahead on it go
back to the store (they run elsewhere), its running task ends there,
it restarts (``POST /restart`` on the instance: the embedded engine re-imports ``DIR/custom_nodes``,
a real-ComfyUI instance restarts its ComfyUI), and it rejoins once ``/readyz`` answers; then
the next. The other instances keep running the queue, and queued work only waits: nothing is
lost. The pool's cached node list is dropped after each, so the web UI sees new plugins.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from standard.errors import InstanceError

from .dashboard import Changes
from .pool import Instance, Pool
from .scheduler import Scheduler

log = logging.getLogger("comfyserve.cluster.restart")
RESTART_TIMEOUT_S = 180.0  # a real-ComfyUI instance restarts its child: slow
REJOIN_TIMEOUT_S = 180.0
CHECK_S = 1.0


class RollingHost(Protocol):
    """What a rolling restart needs of the cluster core (which owns it: typed here, not imported)."""

    pool: Pool
    scheduler: Scheduler
    changes: Changes

    async def broadcast_queues(self) -> None: ...
    async def withdraw_ahead(self, instance: Instance | None, reason: str) -> None: ...
    def busy(self, instance: Instance) -> bool: ...


class RollingRestart:
    """At most one rolling restart at a time; ``status()`` says where it is."""

    def __init__(self, core: RollingHost) -> None:
        self.core = core
        self.job: asyncio.Task[None] | None = None
        self.current: str | None = None  # the URL being restarted now
        self.done: list[str] = []
        self.failed: dict[str, str] = {}

    @property
    def running(self) -> bool:
        return self.job is not None and not self.job.done()

    def start(self) -> list[str]:
        """Begin with the instances in the pool now; ``RuntimeError`` while one is already under way."""
        if self.running:
            raise RuntimeError("a rolling restart of the pool is already under way")
        urls = list(self.core.pool.instances)
        self.done, self.failed, self.current = [], {}, None
        self.job = asyncio.create_task(self._run(urls), name="comfyserve-rolling-restart")
        return urls

    def status(self) -> dict[str, Any]:
        return {"running": self.running, "current": self.current, "done": list(self.done), "failed": dict(self.failed)}

    async def _run(self, urls: list[str]) -> None:
        for url in urls:
            instance = self.core.pool.instances.get(url)
            if instance is None:
                continue  # removed meanwhile
            self.current = url
            try:
                await self._restart_one(instance)
                self.done.append(url)
            except Exception as exc:  # this one failed: say so, go on with the others
                log.warning("rolling restart: %s failed: %s", url, exc)
                self.failed[url] = str(exc)
            finally:
                instance.retiring = False
                self.core.pool.forget_cached()
                self.core.scheduler.wake()
                await self.core.broadcast_queues()
        self.current = None
        log.info("rolling restart done: %d restarted, %d failed", len(self.done), len(self.failed))

    async def _restart_one(self, instance: Instance) -> None:
        instance.retiring = True
        await self.core.withdraw_ahead(instance, "its instance restarts")  # they run elsewhere meanwhile
        await self.core.broadcast_queues()
        while self.core.busy(instance) and instance.url in self.core.pool.instances:
            await self.core.changes.wait(CHECK_S)  # a task's end bumps the pulse
        log.info("rolling restart: restarting %s", instance.url)
        client = instance.client  # holds the instance's own token (spawned instances have theirs)
        try:
            await client.restart(RESTART_TIMEOUT_S)
        except InstanceError as exc:
            raise InstanceError(f"its /restart failed: {exc}") from None
        deadline = time.monotonic() + REJOIN_TIMEOUT_S
        while not await client.ready():
            if time.monotonic() > deadline:
                raise InstanceError(f"not ready {REJOIN_TIMEOUT_S:.0f} s after its restart")
            await self.core.changes.wait(CHECK_S)  # nothing tells us: look again
        await self.core.pool.check_all()
