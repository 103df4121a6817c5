"""The cluster's moving parts together: store, pool, scheduler, runs, user sockets.

``ClusterCore`` is also the pages module's ``DashboardProvider`` (what the
dashboard shows, adding an instance from the admin page).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from typing import Any

from standard.client import ClientTimeouts, InstanceClient
from standard.datadir import DataDir, WorkDirs
from standard.errors import InstanceError
from standard.tasks import cancel_and_wait

from .accounts import User
from .dashboard import HISTORY_ROWS, Changes, history_row, node_label, queue_row
from .hub import UserHub
from .outputs import OutputCollector
from .pool import Instance, Pool, instance_url, shown
from .retire import retire_user
from .rolling import RollingRestart
from .runner import InstanceLost, TaskRun, error_history
from .scheduler import LEASE_TTL_S, SHARED_POLL_S, Scheduler, dispatch_order, lease_following
from .store import DONE, PENDING, RUNNING, StateStore, Task
from .usage import UsageMeter
from .validation import LocalValidator

log = logging.getLogger("comfyserve.cluster")
MAX_ATTEMPTS = 2  # a task whose instance dies is retried once elsewhere
HEARTBEAT_TTL_S = 6.0  # a proxy silent this long is gone; others follow its running tasks
HANDED_BACK = "handed back"  # note of a task requeued by a drain: not a lost attempt
ADD_CHECK_TIMEOUTS = ClientTimeouts(connect_s=3.0, request_s=10.0, get_retries=0)  # an admin waits on it
REMOVAL_WAIT_S = 10.0  # how long removing a user waits for their interrupted tasks to stop
# How long a delete waits for the proxy following a task queued ahead to withdraw it: one that died is
# noticed within a heartbeat, and its task handed back to the store's queue (where the delete takes it).
WITHDRAW_WAIT_S = 2 * HEARTBEAT_TTL_S
WITHDRAW_POLL_S = 0.05  # how often that delete looks at the task meanwhile


class ClusterCore:
    def __init__(self, data_dir: DataDir, store: StateStore, pool: Pool, *,
                 instance_token: str | None = None, local_validation: bool = True,
                 storage: Any = None, prefetch: int = 1, affinity_wait_s: float = 10.0) -> None:
        self.data_dir = data_dir
        self.storage = storage  # ObjectStorage of an oss:// data dir: users' outputs go to the bucket
        self.validator = LocalValidator(data_dir) if local_validation else None
        self.instance_token = instance_token  # for instances added at run time
        self.store = store
        self.pool = pool
        self.hub = UserHub()
        self.changes = Changes()  # wakes the dashboards' live streams
        self.usage = UsageMeter(store)
        self.restart = RollingRestart(self)
        self.scheduler = Scheduler(store, pool, self._start_task, self.broadcast_queues, prefetch=prefetch,
                                   affinity_wait_s=affinity_wait_s)
        self.runs: dict[str, TaskRun] = {}
        self._run_jobs: dict[str, asyncio.Task[Any]] = {}  # task id -> the job running or following it
        self.draining = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._workdirs: dict[str, WorkDirs] = {}
        self._last_sent: dict[str, list[dict[str, Any]]] = {}
        self.proxy_id = uuid.uuid4().hex  # who follows a running task (see _adopt_orphans)
        self.fixed_urls: set[str] = set()  # --instances and --instance-url: not the store's list to take away
        self.scheduler.proxy_id = self.proxy_id

    # -- lifecycle --------------------------------------------------------------------

    async def start(self, redis_url: str | None = None) -> None:
        if redis_url:
            await self.hub.start_bus(redis_url)
        await self.store.heartbeat(self.proxy_id, HEARTBEAT_TTL_S)
        await self.pool.start()
        await self._adopt_orphans()
        self.scheduler.start()
        self._spawn(self._renew_leases())
        if self.store.shared:
            self._spawn(self._watch_proxies())
            self._spawn(self._follow_withdrawals())

    async def aclose(self) -> None:
        if self.restart.job is not None:
            self.restart.job.cancel()
        await self.scheduler.aclose()
        with contextlib.suppress(Exception):
            await cancel_and_wait(*self._tasks)
        await self.pool.aclose()
        await self.hub.aclose()

    async def drain(self, timeout_s: float) -> None:
        """SIGTERM: dispatch nothing more; the running tasks get ``timeout_s`` to finish; the rest go back.

        Queued tasks stay in the store for the next start or a sibling proxy. A task whose run the
        limit cuts is interrupted on its instance and queued again (``HANDED_BACK``, not counted as a
        lost attempt), so it runs once more, from the start, wherever it is dispatched next.
        """
        self.draining = True
        await self.scheduler.aclose()
        await self.withdraw_ahead(None, "the proxy shut down before it started")
        jobs = [job for job in self._run_jobs.values() if not job.done()]
        if jobs:
            log.info("draining: %d running task(s), up to %.0fs", len(jobs), timeout_s)
            await asyncio.wait(jobs, timeout=timeout_s)
        cut = [run for task_id, run in list(self.runs.items())
               if not run.released and task_id in self._run_jobs and not self._run_jobs[task_id].done()]
        await asyncio.gather(*(self._hand_back(run, "the proxy shut down before it finished") for run in cut),
                             return_exceptions=True)
        rest = [job for job in self._run_jobs.values() if not job.done()]
        if rest:  # done on the instance: only the proxy's bookkeeping is left
            await asyncio.wait(rest)

    async def _hand_back(self, run: TaskRun, reason: str) -> bool:
        """Stop a running task on its instance and queue it again; False if it got away there (finished,
        or runs on past the interrupt): then it is followed to its end like any running task, and runs once.

        A submit still on its way is waited for (``TaskRun.submit_answered``): an interrupt that overtook
        it would find nothing, and the task would run there unseen while it also runs elsewhere.
        """
        task = run.task
        job = self._run_jobs.get(task.id)
        if job is not None:
            with contextlib.suppress(Exception):
                await cancel_and_wait(job)
        if await run.submit_answered() and not await run.stop():
            log.info("task %s of %s got away on %s: followed to its end", task.prompt_id, task.user,
                     run.instance.url)
            self._track(task.id, self._spawn(self._recover_one(task, run.instance)))
            return False
        await run.cleanup()
        await self._instance_free(run)
        if await self.store.requeue(task.id, f"{HANDED_BACK}: {reason}") is None:
            return True  # it finished (or was deleted) meanwhile
        log.warning("task %s of %s handed back: %s", task.prompt_id, task.user, reason)
        await self.hub.send_json(task.user, "cluster_task_retry", {
            "prompt_id": task.prompt_id, "attempt": task.attempts + 1,
            "reason": f"{reason}; it runs again"}, task.client_id)
        self.scheduler.wake()
        await self.broadcast_queues()
        return True

    async def _withdraw(self, run: TaskRun) -> bool:
        """Take a task queued ahead back from its instance's queue before it starts; False if it started.

        One that got away (started as the request went out) is followed to its end like any running task.
        A submit still on its way is waited for (``TaskRun.submit_answered``), never overtaken by the delete.
        """
        task = run.task
        if run.started or run.released:
            return False
        job = self._run_jobs.get(task.id)
        if job is not None:
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await job
        # A submit on its way is not recalled by the cancel: its answer first, then the delete (or none needed).
        if await run.submit_answered() and not await run.withdraw():
            await self.store.mark_started(task.id)
            task.queued_ahead = False
            self._track(task.id, self._spawn(self._recover_one(task, run.instance)))
            return False
        run.released = True
        if run.instance.task_id == task.id:  # the task ahead of it ended meanwhile: it holds the instance now
            await self.store.release_instance(run.instance.url, task.id)
        await lease_following(self.store, run.instance, self.pool.withdraw(run.instance, task.id))
        await run.cleanup()
        return True

    async def withdraw_ahead(self, instance: Instance | None, reason: str) -> None:
        """Hand the tasks queued ahead on ``instance`` (on every instance: None) back to the store."""
        runs = [run for run in list(self.runs.values())
                if not run.started and (instance is None or run.instance is instance)]
        for run in runs:
            if await self._withdraw(run):
                await self.store.requeue(run.task.id, f"{HANDED_BACK}: {reason}")
                log.info("task %s of %s taken back from %s: %s", run.task.prompt_id, run.task.user,
                         run.instance.url, reason)
        if runs:
            self.scheduler.wake()
            await self.broadcast_queues()

    async def _watch_proxies(self) -> None:
        """Say we are alive; take over the running tasks of proxies that are not."""
        while True:
            await asyncio.sleep(HEARTBEAT_TTL_S / 4)
            try:
                await self.store.heartbeat(self.proxy_id, HEARTBEAT_TTL_S)
                await self._adopt_orphans()
                await self._follow_instance_list()
            except Exception:  # a store hiccup: try again next round
                log.exception("proxy heartbeat failed")

    async def _follow_instance_list(self) -> None:
        """Instances a sibling proxy added or removed (shared store): the same here, within a heartbeat.

        One removed there leaves this pool once the task this proxy runs on it ends (a drain), so
        no task is cut; without this a sibling kept dispatching to an instance an admin had removed.
        """
        listed = set(await self.store.instance_urls())
        for url in sorted(listed - set(self.pool.instances)):
            self.pool.add(url, self.instance_token)
            self.scheduler.wake()
        for url, instance in list(self.pool.instances.items()):
            if url not in listed and url not in self.fixed_urls and not instance.retiring:
                log.info("instance %s was removed by another proxy: it leaves here too", url)
                instance.retiring = True
                self._spawn(self._remove_when_idle(instance))

    async def _adopt_orphans(self) -> None:
        """Running tasks no live proxy follows (a restart, a crash): follow them to the end, or queue them again."""
        if self.draining:
            return
        alive = await self.store.alive_proxies()
        for orphan in await self.store.running():
            if orphan.proxy == self.proxy_id or orphan.proxy in alive or orphan.id in self.runs:
                continue
            task = await self.store.adopt(orphan.id, orphan.proxy, self.proxy_id)
            if task is None:
                continue  # another proxy took it
            instance = self.pool.instances.get(task.instance or "")
            if instance is not None and await self._finish_from_instance_history(task, instance):
                continue
            if instance is not None and task.queued_ahead and instance.state == "up":
                run = self._make_run(task, instance)
                if await run.withdraw():  # still in the instance's queue: back to the store's
                    await run.cleanup()
                    await self.store.requeue(task.id, f"{HANDED_BACK}: the proxy that queued it went away")
                    continue
                if await self._finish_from_instance_history(task, instance):
                    continue
                await self.store.mark_started(task.id)
                task.queued_ahead = False
            elif instance is None or instance.state != "up" or instance.task_id is not None:
                await self._requeue_or_fail(task, "the proxy that ran it went away")
                continue
            if not (await self.store.renew_instance(instance.url, task.id, LEASE_TTL_S)
                    or await self.store.lease_instance(instance.url, task.id, LEASE_TTL_S)):
                log.warning("instance %s is leased by another task; following %s anyway", instance.url, task.id)
            self.pool.reserve(instance, task.id)
            log.info("following task %s of %s on %s (left by proxy %s)", task.prompt_id, task.user, instance.url,
                     orphan.proxy)
            self._track(task.id, self._spawn(self._recover_one(task, instance)))

    async def _finish_from_instance_history(self, task: Task, instance: Instance) -> bool:
        """Finish an orphan its instance has already run, from the instance's history; False if it has not.

        A proxy frees the instance at the end-of-prompt marker and records the finish after
        fetching the history, so one that dies in between leaves a task marked running whose
        outputs may already be in the user's folder, on an instance that may be running the next
        task by now: running it again would do the work twice. Nothing here touches the instance
        but its history, so it does not matter what it runs now.
        """
        run = self._make_run(task, instance)
        try:
            entry = await instance.client.history_entry(run.key)
        except InstanceError as exc:
            log.info("cannot ask %s whether task %s finished: %s", instance.url, task.prompt_id, exc)
            return False
        if entry is None:
            return False
        run.released = True  # whatever the instance runs now is not this task's to free
        await self.store.release_instance(instance.url, task.id)  # if the dead proxy still held it
        log.info("task %s of %s had finished on %s: recorded from its history, not run again",
                 task.prompt_id, task.user, instance.url)
        history = await run.result(entry)
        await run.cleanup()
        await self._finish(task, instance, history, run)
        return True

    async def _recover_one(self, task: Task, instance: Instance) -> None:
        run = self._make_run(task, instance)
        self.runs[task.id] = run
        try:
            # A remote instance is polled: there is no local event to wait on.
            while not await run._finished():  # noqa: SLF001, ASYNC110
                await asyncio.sleep(0.25)
            history = await run.result(await run._history())  # noqa: SLF001
            await run.cleanup()
            await self._finish(task, instance, history, run)
        except InstanceLost as exc:
            await run.cleanup()
            await self._lost(task, instance, str(exc), run)
        finally:
            self.runs.pop(task.id, None)

    # -- users --------------------------------------------------------------------------

    def workdirs(self, user: str) -> WorkDirs:
        workdirs = self._workdirs.get(user)
        if workdirs is None or not workdirs.user.is_dir():  # new, or moved aside by a removal (retire.py)
            workdirs = self.data_dir.user_workdirs(user)
            workdirs.create()
            self._workdirs[user] = workdirs
        return workdirs

    async def submit(self, task: Task) -> bool:
        if not await self.store.add(task):
            return False
        self.scheduler.wake()
        await self.broadcast_queues()
        return True

    def new_task_id(self) -> str:
        return str(uuid.uuid4())

    async def remaining(self, user: str) -> int:
        return len(await self.store.user_tasks(user, PENDING)) + len(await self.store.user_tasks(user, RUNNING))

    async def status_of(self, user: str) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": await self.remaining(user)}}

    async def _snapshot(self) -> tuple[dict[str, list[Task]], dict[str, int]]:
        """Every user's running + pending tasks (in order) and the wait position of each pending one.

        Tasks queued ahead on an instance are pending to users, and first in line.
        """
        running, pending = await self.store.running(), await self.store.pending()
        ahead = sorted((t for t in running if t.queued_ahead), key=lambda t: (t.started_ms or 0, t.seq))
        order = ahead + dispatch_order(pending, dict(Counter(t.user for t in running)), self.scheduler.last_served)
        per_user: dict[str, list[Task]] = {}
        for task in [*(t for t in running if not t.queued_ahead), *ahead, *pending]:
            per_user.setdefault(task.user, []).append(task)
        return per_user, {task.id: index for index, task in enumerate(order)}

    @staticmethod
    def _queue_view(tasks: list[Task], positions: dict[str, int]) -> list[dict[str, Any]]:
        return [{"prompt_id": t.prompt_id, "position": positions.get(t.id) if t.shown_state == PENDING else None,
                 "state": t.shown_state, "notes": t.notes} for t in tasks]

    async def user_queue(self, user: str) -> list[dict[str, Any]]:
        per_user, positions = await self._snapshot()
        return self._queue_view(per_user.get(user, []), positions)

    async def broadcast_queues(self) -> None:
        """Each connected user's ``status`` and the wait positions of their tasks, when they changed.

        One snapshot of the store for everyone: with hundreds of users connected
        this must not cost a query per user (it would delay the event relay).
        """
        self.changes.bump()
        if not self.hub.sockets:
            return
        per_user, positions = await self._snapshot()
        for user in list(self.hub.sockets):
            tasks = per_user.get(user, [])
            queue = self._queue_view(tasks, positions)
            if self._last_sent.get(user) == queue:
                continue
            self._last_sent[user] = queue
            await self.hub.send_json(user, "status", {"status": {"exec_info": {"queue_remaining": len(tasks)}}},
                                     local=True)
            await self.hub.send_json(user, "cluster_queue", {"queue": queue}, local=True)

    def forget_sent(self, user: str) -> None:
        """A new socket of ``user``: the next broadcast sends their queue again."""
        self._last_sent.pop(user, None)

    async def interrupt(self, user: str, prompt_id: str | None) -> bool:
        """Interrupt the user's running task (all of them without an id); False if none matched.

        One another proxy follows (shared store) is interrupted on its instance by its attempt's id, which
        ComfyUI stops only while that prompt runs there; that proxy records the interruption as its own.
        """
        matched = False
        for task in await self.store.user_tasks(user, RUNNING):
            if prompt_id is None or task.prompt_id == prompt_id:
                run = self.runs.get(task.id)
                if (not run.started) if run is not None else task.queued_ahead:
                    matched = True  # waiting in its instance's queue: as in ComfyUI, nothing to interrupt
                    continue
                if run is not None:
                    await run.interrupt()
                    matched = True
                elif self.store.shared and (instance := self.pool.instances.get(task.instance or "")) is not None:
                    with contextlib.suppress(InstanceError):
                        await instance.client.interrupt(task.attempt_key())
                    matched = True
        return matched

    async def delete_pending(self, user: str, prompt_ids: list[str] | None) -> list[str]:
        """Delete the user's waiting tasks: from the store, and those queued ahead from their instance's queue
        (with a shared store, also those another proxy queued ahead: ``_delete_elsewhere``)."""
        deleted = await self.store.delete(user, prompt_ids, PENDING)
        for run in list(self.runs.values()):
            task = run.task
            if (task.user == user and not run.started and (prompt_ids is None or task.prompt_id in prompt_ids)
                    and await self._withdraw(run)):
                deleted += await self.store.delete(user, [task.prompt_id], RUNNING)
        if self.store.shared:
            elsewhere = [task for task in await self.store.user_tasks(user, RUNNING)
                         if task.queued_ahead and task.id not in self.runs
                         and (prompt_ids is None or task.prompt_id in prompt_ids)]
            gone = await asyncio.gather(*(self._delete_elsewhere(task) for task in elsewhere))
            deleted += [task.prompt_id for task, out in zip(elsewhere, gone, strict=True) if out]
        if deleted:
            await self.broadcast_queues()
        return deleted

    async def _delete_elsewhere(self, task: Task) -> bool:
        """Delete a task another proxy queued ahead on an instance; False if it started there first.

        Only the proxy following the task may take it out of its instance's queue (the instance would
        otherwise vanish from under that proxy's run, which then retries it), so the task is marked in the
        store (``request_withdraw``) and that proxy withdraws and drops it (``_withdraw_requested``). One
        that got away runs on, as a running task does on a delete; one handed back to the store's queue
        meanwhile (a drain, or the proxy went away and another adopted its tasks) is deleted from there.
        """
        deadline = time.monotonic() + WITHDRAW_WAIT_S
        while time.monotonic() < deadline:
            current = await self.store.get_by_id(task.id)
            if current is None:  # dropped by the proxy that withdrew it
                return True
            if current.state == PENDING:
                if await self.store.delete(task.user, [task.prompt_id], PENDING):
                    return True
            elif current.state != RUNNING or not current.queued_ahead:
                return False
            elif not current.withdraw_requested:
                await self.store.request_withdraw(task.id)
            await asyncio.sleep(WITHDRAW_POLL_S)
        log.warning("task %s of %s: its proxy did not withdraw it in %.0fs", task.prompt_id, task.user,
                    WITHDRAW_WAIT_S)
        return False

    async def _follow_withdrawals(self) -> None:
        """Shared store: withdraw the tasks queued ahead here that their user deleted through another proxy."""
        while True:
            await asyncio.sleep(SHARED_POLL_S)
            try:
                await self._withdraw_requested()
            except Exception:  # a store hiccup: look again next round
                log.exception("following deletes made through other proxies failed")

    async def _withdraw_requested(self) -> None:
        """Take each task queued ahead here whose withdrawal another proxy asked for out of its instance's
        queue, and drop it; one that started meanwhile runs on (``_withdraw``)."""
        if not any(not run.started and not run.released for run in self.runs.values()):
            return  # nothing queued ahead here: no need to read the store
        dropped = False
        for task in await self.store.running():
            run = self.runs.get(task.id)
            if task.withdraw_requested and run is not None and await self._withdraw(run):
                dropped = bool(await self.store.delete(task.user, [task.prompt_id], RUNNING)) or dropped
                log.info("task %s of %s taken out of %s's queue: deleted through another proxy", task.prompt_id,
                         task.user, run.instance.url)
        if dropped:
            await self.broadcast_queues()

    async def delete_history(self, user: str, prompt_ids: list[str] | None) -> list[str]:
        return await self.store.delete(user, prompt_ids, DONE)

    # -- runs ---------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _make_run(self, task: Task, instance: Instance) -> TaskRun:
        collector = OutputCollector(task.attempt_key(), self.data_dir, self.workdirs(task.user), self.storage)
        return TaskRun(task, instance, self.hub, collector, self.data_dir, self._instance_free, self._started,
                       lambda run: self.scheduler.last_step(run.instance, run.task.id))

    async def _started(self, run: TaskRun) -> None:
        """A task queued ahead started on its instance: users see it running from now."""
        await self.store.mark_started(run.task.id)
        await self.broadcast_queues()

    async def _instance_free(self, run: TaskRun) -> None:
        """The instance is done with the run's task: the task queued behind it holds the instance (and its
        lease) now; with none, it is free for the scheduler."""
        if not run.released:
            run.released = True
            await self.store.release_instance(run.instance.url, run.task.id)
            await lease_following(self.store, run.instance,
                                  self.pool.release(run.instance, run.task.id, run.task.models))

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(LEASE_TTL_S / 3)
            for run in list(self.runs.values()):
                if not run.released:
                    with contextlib.suppress(Exception):
                        await self.store.renew_instance(run.instance.url, run.task.id, LEASE_TTL_S)

    def _start_task(self, task: Task, instance: Instance) -> None:
        self._track(task.id, self._spawn(self._run(task, instance)))

    def _track(self, task_id: str, job: asyncio.Task[Any]) -> None:
        """Remember the job that runs (or follows) ``task_id`` until it ends, for a drain."""
        self._run_jobs[task_id] = job

        def forget(_: asyncio.Task[Any]) -> None:
            if self._run_jobs.get(task_id) is job:
                del self._run_jobs[task_id]

        job.add_done_callback(forget)

    async def _run(self, task: Task, instance: Instance) -> None:
        run = self._make_run(task, instance)
        self.runs[task.id] = run
        log.info("task %s of %s (attempt %d) -> %s", task.prompt_id, task.user, task.attempts, instance.url)
        try:
            history = await run.run()
        except InstanceLost as exc:
            await self._lost(task, instance, str(exc), run)
            return
        except Exception as exc:  # a bug or a disk error: the task fails, the proxy goes on
            log.exception("task %s failed in the proxy", task.id)
            history = error_history(task.prompt_id, f"the cluster proxy failed to run the task: {exc!r}")
            run.final_events.append(("execution_error", history["status"]["messages"][0][1]))
        finally:
            self.runs.pop(task.id, None)
        await self._finish(task, instance, history, run)

    async def _finish(self, task: Task, instance: Instance, history: dict[str, Any], run: TaskRun) -> None:
        if task.notes:  # the user sees that (and why) the task was retried
            history["cluster"] = {"attempts": task.attempts, "notes": task.notes}
        done = await self.store.finish(task.id, history)
        if done is not None:
            await self.usage.record(done)
        if run.started_s is not None and (history.get("status") or {}).get("status_str") == "success":
            self.scheduler.ran(task.id, time.monotonic() - run.started_s)  # what a run (and a load) takes
        if not any(event == "executing" for event, _ in run.final_events):
            run.final_events.append(("executing", {"node": None, "prompt_id": task.prompt_id}))
        await run.flush_final()
        await self._instance_free(run)
        self.scheduler.wake()
        await self.broadcast_queues()

    async def _lost(self, task: Task, instance: Instance, reason: str, run: TaskRun) -> None:
        if not run.released:  # else it already runs the next task, whose run will tell
            run.released = True
            await self.store.release_instance(instance.url, task.id)
            self.pool.mark_down(instance, reason)
        # Users are told which numbered instance, never its URL (the log keeps the detail).
        log.warning("instance %s lost while running task %s: %s", instance.url, task.prompt_id, reason)
        lost = f"{self.pool.display_name(instance)} was lost"
        # One still waiting in the lost instance's queue never ran: not a lost attempt.
        await self._requeue_or_fail(task, lost if run.started else f"{HANDED_BACK}: {lost} before it started")

    async def _requeue_or_fail(self, task: Task, reason: str) -> None:
        if task.instance:  # its lease must not keep the instance from the next task
            await self.store.release_instance(task.instance, task.id)
        handed_back = sum(1 for note in task.notes if note.startswith(HANDED_BACK))
        if task.attempts - handed_back < MAX_ATTEMPTS:
            await self.store.requeue(task.id, reason)
            log.warning("task %s of %s retried: %s", task.prompt_id, task.user, reason)
            await self.hub.send_json(task.user, "cluster_task_retry", {
                "prompt_id": task.prompt_id, "attempt": task.attempts + 1, "reason": reason}, task.client_id)
        else:
            history = error_history(task.prompt_id, f"the task was lost twice; last: {reason}", "InstanceLost")
            done = await self.store.finish(task.id, history)
            if done is not None:
                await self.usage.record(done)
            await self.hub.send_json(task.user, "execution_error", history["status"]["messages"][0][1],
                                     task.client_id)
        self.scheduler.wake()
        await self.broadcast_queues()

    # -- DashboardProvider ------------------------------------------------------------

    async def user_view(self, user: User) -> dict[str, Any]:
        """The dashboard: the user's queue (place in line, node running), history (times, outputs), the pool."""
        per_user, positions = await self._snapshot()
        queue = []
        for task in per_user.get(user.name, []):
            run = self.runs.get(task.id)
            instance = self.pool.instances.get(task.instance or "")
            name = (instance.url if user.is_admin else self.pool.display_name(instance)) if instance else ""
            queue.append(queue_row(task, positions.get(task.id), run.last_node if run else None, name))
        done = await self.store.user_tasks(user.name, DONE)
        history = [history_row(task) for task in reversed(done)][:HISTORY_ROWS]
        return {"queue": queue, "history": history, "instances": self.pool_view(user)}

    def pool_view(self, user: User) -> list[dict[str, str]]:
        """Each instance, its state and what runs there: whose task and which node for admins, "yours" or
        "busy" for users (who never see other users' names or the instances' URLs)."""
        rows = []
        for number, instance in enumerate(self.pool.instances.values(), start=1):
            running = ""
            if instance.task_id is not None:
                run = self.runs.get(instance.task_id)
                if run is None:
                    running = "busy (followed by another proxy)" if user.is_admin else "busy"
                elif user.is_admin:
                    node = node_label(run.task, run.last_node)
                    running = f"{run.task.user}: {run.task.prompt_id}" + (f" at node {node}" if node else "")
                else:
                    running = "your task" if run.task.user == user.name else "busy"
            state = "restarting" if self.restart.current == instance.url else instance.state
            rows.append({"name": instance.url if user.is_admin else f"instance {number}", "state": state,
                         "running": running, "tasks_run": str(instance.tasks_run)})
        return rows

    async def remove_user(self, name: str, account_id: str) -> None:
        """An account was removed here: stop its work, put its tasks and files away, close its sockets.

        Queued tasks go first (so none starts on the instance the interrupt frees), then the
        running ones are interrupted and, for up to ``REMOVAL_WAIT_S``, followed to their end,
        so whatever they still write lands in the folder that is moved aside.
        """
        await self.delete_pending(name, None)
        await self.interrupt(name, None)
        deadline = asyncio.get_running_loop().time() + REMOVAL_WAIT_S
        while any(run.task.user == name for run in self.runs.values()):
            if asyncio.get_running_loop().time() > deadline:
                log.warning("tasks of removed user %s still running; their results are dropped", name)
                break
            await asyncio.sleep(0.05)
        await retire_user(self.data_dir, self.store, name, account_id)
        self._workdirs.pop(name, None)
        self._last_sent.pop(name, None)
        await self.disconnect_user(name)
        self.scheduler.wake()

    async def disconnect_user(self, name: str) -> None:
        """Close the user's open sockets on this proxy (they were opened with a session now revoked)."""
        for ws in list(self.hub.sockets.get(name, {}).values()):
            with contextlib.suppress(Exception):
                await ws.close(code=4001, message=b"signed out")

    async def add_instance(self, url: str) -> None:
        """Put ``url`` in the pool (and the store) once it answers as a ready instance that takes our token.

        An address nothing answers at, or something that is not a comfyserve instance, is refused
        (``ValueError``) rather than listed as "starting" forever.
        """
        url = instance_url(url)
        if url not in self.pool.instances:
            async with InstanceClient(url, self.instance_token, timeouts=ADD_CHECK_TIMEOUTS) as client:
                if not await client.ready():
                    raise ValueError(f"{shown(url)} is not a ready instance: its /readyz did not answer 200")
                try:
                    await client.get_json("/system_stats")
                except InstanceError as exc:
                    raise ValueError(f"{shown(url)} answers but refuses the instance token ({exc})") from None
        await self.store.add_instance_url(url)
        self.pool.add(url, self.instance_token)
        await self.pool.check_all()
        self.scheduler.wake()

    async def remove_instance(self, url: str, *, drain: bool) -> bool:
        """An admin takes ``url`` out of the pool; False if it is not in it.

        ``drain``: it takes no new task and leaves once its running task ends (in the background).
        Otherwise it leaves now: a task running there is interrupted and queued again (a hand-back,
        not a lost attempt), so it runs from the start on another instance. Either way the URL is
        forgotten by the store; one given by ``--instance-url`` comes back at the next start.
        """
        instance = self.pool.instances.get(url.rstrip("/"))
        if instance is None:
            return False
        instance.retiring = True
        await self.store.remove_instance_url(instance.url)
        await self.withdraw_ahead(instance, f"{self.pool.display_name(instance)} was removed by an admin")
        run = self.runs.get(instance.task_id or "")
        if drain and self.busy(instance) or run is None and self.busy(instance):
            # A run that freed the instance still reads the task's history from it: let it finish.
            self._spawn(self._remove_when_idle(instance))
            return True
        reason = f"{self.pool.display_name(instance)} was removed by an admin"
        if run is not None and not await self._hand_back(run, reason):
            self._spawn(self._remove_when_idle(instance))  # it got away there: the instance leaves once it ends
            return True
        await self.pool.remove(instance.url)
        await self.broadcast_queues()
        return True

    def busy(self, instance: Instance) -> bool:
        """A task holds ``instance``, or a run of ours still reads its result there (after the end-of-prompt
        marker frees the instance for the next task, the proxy fetches the history from it)."""
        return instance.task_id is not None or any(run.instance is instance for run in self.runs.values())

    async def _remove_when_idle(self, instance: Instance) -> None:
        while self.busy(instance) and instance.url in self.pool.instances:
            await self.changes.wait(1.0)  # a task's end bumps the pulse (broadcast_queues)
        await self.pool.remove(instance.url)
        await self.broadcast_queues()
