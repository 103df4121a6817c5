"""PromptServer: the engine, the queue worker and the WebSocket fan-out of one instance.

The embedded engine's ``PromptExecutor.execute`` blocks, so one worker task runs
it in a (daemon) thread and the loop keeps serving HTTP and WS.
The executor reports events through :meth:`PromptServer.send_sync` from that
thread; they are handed to the loop with ``call_soon_threadsafe`` and sent in
order by one publisher task, as ComfyUI's ``publish_loop`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import io
import logging
import queue
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..datadir import DataDir, WorkDirs
from ..errors import ConfigError, EngineError
from ..settings import StandardSettings
from ..state_store import StateStore
from ..tasks import cancel_and_wait
from .metrics import ExecutionMetrics
from .prompt_queue import ExecutionStatus, PromptQueue, QueueItem, StoredEntry

log = logging.getLogger("comfyserve.server")

PREVIEW_IMAGE = 1  # binary event: >I event type, >I format, image bytes
UNENCODED_PREVIEW_IMAGE = 2  # (format, PIL image, max_size) from plugins; encoded here
INTERRUPT_GRACE_S = 2.0  # after the shutdown timeout: how long an interrupted prompt may take to stop


class EngineUnavailable(EngineError, RuntimeError):
    """The embedded engine could not be imported or loaded."""


class RestartRefused(EngineError, RuntimeError):
    """/restart while a prompt runs: the caller gets a 409."""


@dataclass
class RunResult:
    """What one prompt's run left for its history."""

    success: bool
    messages: list[Any]
    history_result: dict[str, Any]
    elapsed_s: float
    end_ms: int = field(default_factory=lambda: int(time.time() * 1000))

    @property
    def status(self) -> ExecutionStatus:
        return ExecutionStatus("success" if self.success else "error", self.success, self.messages)

    @property
    def interrupted(self) -> bool:
        return any(m and m[0] == "execution_interrupted" for m in self.messages)


