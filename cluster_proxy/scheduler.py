"""Which waiting task goes to which instance.

* one task runs per instance (the pool's ``task_id``); with ``--prefetch N``
  (default 1) up to N more wait in the instance's own queue behind it
  (``ahead``), so ComfyUI starts the next the moment the current one ends,
  with no round trip through the proxy in between. Idle instances are always
  served first, with those about to be free: a task is queued ahead on other
  busy instances only when no instance is idle. An instance is about to be
  free when its running task began its last sampler step (a ComfyUI
  ``progress`` event of that prompt with ``value == max - 1``, seen on the
  instance's event socket by the task's run): it is chosen for as if it were
  idle already, by the load rules of an idle instance (below), with its
  running task no longer counted for its user's fair share, so a slot that
  affinity left empty is filled before the task ends rather than a round trip
  through the proxy after it. Only the running task's own report counts: one of an
  earlier task on the instance, of another prompt, or naming none, does not. A
  graph with several samplers reports a last step once per sampler, so
  the first one makes the instance "about to be free" early: harmless, it
  only fills sooner the slot its queue has anyway (chosen as if the running
  task were done: its user may be given that one task a little before their
  turn, behind their own running task). ``--prefetch 0`` turns all of this off;
* fair share: each task handed out (to an idle instance or queued ahead)
  belongs to the user with the fewest tasks running or queued ahead, ties
  going to the user served longest ago — so a user with 100 queued tasks
  cannot starve one with 1, and a user's task is queued ahead only on that
  user's turn;
* a user's tasks are handed out in their queue order (``number``, then
  submission), except as model affinity allows (below). On one instance they
  start in that order; a task queued ahead starts when its instance's current
  task ends, so on several instances a later task sent to an instance that fell
  idle can start before an earlier one still queued elsewhere;
* model affinity (``--affinity-wait S``, default 10 s; 0 turns it off): the
  users whose turn it is are those tied for the fewest tasks running ("equal
  standing"). Among their waiting tasks and the instances taking one, the
  scheduler picks the pair where the instance already holds (or, once its
  queue gets there, will hold) all the task's models, preferring the user
  served longest ago, then the user's earliest task. With no such pair a model
  must be loaded: the user whose turn it is by fair share gets the task whose
  model is scarcest (most waiting tasks per instance holding it, its earliest
  on a tie), on the instance whose own models are wanted least, so models
  spread over the pool as the waiting work needs them. Before any of that, a
  turn's task whose models no instance holds goes to a spare instance (each
  of its models held by another instance too, or wanted by no waiting task;
  of those, the one whose models are wanted least per holder): else such a
  model waited for the bound while its tasks piled up, and the bound then
  moved several instances onto it at once. A busy instance is queued ahead
  only a task it holds the models for: a load on it waits for its running
  task's last step (it is about to be free, above) or for it to fall idle,
  and is decided then, on all the work waiting then; so does the slot of each
  spare instance that would take a model no instance holds (one per such set
  of models). Deciding earlier, on the tasks of a burst that had arrived in
  its first milliseconds, made loads vary from 6 to 12 between identical runs
  of the issue 16 bench: an instance left a checkpoint whose tasks had not
  arrived yet, and another loaded it back. Without a last-step report (a
  graph with no sampler progress) such a load waits for a round trip through
  the proxy, small beside the load itself.
  The bound: the task that would have gone without affinity (the first
  waiting task of the user whose turn it was, or of the user served instead)
  starts a clock when another is chosen in its stead; once it has waited S
  seconds that way it goes at its user's next turn, affinity or not. So
  affinity never moves a task ahead of a user whose turn it is, and reorders
  a user's own tasks by at most S seconds. A task whose models are unknown
  (``Task.models`` empty: the graph names no model file) fits any instance: it
  goes in its user's order, as without affinity. At the end of a model's
  work, an instance loads it only if that pays off: its holders would take
  longer over the waiting tasks (observed run time per task) than a load
  takes (observed extra time of runs that needed one); else it waits. Until
  both kinds of runs were seen, a load counts as four runs
  (``standard.load_costs.Costs``): the first tasks of a burst, which may all
  want one model, do not move every instance onto it before the other models'
  tasks arrive (instances holding nothing yet, a pool just started, take them
  as without affinity).
  Why 10 s by default: the bound itself forces loads (a task that waited S takes an instance holding other models),
  so it must be worth several loads; on the simulated GPU (issue 16: loads of
  2 s, 0.5 s tasks, 4 instances, 3 checkpoints) S = 3 s made 15 loads, 5 s 10,
  10 s 8 (before loads waited for the last step), and real checkpoints load slower still.

:func:`dispatch_order` is also how each task's wait position is computed:
the order the scheduler would start the pending tasks in if no new work came
(affinity left out).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any

from standard.load_costs import Costs
from standard.tasks import cancel_and_wait

from .pool import Instance, Pool
from .store import StateStore, Task

log = logging.getLogger("comfyserve.cluster.scheduler")
LEASE_TTL_S = 15.0  # renewed while the task runs (core.py)
BUSY_ELSEWHERE_S = 0.5
SHARED_POLL_S = 0.5
LOCAL_POLL_S = 5.0
MAX_FOLLOWED = 10000  # tasks whose run time is awaited (Costs)


async def lease_following(store: StateStore, instance: Instance, task_id: str | None) -> None:
    """``task_id``, queued on ``instance`` behind a task that left it, holds the instance now: its lease too
    (held by another proxy, it is logged; the task runs there anyway)."""
    if task_id is not None and not await store.lease_instance(instance.url, task_id, LEASE_TTL_S):
        log.warning("instance %s is leased by another proxy; its queued task %s runs anyway", instance.url, task_id)


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
    """An idle instance before one about to be free (the task would wait for the one running there), then
    most of the task's models already loaded, then idle longest."""
    wanted = set(task.models)
    return max(free, key=lambda i: (i.task_id is None, len(wanted & i.models), -i.last_used_s))


