"""Running one task on one instance and relaying its events to the owning user.

The instance sees the task under an internal id (``Task.attempt_key``, a UUID per attempt), its
events arriving on the instance's long-lived socket (``pool.InstanceEvents``);
every event is rewritten to the user's ``prompt_id`` and sent to the user's
socket of the task's ``client_id``. File
items in ``executed`` events are moved into the user's folders first.
If the instance goes away (its socket stays down for ``lost_after_s``, a
request cannot reach it, or it forgot the prompt) the run ends with
:class:`InstanceLost` and the core retries the task elsewhere.

A run ``ahead`` (``--prefetch``) is submitted while another task runs on the
instance: ComfyUI's own queue starts it the moment that one ends. It counts as
started at its ``execution_start`` (``on_started``); until then it can be taken
back from the instance's queue (``withdraw``). When the running task reports its
last sampler step (``standard.client_types.in_last_step``) the run says so (``on_last_step``): the
instance is about to be free, and the scheduler may queue its next task then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from standard.client import BinaryFrame, Connected, Disconnected, in_last_step
from standard.errors import ClusterError, InstanceError, InstanceUnavailable, PromptLost, PromptRejected

from .graph import remove_stage, stage_graph
from .hub import UserHub
from .outputs import OutputCollector
from .pool import Instance
from .store import Task

log = logging.getLogger("comfyserve.cluster.runner")
FINAL = frozenset({"execution_success", "execution_error", "execution_interrupted"})
NOT_RELAYED = frozenset({"status", "feature_flags", "logs"})
CHECK_INTERVAL_S = 1.0
FINAL_GRACE_S = 0.5
STOP_WAIT_S = 10.0  # how long a hand-back waits for its interrupted task to leave the instance (``stop``)
STOP_CHECK_S = 0.1


class InstanceLost(ClusterError):
    """The instance went away under the task."""


def error_history(prompt_id: str, message: str, exception_type: str = "ClusterError",
                  **extra: Any) -> dict[str, Any]:
    """A history entry for a task that failed outside any node."""
    data = {"prompt_id": prompt_id, "node_id": None, "node_type": None, "executed": [],
            "exception_message": message, "exception_type": exception_type, "traceback": [],
            "current_inputs": {}, "current_outputs": {}, "timestamp": int(time.time() * 1000), **extra}
    return {"outputs": {}, "meta": {},
            "status": {"status_str": "error", "completed": False, "messages": [["execution_error", data]]}}


def _submitted(turn: asyncio.Future[None]) -> None:
    """The run's prompt reached its instance, or never will: the next run there may submit its own."""
    if not turn.done():
        turn.set_result(None)


def _running(queue: dict[str, Any], key: str) -> bool:
    """``key`` is on the instance's running list (/queue): executing, or taken off its queue to start."""
    return key in {item[1] for item in queue.get("queue_running", []) if isinstance(item, list) and len(item) > 1}


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a submit's failure seen: its run handles it, or a take-back, or nobody (the proxy stopped)."""
    if not future.cancelled():
        future.exception()