class PromptServer:
    """State shared by the routes: registry, executor, queue, sockets, metrics."""

    def __init__(self, settings: StandardSettings, data_dir: DataDir, workdirs: WorkDirs) -> None:
        self.settings = settings
        self.data_dir = data_dir
        self.workdirs = workdirs
        self.registry: Any = None
        self.executor: Any = None
        self.engine_error: str | None = None
        self.ready = False
        self.queue = PromptQueue(history_max_items=settings.history_max_items, on_change=self.queue_updated)
        self.metrics = ExecutionMetrics(self.queue, ready=lambda: self.ready)
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.socket_flags: dict[str, dict[str, Any]] = {}
        self.quiet_sids: set[str] = set()  # sockets that get no broadcasts (/ws?quiet=1: a front's journal)
        self.number = 0
        # The client and node currently executing (ComfyUI re-sends it on reconnect).
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.running_prompt_id: str | None = None
        self.running_task_id: int | None = None
        # running_* are set by the execution thread when it goes on to the next prompt, and cleared by the
        # loop when it records the previous one: this lock keeps the clearing from undoing the setting.
        self._running_lock = threading.Lock()
        self._stopping = False  # the execution thread must not go on to the next prompt by itself
        self._run_lock = asyncio.Lock()
        self.upload_lock = asyncio.Lock()  # name choice + write of uploads is one step
        self._loop: asyncio.AbstractEventLoop | None = None
        self._messages: asyncio.Queue[tuple[Any, Any, str | None]] = asyncio.Queue()
        # Events sent from other threads (the engine's), handed to the loop in batches: see send_sync; and calls
        # to make on the loop in their order among those events (see _call_in_order).
        self._from_threads: list[tuple[Any, Any, str | None] | Callable[[], None]] = []
        self._from_threads_lock = threading.Lock()
        # Between two nodes (and two prompts) the execution thread holds the hand-over: see node_running.
        self._hold = False
        self._node_started = False  # a node of the running prompt started (the hold was let go)
        self._tasks: list[asyncio.Task[None]] = []
        self._final_executing_sent = False
        self._validate: Any = None
        # Extensions (standard.storage): awaited after a prompt ran, before its history is
        # recorded (may edit the result), and before /restart reloads the engine.
        self.result_hooks: list[Callable[[str, dict[str, Any]], Awaitable[None]]] = []
        self.reload_hooks: list[Callable[[], Awaitable[None]]] = []
        # Awaited before a prompt is validated (may look up the files it names; must not edit it).
        self.prompt_hooks: list[Callable[[dict[str, Any]], Awaitable[None]]] = []
        # Called by send_sync before an event is queued (on the caller's thread; may edit data).
        self.event_hooks: list[Callable[[str | int, Any], None]] = []
        self._execution_thread = ExecutionThread()
        self._settled = asyncio.Event()  # set whenever the queue changes or a run ends (drain waits on it)
        self._drained = False

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Read back the stored queue and history, load the engine (both off the loop), then start the
        publisher and the worker. A state file that cannot be ours raises ConfigError (exit 2)."""
        self._loop = asyncio.get_running_loop()
        await self._open_store()
        await self._load_engine()
        self._tasks = [
            asyncio.create_task(self._publish_loop(), name="comfyserve-publish"),
            asyncio.create_task(self._worker_loop(), name="comfyserve-worker"),
        ]

    async def _open_store(self) -> None:
        path = self.settings.state_file
        if path is None:
            return
        store = await asyncio.to_thread(StateStore.open, path, history_max_items=self.settings.history_max_items)
        try:
            state = await asyncio.to_thread(store.load)
        except BaseException:
            await asyncio.to_thread(store.close)
            raise
        self.queue.store = store
        try:
            failed = self.queue.restore(state)
        except (KeyError, TypeError, ValueError, IndexError) as exc:  # rows this version cannot read
            await asyncio.to_thread(store.close)
            raise ConfigError(f"state file {path}: a stored prompt cannot be read ({exc!r}); move the file away "
                              "(or give another --state-dir) to start with an empty queue and history") from None
        self.number = self.queue.highest_number() + 1
        for prompt_id in failed:
            log.warning("prompt %s was running when the server stopped: reported failed in its history", prompt_id)
        log.info("state %s: %d queued prompt(s), %d history entr%s", path, len(state.pending), len(state.history),
                 "y" if len(state.history) == 1 else "ies")

    async def drain(self, timeout_s: float) -> None:
        """SIGTERM (the routes refuse new prompts meanwhile): run what was accepted, within ``timeout_s``.

        The running prompt and the queued ones run on. Past the limit the queued
        prompts that did not start are dropped (logged with their ids; the queue
        lives in memory) and the running one is interrupted; a node that ignores
        the interrupt is left to its daemon thread and does not hold the exit.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._busy() and loop.time() < deadline:
            self._settled.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):  # not wait_for: on 3.11 it can swallow a cancel
                    await self._settled.wait()
        self._drained = True
        if not self._busy():
            log.info("drained: every accepted prompt ran")
            return
        dropped = [item.prompt_id for item in self.queue.pending()]
        if dropped and self.queue.store is not None:
            self.queue.wipe_queue(on_disk=False)
            log.warning("shutdown timeout: %d queued prompt(s) kept for the next start: %s", len(dropped),
                        ", ".join(dropped))
        elif dropped:
            self.queue.wipe_queue()
            log.warning("shutdown timeout: %d queued prompt(s) not run: %s", len(dropped), ", ".join(dropped))
        if self.running_prompt_id is not None:
            log.warning("shutdown timeout: interrupting prompt %s", self.running_prompt_id)
            self.interrupt()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(INTERRUPT_GRACE_S):
                    async with self._run_lock:
                        pass

    def _busy(self) -> bool:
        return self.queue.tasks_remaining() > 0 or self._run_lock.locked()

    async def stop(self) -> None:
        """Stop taking prompts, interrupt the running one, wait with a limit, cancel.

        After a drain the waiting is done; without one (an app stopped in tests) the
        running prompt gets ``shutdown_timeout_s`` to end after its interrupt.
        """
        self._stopping = True
        worker_busy = self.running_prompt_id is not None
        if worker_busy and self.executor is not None:
            self.executor.interrupt()
        if worker_busy and not self._drained:
            with contextlib.suppress(asyncio.TimeoutError):
                async with asyncio.timeout(self.settings.shutdown_timeout_s):
                    async with self._run_lock:
                        pass
        self._execution_thread.stop()
        with contextlib.suppress(Exception):
            await cancel_and_wait(*self._tasks)
        for ws in list(self.sockets.values()):
            with contextlib.suppress(Exception):
                await ws.close(code=1001, message=b"server shutdown")
        if self.queue.store is not None:
            await asyncio.to_thread(self.queue.store.close)

    async def _load_engine(self) -> None:
        # Imported on start, not with this module: an engine that cannot be imported is
        # reported by /readyz (engine_error) instead of stopping the server.
        try:
            from ..engine import NodeRegistry, PromptExecutor, validate_prompt
        except ImportError as exc:
            self.engine_error = f"embedded engine not available: {exc}"
            log.error("%s", self.engine_error)
            return
        registry = NodeRegistry(self.data_dir, self.workdirs)
        try:
            await asyncio.to_thread(registry.load)
        except Exception as exc:  # a broken engine must not stop /healthz from answering
            self.engine_error = f"engine failed to load: {exc!r}"
            log.exception("engine failed to load")
            return
        self.registry = registry
        self.executor = PromptExecutor(registry, self.send_sync)
        self.executor.on_node = self.node_running
        self._validate = validate_prompt
        self.engine_error = None
        self.ready = True
        for name, error in registry.plugin_errors.items():
            log.error("plugin %s failed to import: %s", name, error)
        log.info("embedded engine ready: %d node classes", len(registry.node_classes))

    async def reload(self) -> dict[str, Any]:
        """Re-scan models and re-import plugins without stopping the process (/restart).

        Refused while a prompt runs (the caller answers 409); prompts queued
        meanwhile wait for the reload and then run on the new node set.
        """
        if self.running_prompt_id is not None or self._run_lock.locked():
            raise RestartRefused("a prompt is running; interrupt it or wait for it to finish")
        async with self._run_lock:
            self.ready = False
            try:
                for hook in self.reload_hooks:
                    await hook()
                await self._load_engine()
            finally:
                self.ready = self.registry is not None and self.engine_error is None
        return self.engine_status()

    def engine_status(self) -> dict[str, Any]:
        registry = self.registry
        return {
            "ready": self.ready,
            "runtime": "embedded",
            "error": self.engine_error,
            "nodes": len(registry.node_classes) if registry is not None else 0,
            "plugin_errors": dict(registry.plugin_errors) if registry is not None else {},
        }

    # -- prompts ---------------------------------------------------------------

    async def validate(
        self, prompt_id: str, prompt: dict[str, Any], partial_execution_targets: list[str] | None
    ) -> tuple[bool, dict[str, Any] | None, list[str], dict[str, Any]]:
        for hook in self.prompt_hooks:
            await hook(prompt)
        result = self._validate(self.registry, prompt_id, prompt, partial_execution_targets)
        if inspect.isawaitable(result):
            result = await result
        valid, error, outputs, node_errors = result
        return bool(valid), error, list(outputs), node_errors

    def next_number(self, front: bool) -> int:
        number = self.number
        self.number += 1
        return -number if front else number

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Interrupt the running prompt (only if it is ``prompt_id`` when given)."""
        if self.running_prompt_id is None or self.executor is None:
            return False
        if prompt_id and prompt_id != self.running_prompt_id:
            return False
        self.executor.interrupt()
        return True

    def request_free(self, *, unload_models: bool, free_memory: bool) -> None:
        """ComfyUI's /free: flags the worker applies between prompts."""
        if unload_models:
            self.queue.flags["unload_models"] = True
        if free_memory:
            self.queue.flags["free_memory"] = True
        self.queue.wake()

    async def _apply_flags(self) -> None:
        flags, self.queue.flags = self.queue.flags, {}
        if (flags.get("unload_models") or flags.get("free_memory")) and self.executor is not None:
            await asyncio.to_thread(self.executor.reset)

    async def _worker_loop(self) -> None:
        while True:
            if self.queue.flags:
                async with self._run_lock:
                    await self._apply_flags()
            got = await self.queue.get()
            if got is None:
                continue  # woken for flags only
            task_id, item = got
            self.queue_updated()  # ComfyUI's queue tells on taking an item too: a second ``status``
            try:
                await self.queue.flush()  # "running" is on disk before it runs: a restart never runs it twice
            except Exception as exc:  # the disk failing must not stop the queue (the writer logged it)
                log.error("prompt %s runs although its state could not be written: %r", item.prompt_id, exc)
            async with self._run_lock:
                await self._run_one(task_id, item)
                if self.queue.flags:
                    await self._apply_flags()
            self._settled.set()

    async def _run_one(self, task_id: int, item: QueueItem) -> None:
        """Run ``item`` and, while the execution thread can go on by itself, the prompts queued behind it."""
        self._begin(task_id, item)
        executor = self.executor
        if executor is None:
            outcome = task_id, item, self._crashed(item, EngineUnavailable(self.engine_error or "engine not loaded"))
        else:
            try:
                outcome = await self._execution_thread.run(self._run_chain, executor, task_id, item)
            except Exception as exc:  # _run_chain catches the executor's own exceptions; this is a bug
                outcome = task_id, item, self._crashed(item, exc)
        task_id, item, result = outcome  # the chain recorded those before it through _call_in_order
        for hook in self.result_hooks:
            try:
                await hook(item.prompt_id, result.history_result)
            except Exception:  # an upload failing must not lose the prompt's history
                log.exception("result hook failed for prompt %s", item.prompt_id)
        self._finish(task_id, item, result, stored=None, send_executing=not self._final_executing_sent)

    def _begin(self, task_id: int, item: QueueItem) -> None:
        """``item`` runs now (on the loop, or on the execution thread when it goes on by itself)."""
        with self._running_lock:
            self.running_task_id = task_id
            self.running_prompt_id = item.prompt_id
            self.client_id = item.extra_data.get("client_id")
            self.last_node_id = None
            self._final_executing_sent = False
            self._node_started = False
        self.metrics.queue_wait.observe(time.monotonic() - item.queued_at)

    def _run_chain(self, executor: Any, task_id: int, item: QueueItem) -> tuple[int, QueueItem, RunResult]:
        """The execution thread: run ``item``, then take the next pending prompt itself, and so on.

        Between two prompts the instance (its GPU) is idle: handing each result
        to the loop and waiting for it to hand over the next prompt cost two
        thread switches (up to Python's 5 ms switch interval each while the
        other thread runs) and a flush awaited on the loop. Here the thread
        queues the finished prompt's history entry to the store, marks the next
        prompt running, commits both to the state file itself (a restart never
        runs a prompt twice, nor loses one that finished), and runs it; the loop
        records the finished one (history, ``status``, ``executing None``)
        meanwhile, through the same ordered hand-over as the engine's events,
        so every client sees ComfyUI's order. It stops going on by itself (and
        returns the last prompt to the loop) when result hooks must be awaited,
        flags are to be applied (/free), the server stops, or nothing is queued;
        and after a prompt that ran no node (all cached): that one kept no GPU
        busy, and going on from it made this thread's bookkeeping (the state
        file's commit, the entry's JSON) contend with the loop's for the GIL,
        which cost each prompt about twice the CPU of the loop's own hand-over
        (bench.gateway: ~15% fewer round trips/s through a front).
        """
        try:
            return self._go_on(executor, task_id, item)
        finally:
            self._release()  # before the caller's future is settled: what was held goes first

    def _go_on(self, executor: Any, task_id: int, item: QueueItem) -> tuple[int, QueueItem, RunResult]:
        while True:
            result = self._execute(executor, item)
            if not self._node_started:
                self._release()  # nothing ran (all cached): no node start lets go of the hold
            if self.result_hooks:
                return task_id, item, result  # awaited on the loop before the history is recorded
            store = self.queue.store
            with store.committing_here() if store is not None else contextlib.nullcontext():
                stop = not self._node_started or self.queue.flags or self._stopping or executor is not self.executor
                got = None if stop else self.queue.take()
                if got is None:
                    return task_id, item, result  # the loop records the last one (its run lock still held)
                stored = self.queue.store_finished(task_id, result.history_result, result.status, result.end_ms)
                self._call_in_order(functools.partial(self._finish, task_id, item, result, stored=stored,
                                                      send_executing=not self._final_executing_sent))
                task_id, item = got
                self._call_in_order(self.queue_updated)  # ComfyUI's queue tells on taking an item: a 2nd status
                self._begin(task_id, item)
                if store is not None:
                    self._commit_here(store, item)

    def _commit_here(self, store: StateStore, item: QueueItem) -> None:
        """On the execution thread: the finished prompt's history and the next one's "running" mark are put
        on disk before it runs (a restart never runs it twice, nor loses the finished one)."""
        try:
            store.commit_here()
        except Exception as exc:  # the disk failing must not stop the queue (the commit logged it)
            log.error("prompt %s runs although its state could not be written: %r", item.prompt_id, exc)

    def _execute(self, executor: Any, item: QueueItem) -> RunResult:
        """On the execution thread: run one prompt; a crash of the executor is a failed prompt."""
        started = time.perf_counter()
        try:
            executor.execute(item.prompt, item.prompt_id, item.execution_extra_data(), item.outputs_to_execute)
            success = bool(executor.success)
            messages = list(executor.status_messages)
            history_result = dict(executor.history_result or {})
        except Exception as exc:  # the executor reports node errors itself; this is a crash
            log.exception("prompt %s crashed the executor", item.prompt_id)
            return self._crashed(item, exc, started)
        return RunResult(success, messages, history_result, time.perf_counter() - started)

    def _crashed(self, item: QueueItem, exc: BaseException, started: float | None = None) -> RunResult:
        messages = [["execution_error", {"prompt_id": item.prompt_id, "exception_message": str(exc)}]]
        elapsed_s = 0.0 if started is None else time.perf_counter() - started
        return RunResult(False, messages, {"outputs": {}, "meta": {}}, elapsed_s)

    def _finish(self, task_id: int, item: QueueItem, result: RunResult, *, stored: StoredEntry | None,
                send_executing: bool) -> None:
        """On the loop: record a finished prompt (its history, metrics, ``status``, ``executing None``)."""
        self.metrics.observe(result.elapsed_s, success=result.success, interrupted=result.interrupted)
        self.queue.task_done(task_id, result.history_result, result.status, end_ms=result.end_ms, stored=stored)
        client_id = item.extra_data.get("client_id")
        if client_id is not None and send_executing:
            self.send_sync("executing", {"node": None, "prompt_id": item.prompt_id}, client_id)
        with self._running_lock:
            if self.running_task_id == task_id:  # not when the execution thread went on to the next one
                self.running_task_id = None
                self.running_prompt_id = None
                self.client_id = None
                self.last_node_id = None
        log.info("prompt %s executed in %.2f seconds", item.prompt_id, result.elapsed_s)

    # -- events ----------------------------------------------------------------

    def queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self.queue.tasks_remaining()}}

    def queue_updated(self) -> None:
        self._settled.set()
        self.send_sync("status", {"status": self.queue_info()}, None)

    def send_sync(self, event: str | int, data: Any, sid: str | None = None) -> None:
        """Thread-safe: queue an event for the publisher (``sid=None`` broadcasts)."""
        if event == "executing" and isinstance(data, dict) and data.get("prompt_id") in (None, self.running_prompt_id):
            # (not a finished prompt's "executing None" sent once the execution thread went on to the next)
            self.last_node_id = data.get("node")
            self._final_executing_sent = data.get("node") is None
        if event == UNENCODED_PREVIEW_IMAGE:
            event, data = PREVIEW_IMAGE, _encode_preview(data)
        for hook in self.event_hooks:
            try:
                hook(event, data)
            except Exception:
                log.exception("event hook failed for %s", event)
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._messages.put_nowait((event, data, sid))
            return
        # Another thread: a prompt sends ~10 events in a burst, and waking the loop for each one made the
        # loop and the engine trade the GIL back and forth. One wake-up takes what is queued by then, in order
        # (and before the engine's "done", which is scheduled after its last event).
        self._hand_over((event, data, sid))

    def _call_in_order(self, call: Callable[[], None]) -> None:
        """From another thread: make ``call`` on the loop after the events sent so far, before later ones."""
        self._hand_over(call)

    def node_running(self, running: bool) -> None:
        """The executor's hook around each node's function: hold the hand-over in between.

        Waking the loop costs the execution thread more than the write that
        wakes it: the loop then wants the GIL, and takes it at the next
        blocking call of the execution thread (a file listed, the state file's
        commit awaited) for all the work queued for it (events to send, the
        finished prompt's history). Between a node's end and the next node's
        start, which is where the instance's GPU is idle, those are held and
        handed over, in order, when the next node starts (or the execution
        thread stops going on): the loop then works while
        the node does.
        """
        if running:
            self._node_started = True
            self._release()
        else:
            with self._from_threads_lock:
                self._hold = True

    def _release(self) -> None:
        """Let go of the hold; hand over what it kept."""
        with self._from_threads_lock:
            if not self._hold:
                return
            self._hold = False
            if not self._from_threads:
                return
        self._wake_loop()

    def _hand_over(self, entry: tuple[Any, Any, str | None] | Callable[[], None]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with self._from_threads_lock:
            self._from_threads.append(entry)
            if len(self._from_threads) > 1 or self._hold:
                return  # a hand-over is already scheduled (or will be on release) and will take this one too
        self._wake_loop()

    def _wake_loop(self) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # closed meanwhile: nobody listens any more
            loop.call_soon_threadsafe(self._take_from_threads)

    def _take_from_threads(self) -> None:
        with self._from_threads_lock:
            batch, self._from_threads = self._from_threads, []
        for entry in batch:
            if callable(entry):
                try:
                    entry()
                except Exception:
                    log.exception("handing over to the loop failed")
            else:
                self._messages.put_nowait(entry)

    async def _publish_loop(self) -> None:
        while True:
            event, data, sid = await self._messages.get()
            try:
                if isinstance(data, (bytes, bytearray)):
                    await self.send_bytes(int(event), bytes(data), sid)
                else:
                    await self.send_json(event, data, sid)
            except Exception:
                log.exception("failed to deliver %r", event)

    def _targets(self, sid: str | None) -> list[web.WebSocketResponse]:
        if sid is None:
            quiet = self.quiet_sids
            if not quiet:
                return list(self.sockets.values())
            return [ws for key, ws in self.sockets.items() if key not in quiet]
        ws = self.sockets.get(sid)
        return [ws] if ws is not None else []

    async def send_json(self, event: str | int, data: Any, sid: str | None = None) -> None:
        message = {"type": event, "data": data}
        for ws in self._targets(sid):
            await _send_quietly(ws.send_json(message))

    async def send_bytes(self, event: int, data: bytes, sid: str | None = None) -> None:
        message = struct.pack(">I", event) + data
        for ws in self._targets(sid):
            await _send_quietly(ws.send_bytes(message))


class ExecutionThread:
    """One long-lived daemon thread that runs the blocking executor calls, one at a time.

    A daemon, so a node stuck in its function cannot keep the process alive after
    a SIGTERM has waited its limit (pool threads are joined at exit; daemons are
    not). Long-lived, because starting a thread per prompt costs milliseconds on
    a busy machine, which is most of a tiny prompt's time.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Callable[[bool, Any], None]] | None] = (
            queue.SimpleQueue())
        self._thread: threading.Thread | None = None

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            function, settle = job
            try:
                ok, value = True, function()
            except BaseException as exc:  # handed over to the awaiting task
                ok, value = False, exc
            settle(ok, value)

    async def run(self, function: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def settle(ok: bool, value: Any) -> None:
            def set_result() -> None:
                if not future.done():
                    future.set_result(value) if ok else future.set_exception(value)

            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(set_result)

        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._serve, name="comfyserve-execute", daemon=True)
            self._thread.start()
        self._jobs.put((lambda: function(*args), settle))
        return await future

    def stop(self) -> None:
        """Let the thread end once its current job (if any) returns."""
        self._jobs.put(None)
        self._thread = None


async def _send_quietly(coro: Any) -> None:
    """A client that went away must not break delivery to the others."""
    try:
        await coro
    except (ConnectionError, RuntimeError, OSError) as exc:
        log.debug("ws send failed: %s", exc)


def _encode_preview(data: Any) -> bytes:
    """(format, PIL image, max_size) -> >I format + encoded bytes, like ComfyUI's send_image."""
    from PIL import Image, ImageOps

    image_format, image, max_size = data
    if max_size is not None:
        image = ImageOps.contain(image, (max_size, max_size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    buffer.write(struct.pack(">I", 2 if image_format == "PNG" else 1))
    image.save(buffer, format=image_format, quality=95, compress_level=1)
    return buffer.getvalue()
