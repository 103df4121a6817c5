"""Runs graphs on an instance over a long-lived event socket (several may be queued there at once).

``InstanceClient.run`` opens a socket per prompt and reads ``/history`` at the
end: robust, but three extra round trips per task. A worker runs thousands
of tasks on one instance, so it keeps one ``/ws`` open (``events`` with
markers), submits with its own ``prompt_id`` and builds the result from the
events alone — ComfyUI's history ``outputs`` are exactly the outputs its
``executed`` events carried. Whenever the socket is not up (or drops
mid-task), it falls back to ``InstanceClient.run`` / polling ``/history``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from typing import Any

from standard.client import Connected, Disconnected, InstanceClient, RunResult
from standard.errors import InstanceError, InstanceUnavailable, PromptLost, WorkerError
from standard.tasks import cancel_and_wait

log = logging.getLogger("comfyserve.api.runner")

TERMINAL = {"execution_success": "success", "execution_error": "error", "execution_interrupted": "interrupted"}
HISTORY_POLL_S = 0.1
IDLE_CHECK_S = 5.0


class _SocketDropped(WorkerError):
    pass


class Dropped(WorkerError):
    """The prompt was taken off the instance's queue before it started (``InstanceRunner.drop``)."""


class _DroppedMarker:
    pass


DROPPED = _DroppedMarker()