def _holds(instance: Instance, task: Task) -> bool:
    """The instance holds the task's models; a task whose models are unknown fits any instance."""
    return set(task.models) <= instance.models


def choose(pending: list[Task], running_per_user: dict[str, int], last_served: dict[str, int],
           slots: list[Instance], *, affinity: bool, overdue: Callable[[Task], bool],
           pool: list[Instance], costs: Costs | None = None,
           about_free: bool = False) -> tuple[Task, Instance, str] | None:
    """The next (task, instance) of the module docstring's rules, and the user whose turn it was by fair
    share alone; ``pending`` and ``slots`` not empty. None: nothing to queue ahead on these (busy) instances.
    ``about_free``: the slots are idle or about to be free (``Instance.finishing``), those chosen for as if
    they were idle (``running_per_user`` no longer counts their running tasks); else they are busy and are
    queued ahead only tasks whose models they hold."""
    queues: dict[str, list[Task]] = {}
    for task in pending:
        queues.setdefault(task.user, []).append(task)

    def standing(user: str) -> tuple[int, int, int]:
        return running_per_user.get(user, 0), last_served.get(user, -1), queues[user][0].seq

    users = sorted(queues, key=standing)
    first = users[0]
    if not affinity:
        return queues[first][0], pick_instance(slots, queues[first][0]), first
    turn = [u for u in users if running_per_user.get(u, 0) == running_per_user.get(first, 0)]
    for user in turn:  # a first task passed over too long goes now
        if overdue(queues[user][0]):
            return queues[user][0], pick_instance(slots, queues[user][0]), first
    holders = Counter(model for i in pool for model in i.models)
    demand = Counter(model for task in pending for model in task.models)

    def surplus(instance: Instance) -> tuple[float, bool, float]:
        """Spare instances (each model held elsewhere too, or wanted by no waiting task) by how little their
        models are wanted per holder, idle first, then idle longest."""
        return (max((demand[m] / holders[m] for m in instance.models), default=0.0), instance.task_id is not None,
                instance.last_used_s)

    spare = sorted((i for i in slots if all(holders[m] > 1 or not demand[m] for m in i.models)), key=surplus)
    if not about_free:
        # Busy: queued ahead only a task it holds the models for; a load waits for its last step (or for it
        # to fall idle), decided then on all the work waiting. So do the spare ones that would load the models
        # of waiting tasks no instance holds (one per such set of models).
        unheld = {frozenset(t.models) for t in pending if t.models and not any(holders[m] for m in t.models)}
        slots = [i for i in slots if i not in spare[:len(unheld)]]
        for user in turn:
            for task in queues[user]:
                matching = [i for i in slots if _holds(i, task)]
                if matching:
                    return task, min(matching, key=lambda i: i.last_used_s), first
        return None
    for user in turn:  # models no instance holds go first, to a spare instance: the one whose models are wanted least
        needless = [t for t in queues[user] if t.models and not any(holders[m] for m in t.models)]
        if needless and spare:
            return needless[0], spare[0], first
    for user in turn:
        for task in queues[user]:
            matching = [i for i in slots if _holds(i, task)]
            if matching:  # idle now before about to be free, then idle longest
                return task, max(matching, key=lambda i: (i.task_id is None, -i.last_used_s)), first
    # No instance taking a task holds what the turn's tasks need: a load. Load the model whose waiting
    # tasks have the fewest instances per task, on the instance whose models are wanted least.

    def need(models: Any) -> float:
        return min((demand[m] / (holders[m] + 1) for m in models), default=0.0)

    mine = queues[first]
    instance = min(slots, key=lambda i: (need(i.models), i.task_id is not None, i.last_used_s))
    task = min(mine, key=lambda t: (-need(t.models), mine.index(t)))
    if costs is not None and task.models and all(holders[m] for m in task.models):
        # At the end of a model's work its holders may finish it sooner than another instance could load it.
        if not costs.worth_loading(min(demand[m] / holders[m] for m in task.models), holding=bool(instance.models)):
            return None
    return task, instance, first


