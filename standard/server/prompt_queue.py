"""The prompt queue and history of one instance, with ComfyUI's ordering and shapes.

Pending prompts are ordered by ``number`` (``front`` submissions get a negative
number, so they run first), ties in submission order. Queue entries are shown
as ComfyUI's tuple ``[number, prompt_id, prompt, extra_data,
outputs_to_execute]``; sensitive extra_data keys are kept apart and never
shown. All methods run on the event loop thread (the worker awaits
:meth:`PromptQueue.get`) except :meth:`PromptQueue.take` and
:meth:`PromptQueue.store_finished`, which the execution thread calls to go on
to the next prompt without a round trip through the loop: the pending heap and
the running items are guarded by a lock for them.

With a :class:`~standard.state_store.StateStore` every change is also
recorded there (off the loop) and :meth:`PromptQueue.restore` reads it back
at start: pending prompts run again in their order; a prompt that was running
when the process stopped (``kill -9``, a crash, a shutdown timeout whose
interrupt did not end it) is *reported failed*, not re-run: it may be what
brought the process down (a node that runs out of memory would do it again on
every start), and a client polling its history gets a definite answer
(``execution_error`` naming the restart) instead of a silent re-run or ``{}``.
"""

from __future__ import annotations

import asyncio
import copy
import heapq
import itertools
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..state_store import StateStore, StoredState, encode_json, restart_error

# ComfyUI keeps these out of /queue and /history (execution.SENSITIVE_EXTRA_DATA_KEYS).
SENSITIVE_EXTRA_DATA_KEYS: tuple[str, ...] = ("auth_token_comfy_org", "api_key_comfy_org")


@dataclass
class QueueItem:
    """One accepted prompt."""

    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs_to_execute: list[str]
    sensitive: dict[str, Any] = field(default_factory=dict)
    queued_at: float = field(default_factory=time.monotonic)  # for the queue-wait histogram

    def public(self) -> list[Any]:
        """ComfyUI's 5-tuple, as /queue and /history show it."""
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs_to_execute]

    def payload(self) -> dict[str, Any]:
        """What the state store keeps (the sensitive keys too: the file is 0600, and a re-run needs them)."""
        return {"prompt": self.prompt, "extra_data": self.extra_data, "outputs_to_execute": self.outputs_to_execute,
                "sensitive": self.sensitive}

    @classmethod
    def from_payload(cls, number: float, prompt_id: str, payload: dict[str, Any]) -> QueueItem:
        return cls(number, prompt_id, payload["prompt"], payload["extra_data"], payload["outputs_to_execute"],
                   payload.get("sensitive") or {})

    def execution_extra_data(self) -> dict[str, Any]:
        """extra_data with the sensitive keys put back, for the executor only."""
        return {**self.extra_data, **self.sensitive}


@dataclass(frozen=True)
class StoredEntry:
    """A finished prompt's history entry as the execution thread wrote it to the store, and its JSON."""

    entry: dict[str, Any]
    times_ms: tuple[int, int]
    encoded: str | None


@dataclass(frozen=True)
class ExecutionStatus:
    """ComfyUI's history ``status``."""

    status_str: str
    completed: bool
    messages: list[Any]

    def as_dict(self) -> dict[str, Any]:
        return {"status_str": self.status_str, "completed": self.completed, "messages": self.messages}