class TaskRun:
    """One attempt of one task on one instance."""

    def __init__(self, task: Task, instance: Instance, hub: UserHub, collector: OutputCollector,
                 data_dir: Any, on_instance_free: Callable[[TaskRun], Awaitable[None]] | None = None,
                 on_started: Callable[[TaskRun], Awaitable[None]] | None = None,
                 on_last_step: Callable[[TaskRun], None] | None = None) -> None:
        self.task = task
        self.instance = instance
        self.hub = hub
        self.collector = collector
        self.data_dir = data_dir
        self.key = task.attempt_key()
        # The instance's long-lived event socket (pool.InstanceEvents) is the task's client on the instance.
        self.client_id = instance.events.client_id if instance.events is not None else f"cluster-{self.key}"
        self.last_node: str | None = None
        # The end-of-prompt events wait until the history is stored (see ``flush_final``).
        self.final_events: list[tuple[str, Any]] = []
        # Called once the instance is done with the task (before the proxy's bookkeeping),
        # so the scheduler can hand it the next one meanwhile.
        self.on_instance_free = on_instance_free
        self.released = False
        self.on_started = on_started
        # Called when the task reports its last sampler step (see ``in_last_step``): the instance is about
        # to be free, so the scheduler may queue its next task now rather than at the end-of-prompt.
        self.on_last_step = on_last_step
        self.started = not task.queued_ahead  # a task queued ahead starts at its execution_start
        self.started_s = time.monotonic() if self.started else None  # when it started on the instance
        self.submit: asyncio.Future[str] | None = None  # the submit request, from the moment it goes out

    # -- helpers ------------------------------------------------------------------

    def _translate(self, data: Any) -> Any:
        """The instance's ids of the task -> the user's (``progress_state`` repeats it for each node)."""
        if isinstance(data, dict) and data.get("prompt_id") == self.key:
            data = {**data, "prompt_id": self.task.prompt_id}
            nodes = data.get("nodes")
            if isinstance(nodes, dict):
                data["nodes"] = {node: self._translate(state) for node, state in nodes.items()}
        return data

    async def send(self, event: str, data: Any) -> None:
        await self.hub.send_json(self.task.user, event, data, self.task.client_id)

    async def flush_final(self) -> None:
        for event, data in self.final_events:
            await self.send(event, data)
        self.final_events.clear()

    async def interrupt(self) -> None:
        with contextlib.suppress(InstanceError):
            await self.instance.client.interrupt(self.key)

    async def withdraw(self) -> bool:
        """Take the task out of the instance's queue; False if it started (or ran) there all the same.

        ComfyUI deletes only a prompt still waiting; asking afterwards tells whether it got
        away first. An instance that cannot be reached counts as withdrawn: its queue is lost
        with it (a socket that gave up fails the runs there anyway).
        """
        client = self.instance.client
        try:
            await client.delete_queued([self.key])
            if _running(await client.queue(), self.key):
                return False
            return await client.history_entry(self.key) is None
        except InstanceError as exc:
            log.info("cannot take task %s back from %s: %s", self.task.prompt_id, self.instance.url, exc)
            return True

    async def stop(self) -> bool:
        """Take a running task off its instance (delete it from the queue, interrupt it); False if it got
        away: it finished there, or still runs ``STOP_WAIT_S`` later.

        An interrupt reaches only the prompt executing: one the instance has taken off its queue but not
        yet begun ignores it (ComfyUI, and our engine, clear a pending interrupt as a prompt starts), so it
        is sent again until the prompt leaves the instance's running list. An instance that cannot be reached
        counts as stopped (its socket's give-up fails the runs there anyway).
        """
        client = self.instance.client
        deadline = time.monotonic() + STOP_WAIT_S
        try:
            await client.delete_queued([self.key])
            while True:
                await client.interrupt(self.key)
                if not _running(await client.queue(), self.key):
                    break
                if time.monotonic() > deadline:
                    return False
                await asyncio.sleep(STOP_CHECK_S)
            entry = await client.history_entry(self.key)
        except InstanceError as exc:
            log.info("cannot stop task %s on %s: %s", self.task.prompt_id, self.instance.url, exc)
            return True
        return entry is None or (entry.get("status") or {}).get("status_str") != "success"

    async def submit_answered(self) -> bool:
        """Wait for the run's submit request, if one went out, to be answered; False if the instance holds
        no such task for sure (none went out, or the instance refused it), True if it may.

        A take-back asks this before deleting the task from the instance's queue: a delete that overtook
        the submit would find nothing to delete, and the task would run there unseen.
        """
        if self.submit is None:
            return False
        if not self.submit.done():
            log.info("task %s: its submit to %s is on its way; taken back once answered", self.task.prompt_id,
                     self.instance.url)
            await asyncio.wait([self.submit])  # a cancel of the caller leaves the request alone
        return self.submit.cancelled() or not isinstance(self.submit.exception(), PromptRejected)

    # -- the run --------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """The task's history entry (outputs in the user's folders); ``InstanceLost`` if the instance died."""
        previous, mine = self.instance.submit_turn()  # taken at once: runs start in the order handed out
        try:
            graph = await asyncio.to_thread(stage_graph, self.task.prompt, self.key,
                                            self.collector.workdirs, self.data_dir)
            result = await self._follow(graph, previous, mine)
        except asyncio.CancelledError:
            raise  # the proxy stops: the task goes on on the instance; the next proxy picks it up
        except BaseException:
            await self.cleanup()
            raise
        finally:
            _submitted(mine)
        await self.cleanup()
        return result

    async def cleanup(self) -> None:
        """Move what is left of the task's outputs, drop its staging folders."""
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.collector.sweep)
        await asyncio.to_thread(remove_stage, self.key, self.data_dir)

    async def _follow(self, graph: dict[str, Any], previous: asyncio.Future[None] | None,
                      mine: asyncio.Future[None]) -> dict[str, Any]:
        client, events = self.instance.client, self.instance.events
        assert events is not None
        items = events.attach(self.key)
        try:
            await self._wait_connected(events)
            extra_data = {**self.task.extra_data, **self.task.sensitive}
            if previous is not None:
                await asyncio.wait([previous])  # not a bare await: a cancel here must not cancel the other run's
            # The outputs the proxy chose (all, or the user's partial_execution_targets) are the ones run.
            # The request is its own task: a take-back that cancels this run cannot recall it once on its way
            # (the instance could get it after the delete, and run the task unseen); see ``submit_answered``.
            self.submit = asyncio.ensure_future(client.submit(
                graph, client_id=self.client_id, extra_data=extra_data, prompt_id=self.key,
                partial_execution_targets=list(self.task.outputs_to_execute)))
            self.submit.add_done_callback(_retrieved)
            try:
                await asyncio.shield(self.submit)
            except PromptRejected as exc:
                return await self._rejected(exc)
            except InstanceUnavailable as exc:
                raise InstanceLost(f"cannot submit: {exc}") from exc
            finally:
                _submitted(mine)
            await self._relay_until_done(items)
        finally:
            events.detach(self.key, items)
        return await self.result(await self._history())

    async def result(self, entry: dict[str, Any]) -> dict[str, Any]:
        """The task's history from the instance's entry: files in the user's folders, the user's prompt_id."""
        outputs = await asyncio.to_thread(self.collector.collect, entry.get("outputs") or {})
        status = dict(entry.get("status") or {})
        status["messages"] = [[m[0], self._translate(m[1])] if isinstance(m, list) and len(m) == 2 else m
                              for m in status.get("messages") or []]
        return {"outputs": outputs, "status": status, "meta": entry.get("meta") or {}}

    async def _wait_connected(self, events: Any) -> None:
        """The instance's event socket must be open before submitting, or events would be lost."""
        try:
            async with asyncio.timeout(self.instance.client.timeouts.disconnected_s or 10.0):  # not wait_for (3.11)
                await events.connected.wait()
        except TimeoutError:
            raise InstanceLost("its event socket does not connect") from None

    async def _rejected(self, exc: PromptRejected) -> dict[str, Any]:
        body = exc.body
        raw_error = body.get("error")
        error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {"message": str(exc)}
        message = str(error.get("message") or exc)
        details = str(error.get("details") or "")
        history = error_history(self.task.prompt_id, f"{message}: {details}" if details else message,
                                "PromptRejected", node_errors=body.get("node_errors") or {})
        self.final_events.append(("execution_error", history["status"]["messages"][0][1]))
        return history

    async def _relay_until_done(self, items: asyncio.Queue[Any]) -> None:
        finished = False  # the history has it: relay what is still on its way, briefly
        while True:
            try:
                # not wait_for: on 3.11 it can swallow a cancel landing with an item
                async with asyncio.timeout(FINAL_GRACE_S if finished else CHECK_INTERVAL_S):
                    item = await items.get()
            except TimeoutError:
                item = None
            if item is None or isinstance(item, Connected):
                if finished and item is None:
                    return
                finished = finished or await self._finished()
                continue
            if isinstance(item, Disconnected):
                continue
            if isinstance(item, BaseException):
                raise InstanceLost(f"event socket gave up: {item}")
            if isinstance(item, BinaryFrame):
                await self.hub.send_bytes(self.task.user, item.event_type, item.payload, self.task.client_id)
                continue
            if not isinstance(item, dict) or item.get("type") in NOT_RELAYED:
                continue
            kind, data = str(item.get("type")), item.get("data")
            if isinstance(data, dict) and data.get("prompt_id") not in (None, self.key):
                continue
            if not self.started and isinstance(data, dict) and data.get("prompt_id") == self.key:
                self.started, self.started_s = True, time.monotonic()
                if self.on_started is not None:
                    await self.on_started(self)
            if kind == "executed" and isinstance(data, dict) and "output" in data:
                data = {**data, "output": await asyncio.to_thread(self.collector.collect, data["output"])}
            if kind == "executing" and isinstance(data, dict):
                self.last_node = data.get("node")
            if kind == "progress" and self.started and self.on_last_step is not None and in_last_step(data, self.key):
                self.on_last_step(self)
            if kind in FINAL or (kind == "executing" and isinstance(data, dict) and data.get("node") is None):
                self.final_events.append((kind, self._translate(data)))
                if kind == "executing" and self.on_instance_free is not None:
                    await self.on_instance_free(self)
                    return  # ComfyUI's end-of-prompt marker, sent after the terminal event
                continue
            await self.send(kind, self._translate(data))

    async def _finished(self) -> bool:
        """True once the instance has the task in its history; ``InstanceLost`` if it forgot it."""
        client = self.instance.client
        try:
            if await client.history_entry(self.key) is not None:
                return True
            queue = await client.queue()
        except InstanceUnavailable:
            return False  # the socket's give-up decides
        ids = {item[1] for item in [*queue.get("queue_running", []), *queue.get("queue_pending", [])]
               if isinstance(item, list) and len(item) > 1}
        if self.key in ids:
            return False
        try:
            if await client.history_entry(self.key) is not None:
                return True
        except InstanceUnavailable:
            return False
        raise InstanceLost(str(PromptLost(f"{self.instance.url} no longer knows the task (restarted?)")))

    async def _history(self) -> dict[str, Any]:
        deadline = time.monotonic() + 30.0
        while True:
            try:
                entry = await self.instance.client.history_entry(self.key)
            except InstanceUnavailable as exc:
                raise InstanceLost(f"history: {exc}") from exc
            if entry is not None:
                return entry
            if time.monotonic() > deadline:
                raise InstanceLost("the instance never recorded the task's history")
            await asyncio.sleep(0.05)