class Scheduler:
    """One loop that dispatches whenever a task or an instance may have become available."""

    def __init__(self, store: StateStore, pool: Pool,
                 start_task: Callable[[Task, Instance], None],
                 on_dispatch: Callable[[], Awaitable[None]], *, prefetch: int = 1,
                 affinity_wait_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.pool = pool
        self.prefetch = prefetch
        self.affinity_wait_s = affinity_wait_s
        self._clock = clock  # of the affinity bound
        self._passed_over: dict[str, float] = {}  # task id -> when affinity first passed it over
        self.costs = Costs()
        self._loading: dict[str, bool] = {}  # task id -> whether it was handed to an instance without its models
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

    def ran(self, task_id: str, seconds: float) -> None:
        """A task dispatched here ran for ``seconds`` on its instance (from its start to its end-of-prompt)."""
        loading = self._loading.pop(task_id, None)
        if loading is not None:
            self.costs.observe(seconds, loading)

    def slots(self) -> list[tuple[list[Instance], bool]]:
        """The instances a task may go to now, in turn, each group with whether it is chosen for as if idle:
        the idle ones and those about to be free (``Instance.finishing``) first; only when none is idle,
        all that take a task queued ahead."""
        free = self.pool.free()
        ahead = [i for i in self.pool.instances.values() if i.takes_ahead(self.prefetch)]
        tiers = []
        if free or any(i.finishing for i in ahead):
            tiers.append((free + [i for i in ahead if i.finishing], True))
        if not free and ahead:
            tiers.append((ahead, False))
        return tiers

    def last_step(self, instance: Instance, task_id: str) -> None:
        """``task_id``, run on ``instance`` by this proxy, reported its last sampler step: if it is the task
        running there, the instance is about to be free and may be given its next task now (not with
        ``--prefetch 0``: nothing is queued ahead then)."""
        if self.prefetch <= 0:
            return
        instance.last_step_of = task_id
        if instance.finishing and instance.takes_ahead(self.prefetch):
            self.wake()

    def _overdue(self, task: Task) -> bool:
        since = self._passed_over.get(task.id)
        return since is not None and self._clock() - since >= self.affinity_wait_s

    def _note_passed_over(self, chosen: Task, turn_user: str, pending: list[Task]) -> None:
        """The task that would have gone without affinity (the first of the user whose turn it was by fair
        share, and the first of ``chosen``'s user) starts its clock if ``chosen`` went in its stead."""
        heads: dict[str, Task] = {}
        for task in pending:
            heads.setdefault(task.user, task)
        waiting = {task.id for task in pending}
        self._passed_over = {k: v for k, v in self._passed_over.items() if k in waiting}
        now = self._clock()
        for user in {turn_user, chosen.user}:
            if heads[user].id != chosen.id:
                self._passed_over.setdefault(heads[user].id, now)

    async def dispatch(self) -> int:
        """Hand out as many tasks as there are instances to take them; returns how many."""
        started = 0
        while True:
            tiers = self.slots()
            if not tiers:
                break
            pending = await self.store.pending()
            if not pending:
                break
            running_tasks = await self.store.running()
            affinity = self.affinity_wait_s > 0
            chosen = None
            for slots, about_free in tiers:
                ending = {i.task_id for i in slots if i.finishing} if about_free else set()
                running = dict(Counter(t.user for t in running_tasks if t.id not in ending))
                chosen = choose(pending, running, self.last_served, slots, affinity=affinity,
                                overdue=self._overdue, pool=list(self.pool.instances.values()), costs=self.costs,
                                about_free=about_free)
                if chosen is not None:
                    break
            if chosen is None:
                break
            task, instance, turn_user = chosen
            ahead = instance.task_id is not None
            if not ahead and not await self.store.lease_instance(instance.url, task.id, LEASE_TTL_S):
                instance.busy_elsewhere_until_s = time.monotonic() + BUSY_ELSEWHERE_S  # another proxy's
                continue
            claimed = await self.store.claim(task.id, instance.url, self.proxy_id, ahead=ahead)
            if claimed is None:
                if not ahead:
                    await self.store.release_instance(instance.url, task.id)
                continue  # deleted meanwhile, or taken by another proxy
            if affinity:
                self._note_passed_over(task, turn_user, pending)
            self._passed_over.pop(task.id, None)
            if claimed.models:
                self._loading[claimed.id] = not _holds(instance, claimed)
                if len(self._loading) > MAX_FOLLOWED:  # tasks lost or taken back never report: drop the oldest
                    del self._loading[next(iter(self._loading))]
            if ahead and instance.task_id is None:
                # The task it was queued behind ended while the claim was awaited: it runs now, so it holds the
                # instance (and its lease). Put behind nothing, it left the instance looking idle: the next task
                # went to it as running while it waited behind this one (its start time and lease wrong).
                ahead = False
                self.pool.reserve(instance, claimed.id, claimed.models)
                await lease_following(self.store, instance, claimed.id)
            else:
                self.pool.reserve(instance, claimed.id, claimed.models, ahead=ahead)
            self._tick += 1
            self.last_served[claimed.user] = self._tick
            self._start_task(claimed, instance)
            started += 1
        return started