class InstanceRunner:
    def __init__(self, client: InstanceClient) -> None:
        self.client = client
        self.client_id = f"comfyserve-worker-{uuid.uuid4().hex}"
        self.socket_up = asyncio.Event()
        self._waiters: dict[str, asyncio.Queue[dict[str, Any] | Disconnected | _DroppedMarker]] = {}
        self._pump: asyncio.Task[None] | None = None
        # Sees each event of a prompt being run (the worker's progress records, ``progress``).
        self.on_event: Callable[[dict[str, Any]], None] | None = None

    def start(self) -> None:
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._run_pump(), name="comfyserve-worker-events")

    async def ready(self, timeout_s: float) -> bool:
        """Start the socket and wait a little for it (tasks run without it too, just slower)."""
        self.start()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):  # not wait_for: on 3.11 it can swallow a cancel
                await self.socket_up.wait()
        return self.socket_up.is_set()

    async def aclose(self) -> None:
        if self._pump is not None:
            with contextlib.suppress(Exception):
                await cancel_and_wait(self._pump)

    async def _run_pump(self) -> None:
        while True:
            try:
                async for item in self.client.events(self.client_id, markers=True):
                    if isinstance(item, Connected):
                        self.socket_up.set()
                    elif isinstance(item, Disconnected):
                        self.socket_up.clear()
                        for queue in self._waiters.values():
                            queue.put_nowait(item)
                    elif isinstance(item, dict):
                        data = item.get("data")
                        if isinstance(data, dict):
                            waiter = self._waiters.get(str(data.get("prompt_id")))
                            if waiter is not None:
                                waiter.put_nowait(item)
                                if self.on_event is not None:
                                    self.on_event(item)
            except Exception as exc:  # the socket gave up; try again shortly
                self.socket_up.clear()
                log.info("event socket to %s: %r; reopening", self.client.base_url, exc)
                await asyncio.sleep(1.0)

    async def run(self, graph: dict[str, Any], timeout_s: float | None = None, prompt_id: str | None = None,
                  on_accepted: Callable[[str], None] | None = None, queued: bool = False) -> RunResult:
        """Run ``graph`` (as ``prompt_id``, so the caller can interrupt it); past ``timeout_s`` it is
        interrupted and ``InstanceError`` raised. ``on_accepted(prompt_id)``: the instance queued it.
        ``queued``: it waits behind another prompt there, so its ``timeout_s`` counts from its
        ``execution_start``. ``Dropped`` when ``drop`` took it off the queue before it started."""
        self.start()
        prompt_id = prompt_id or str(uuid.uuid4())
        try:
            if not self.socket_up.is_set():
                return await self.client.run(graph, timeout_s=timeout_s, prompt_id=prompt_id, on_accepted=on_accepted)
            try:
                async with asyncio.timeout(None if queued else timeout_s) as deadline:
                    return await self._run_on_socket(graph, prompt_id, on_accepted,
                                                     deadline if queued and timeout_s is not None else None,
                                                     timeout_s)
            except TimeoutError:
                raise InstanceError(f"the task did not finish within {timeout_s}s") from None
        except InstanceError as exc:
            if timeout_s is not None and type(exc) is InstanceError:  # timed out: free the instance
                with contextlib.suppress(InstanceError):
                    await self.client.interrupt(prompt_id)
            raise

    async def drop(self, prompt_id: str) -> bool:
        """Take ``prompt_id`` off the instance's queue if it has not started: True when it was (its ``run``
        then raises ``Dropped``), False when it runs or ran already (interrupt it instead)."""
        await self.client.delete_queued([prompt_id])
        queue = await self.client.queue()
        if any(_names(item, prompt_id) for item in [*queue.get("queue_running", []), *queue.get("queue_pending", [])]):
            return False
        if await self._history_or_none(prompt_id) is not None:
            return False
        waiter = self._waiters.get(prompt_id)
        if waiter is not None:
            waiter.put_nowait(DROPPED)
        return True

    async def _run_on_socket(self, graph: dict[str, Any], prompt_id: str,
                             on_accepted: Callable[[str], None] | None, deadline: asyncio.Timeout | None = None,
                             timeout_s: float | None = None) -> RunResult:
        waiter: asyncio.Queue[dict[str, Any] | Disconnected | _DroppedMarker] = asyncio.Queue()
        self._waiters[prompt_id] = waiter
        try:
            await self.client.submit(graph, client_id=self.client_id, prompt_id=prompt_id)
            if on_accepted is not None:
                on_accepted(prompt_id)
            events: list[dict[str, Any]] = []
            while True:
                try:
                    async with asyncio.timeout(IDLE_CHECK_S):  # not wait_for: on 3.11 it can swallow a cancel
                        item = await waiter.get()
                except TimeoutError:
                    # Quiet for a while: make sure no terminal event was lost on a half-open socket, and
                    # that the instance still knows the prompt (else ``PromptLost``: it is run again).
                    entry = await self._history_or_none(prompt_id)
                    if entry is None and not await self._known(prompt_id):
                        entry = await self._history_or_none(prompt_id)  # it may have ended in between
                        if entry is None:
                            lost = f"prompt {prompt_id} is no longer known to {self.client.base_url}"
                            log.warning("%s", lost)
                            raise PromptLost(lost) from None
                    if entry is not None:
                        return _from_history(prompt_id, entry)
                    continue
                if isinstance(item, _DroppedMarker):
                    raise Dropped(f"prompt {prompt_id} was taken off the instance's queue before it started")
                if isinstance(item, Disconnected):
                    return await self._finish_from_history(prompt_id)
                if deadline is not None and timeout_s is not None and item.get("type") == "execution_start":
                    deadline.reschedule(asyncio.get_running_loop().time() + timeout_s)  # its run starts now
                events.append(item)
                status = TERMINAL.get(str(item.get("type")))
                if status is not None:
                    break
                if item.get("type") == "executing" and item["data"].get("node") is None:
                    status = "success"
                    break
        finally:
            self._waiters.pop(prompt_id, None)
        executed = [e for e in events if e.get("type") == "executed"]
        outputs = {str(e["data"]["node"]): e["data"]["output"] for e in executed if e["data"].get("output")}
        error = events[-1]["data"] if status == "error" else None
        return RunResult(prompt_id, status, executed, outputs, {}, events, error)

    async def _history_or_none(self, prompt_id: str) -> dict[str, Any] | None:
        try:
            return await self.client.history_entry(prompt_id)
        except InstanceUnavailable:
            return None

    async def _known(self, prompt_id: str) -> bool:
        """The prompt is on the instance's queue (running or pending); True when that cannot be told."""
        try:
            queue = await self.client.queue()
        except InstanceUnavailable:
            return True
        return any(_names(i, prompt_id) for i in [*queue.get("queue_running", []), *queue.get("queue_pending", [])])

    async def _finish_from_history(self, prompt_id: str) -> RunResult:
        """The socket dropped mid-task: poll until the prompt is in the history (or is lost)."""
        while True:
            try:
                entry = await self.client.history_entry(prompt_id)
                if entry is None:
                    queue = await self.client.queue()
                    known = any(_names(i, prompt_id)
                                for i in [*queue.get("queue_running", []), *queue.get("queue_pending", [])])
                    if not known:
                        entry = await self.client.history_entry(prompt_id)
                        if entry is None:
                            raise PromptLost(f"prompt {prompt_id} is no longer known to {self.client.base_url}")
            except InstanceUnavailable:
                entry = None
            if entry is not None:
                return _from_history(prompt_id, entry)
            await asyncio.sleep(HISTORY_POLL_S)


def _names(queue_item: Any, prompt_id: str) -> bool:
    """An entry of ``/queue``'s lists is ``[number, prompt_id, ...]``."""
    return isinstance(queue_item, list) and len(queue_item) > 1 and queue_item[1] == prompt_id


def _from_history(prompt_id: str, entry: dict[str, Any]) -> RunResult:
    outputs = entry.get("outputs") or {}
    executed = [{"type": "executed", "data": {"node": node, "display_node": node, "output": output,
                                              "prompt_id": prompt_id}} for node, output in outputs.items()]
    status, error = "success", None
    for kind, data in (entry.get("status") or {}).get("messages") or []:
        if kind in ("execution_error", "execution_interrupted"):
            status, error = TERMINAL[kind], data if kind == "execution_error" else None
    if status == "success" and (entry.get("status") or {}).get("status_str") == "error":
        status = "error"
    return RunResult(prompt_id, status, executed, outputs, entry, [], error)
