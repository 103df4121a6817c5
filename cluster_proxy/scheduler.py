"""Which waiting task goes to which free instance.

* one task per instance (the pool's ``task_id``);
* a user's tasks start in their queue order (``number``, then submission);
* fair share: the next task is the head of the queue of the user with the
  fewest tasks running, ties going to the user served longest ago — so a
  user with 100 queued tasks cannot starve one with 1;
* a free instance that already ran the task's models is preferred, then the
  one idle longest (work spreads over the pool).

:func:`dispatch_order` is also how each task's wait position is computed:
the order the scheduler would start the pending tasks in if no new work came.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable

from standard.tasks import cancel_and_wait

from .pool import Instance, Pool
from .store import StateStore, Task

log = logging.getLogger("comfyserve.cluster.scheduler")
LEASE_TTL_S = 15.0  # renewed while the task runs (core.py)
BUSY_ELSEWHERE_S = 0.5
SHARED_POLL_S = 0.5
LOCAL_POLL_S = 5.0


def dispatch_order(pending: list[Task], running_per_user: dict[str, int],
                   last_served: dict[str, int]) -> list[Task]:
    """All pending tasks in the order they would start (``pending`` sorted per user already)."""
    queues: dict[str, deque[Task]] = {}
    for task in pending:
        queues.setdefault(task.user, deque()).append(task)
    counts = dict(running_per_user)
    served = dict(last_served)
    tick = max(served.values(), default=0)
    order: list[Task] = []
    while queues:
        user = min(queues, key=lambda u: (counts.get(u, 0), served.get(u, -1), queues[u][0].seq))
        order.append(queues[user].popleft())
        counts[user] = counts.get(user, 0) + 1
        tick += 1
        served[user] = tick
        if not queues[user]:
            del queues[user]
    return order


def pick_instance(free: list[Instance], task: Task) -> Instance:
    """Most of the task's models already loaded, then idle longest."""
    wanted = set(task.models)
    return max(free, key=lambda i: (len(wanted & i.models), -i.last_used_s))


class Scheduler:
    """One loop that dispatches whenever a task or an instance may have become available."""

    def __init__(self, store: StateStore, pool: Pool,
                 start_task: Callable[[Task, Instance], None],
                 on_dispatch: Callable[[], Awaitable[None]]) -> None:
        self.store = store
        self.pool = pool
        self._start_task = start_task
        self._on_dispatch = on_dispatch
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self.last_served: dict[str, int] = {}
        self._tick = 0
        self.proxy_id = ""

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="comfyserve-cluster-scheduler")
        self.wake()

    async def aclose(self) -> None:
        if self._loop_task is not None:
            await cancel_and_wait(self._loop_task)

    async def _loop(self) -> None:
        # A shared store changes under us (other proxies): look at it now and then, too.
        poll_s = SHARED_POLL_S if getattr(self.store, "shared", False) else LOCAL_POLL_S
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel that lands as the
            # wake-up does (start() wakes at once), and aclose() then waited for ever on a loop that ran on.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                if await self.dispatch() or poll_s == SHARED_POLL_S:
                    await self._on_dispatch()
            except Exception:  # a store hiccup must not end scheduling
                log.exception("dispatch failed")
                await asyncio.sleep(0.5)
                self.wake()

    async def running_per_user(self) -> dict[str, int]:
        return dict(Counter(task.user for task in await self.store.running()))

    async def order(self) -> list[Task]:
        pending = await self.store.pending()
        return dispatch_order(pending, await self.running_per_user(), self.last_served)

    async def dispatch(self) -> int:
        """Start as many tasks as there are free instances; returns how many started."""
        started = 0
        while self.pool.free():
            order = await self.order()
            if not order:
                break
            task = order[0]
            instance = pick_instance(self.pool.free(), task)
            if not await self.store.lease_instance(instance.url, task.id, LEASE_TTL_S):
                instance.busy_elsewhere_until_s = time.monotonic() + BUSY_ELSEWHERE_S  # another proxy's
                continue
            claimed = await self.store.claim(task.id, instance.url, self.proxy_id)
            if claimed is None:
                await self.store.release_instance(instance.url, task.id)
                continue  # deleted meanwhile, or taken by another proxy
            self.pool.reserve(instance, claimed.id)
            self._tick += 1
            self.last_served[claimed.user] = self._tick
            self._start_task(claimed, instance)
            started += 1
        return started