class PromptQueue:
    """Pending heap, the running item and a bounded, insertion-ordered history."""

    def __init__(self, *, history_max_items: int, on_change: Callable[[], None] = lambda: None,
                 store: StateStore | None = None) -> None:
        self.store = store
        self._lock = threading.Lock()  # the heap, the running items and their start times: see take()
        self._heap: list[tuple[float, int, QueueItem]] = []
        self._seq = itertools.count()
        self._running: dict[int, QueueItem] = {}
        self._active: Counter[str] = Counter()  # prompt_id -> pending or running items: contains() per POST
        self._task_ids = itertools.count()
        self._history: OrderedDict[str, dict[str, Any]] = OrderedDict()
        # prompt_id -> its entry's JSON, when the execution thread encoded it for the store: /history answers
        # with it instead of encoding the entry again (a front's journal reads each entry once more).
        self._encoded: dict[str, str] = {}
        self._history_max_items = max(1, history_max_items)
        self._on_change = on_change
        self._available = asyncio.Event()
        self._started_ms: dict[int, int] = {}
        self._times_ms: dict[str, tuple[int, int]] = {}  # prompt_id -> (start, end), for /jobs
        self.flags: dict[str, Any] = {}

    # -- queue -----------------------------------------------------------------

    def restore(self, state: StoredState) -> list[str]:
        """Take back a stored queue and history (before the worker starts); the ids reported failed."""
        for stored in state.history:
            self._history[stored.prompt_id] = stored.entry
            if stored.times_ms is not None:
                self._times_ms[stored.prompt_id] = stored.times_ms
        for pending in state.pending:
            item = QueueItem.from_payload(pending.number, pending.prompt_id, pending.payload)
            heapq.heappush(self._heap, (item.number, next(self._seq), item))
            self._active[item.prompt_id] += 1
        failed = []
        for running in state.running:
            item = QueueItem.from_payload(running.number, running.prompt_id, running.payload)
            task_id = next(self._task_ids)
            self._running[task_id] = item
            self._active[item.prompt_id] += 1
            self.task_done(task_id, {"outputs": {}, "meta": {}},
                           ExecutionStatus("error", False, [restart_error(item.prompt_id)]))
            failed.append(item.prompt_id)
        if self._heap:
            self._available.set()
        return failed

    def highest_number(self) -> int:
        """The largest |number| known (the next one counts on from it after a restart)."""
        numbers = [abs(e[2].number) for e in self._heap]
        numbers += [abs(entry["prompt"][0]) for entry in self._history.values()
                    if isinstance(entry.get("prompt"), list) and entry["prompt"]
                    and isinstance(entry["prompt"][0], (int, float))]
        return int(max(numbers, default=-1))

    async def flush(self) -> None:
        """Until the changes made so far are on disk (at once without a store)."""
        if self.store is not None:
            await self.store.flush()

    def put(self, item: QueueItem) -> None:
        with self._lock:
            if self.store is not None:
                self.store.add_prompt(item.prompt_id, item.number, item.payload())
            heapq.heappush(self._heap, (item.number, next(self._seq), item))
            self._active[item.prompt_id] += 1
        self._available.set()
        self._on_change()

    async def get(self) -> tuple[int, QueueItem] | None:
        """Wait for the first pending item and mark it running; None after a bare :meth:`wake`."""
        if not self._heap:
            self._available.clear()
            await self._available.wait()
            self._available.clear()
        return self.take()

    def take(self) -> tuple[int, QueueItem] | None:
        """Mark the first pending item running, or None when there is none (any thread; no events)."""
        with self._lock:
            if not self._heap:
                return None
            _, _, item = heapq.heappop(self._heap)
            task_id = next(self._task_ids)
            self._running[task_id] = item
            self._started_ms[task_id] = int(time.time() * 1000)
            if self.store is not None:
                self.store.mark_running(item.prompt_id)
            return task_id, item

    def wake(self) -> None:
        """Let a waiting :meth:`get` re-check (e.g. a flag was set while idle)."""
        self._available.set()

    def task_done(self, task_id: int, history_result: dict[str, Any], status: ExecutionStatus, *,
                  end_ms: int | None = None, stored: StoredEntry | None = None) -> None:
        """Move a running item to the history; ``stored``: what :meth:`store_finished` already wrote to the
        store for it (the same entry, with this ``end_ms``)."""
        with self._lock:
            item = self._running.pop(task_id)
            self._forget(item.prompt_id)
            started_ms = self._started_ms.pop(task_id, None)
        while len(self._history) >= self._history_max_items:
            dropped, _ = self._history.popitem(last=False)
            self._times_ms.pop(dropped, None)
            self._encoded.pop(dropped, None)
        self._history.pop(item.prompt_id, None)
        if stored is not None:
            entry, times, encoded = stored.entry, stored.times_ms, stored.encoded
        else:
            entry, times = _finished(item, history_result, status, started_ms, end_ms)
            encoded = None
        if encoded is not None:
            self._encoded[item.prompt_id] = encoded
        else:
            self._encoded.pop(item.prompt_id, None)
        self._times_ms[item.prompt_id] = times
        self._history[item.prompt_id] = entry
        if self.store is not None and stored is None:
            self.store.finish(item.prompt_id, entry, times)
        self._on_change()

    def store_finished(self, task_id: int, history_result: dict[str, Any], status: ExecutionStatus,
                       end_ms: int) -> StoredEntry | None:
        """Write the history entry :meth:`task_done` will record (any thread): the execution thread queues it
        before it marks the next prompt running, so one flush puts both on disk. Returns it for task_done
        (None without a store)."""
        if self.store is None:
            return None
        with self._lock:
            item = self._running[task_id]
            started_ms = self._started_ms.get(task_id)
        entry, times = _finished(item, history_result, status, started_ms, end_ms)
        try:
            encoded: str | None = encode_json(entry)
        except (ValueError, TypeError, RecursionError):  # the store's commit fails it and says so
            encoded = None
        self.store.finish(item.prompt_id, entry, times, encoded)
        return StoredEntry(entry, times, encoded)

    def running(self) -> list[QueueItem]:
        with self._lock:
            return list(self._running.values())

    def pending(self) -> list[QueueItem]:
        """Pending items in the order they will run."""
        with self._lock:
            return [entry[2] for entry in sorted(self._heap, key=lambda e: (e[0], e[1]))]

    def current_queue(self) -> tuple[list[list[Any]], list[list[Any]]]:
        """(queue_running, queue_pending) as ComfyUI's /queue shows them."""
        return (
            [copy.deepcopy(item.public()) for item in self.running()],
            [copy.deepcopy(item.public()) for item in self.pending()],
        )

    def tasks_remaining(self) -> int:
        with self._lock:
            return len(self._heap) + len(self._running)

    def contains(self, prompt_id: str) -> bool:
        """True when ``prompt_id`` is pending or running."""
        with self._lock:
            return prompt_id in self._active

    def _forget(self, prompt_id: str) -> None:
        """One pending or running item of ``prompt_id`` left the queue."""
        self._active[prompt_id] -= 1
        if self._active[prompt_id] <= 0:
            del self._active[prompt_id]

    def wipe_queue(self, *, on_disk: bool = True) -> None:
        """Drop every pending prompt; ``on_disk=False`` keeps them in the store for the next start."""
        with self._lock:
            for entry in self._heap:
                self._forget(entry[2].prompt_id)
            self._heap.clear()
            if on_disk and self.store is not None:
                self.store.drop_prompts()
        self._on_change()

    def delete_queue_item(self, prompt_id: str) -> bool:
        """Drop one pending item (never the running one); True if found."""
        with self._lock:
            for index, entry in enumerate(self._heap):
                if entry[2].prompt_id == prompt_id:
                    self._heap.pop(index)
                    heapq.heapify(self._heap)
                    self._forget(prompt_id)
                    if self.store is not None:
                        self.store.drop_prompts([prompt_id])
                    break
            else:
                return False
        self._on_change()
        return True

    # -- history ---------------------------------------------------------------

    def get_history(
        self, prompt_id: str | None = None, *, max_items: int | None = None, offset: int = -1
    ) -> dict[str, Any]:
        """ComfyUI's paging: without an offset, ``max_items`` means the newest ones.

        The entries themselves, not copies: the routes serialise them at once on
        the loop, the one thread that changes the history (a deep copy of each
        cost more than its JSON, and a front's journal reads hundreds per look).
        """
        if prompt_id is not None:
            entry = self._history.get(prompt_id)
            return {} if entry is None else {prompt_id: entry}
        if offset < 0 and max_items is not None:
            offset = len(self._history) - max_items
        offset = max(offset, 0)
        keys = list(self._history)[offset:]
        if max_items is not None:
            keys = keys[:max_items]
        return {key: self._history[key] for key in keys}

    def history_json(self, history: dict[str, Any]) -> str:
        """``history`` (from :meth:`get_history`) as JSON: the text of the entries encoded for the store, the
        others encoded now (the same text json.dumps writes)."""
        encoded = self._encoded
        return "{" + ", ".join(f"{encode_json(prompt_id)}: {encoded.get(prompt_id) or encode_json(entry)}"
                               for prompt_id, entry in history.items()) + "}"

    def history_size(self) -> int:
        return len(self._history)

    def history_entries(self) -> dict[str, dict[str, Any]]:
        """The live history (read-only use: /jobs reshapes it without copying)."""
        return self._history

    def times_ms(self, prompt_id: str) -> tuple[int, int] | None:
        """(execution start, end) in ms since the epoch of a finished prompt."""
        return self._times_ms.get(prompt_id)

    def wipe_history(self) -> None:
        self._history.clear()
        self._times_ms.clear()
        self._encoded.clear()
        if self.store is not None:
            self.store.delete_history()

    def delete_history_item(self, prompt_id: str) -> None:
        self._history.pop(prompt_id, None)
        self._times_ms.pop(prompt_id, None)
        self._encoded.pop(prompt_id, None)
        if self.store is not None:
            self.store.delete_history([prompt_id])


def _finished(item: QueueItem, history_result: dict[str, Any], status: ExecutionStatus, started_ms: int | None,
              end_ms: int | None) -> tuple[dict[str, Any], tuple[int, int]]:
    """A finished item's history entry and (start, end) in ms."""
    end_ms = int(time.time() * 1000) if end_ms is None else end_ms
    entry: dict[str, Any] = {"prompt": item.public(), "outputs": {}, "status": status.as_dict()}
    entry.update(history_result)
    return entry, (started_ms or end_ms, end_ms)
