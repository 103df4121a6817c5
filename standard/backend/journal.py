"""What the front of real ComfyUI forwarded and what came back, kept although ComfyUI forgets.

ComfyUI keeps its queue and history in memory. The front records each prompt
ComfyUI accepted through it (``POST /prompt``: the body and the ``prompt_id``,
handed to the store's writer before the client gets its answer) in the instance's state store
(``standard.state_store``), and a watcher follows those prompts in ComfyUI
(``GET /queue``, then ``GET /history/<id>`` once one left the queue) and stores
each history entry when it appears. A prompt that left ComfyUI's queue without
a history entry either finished and had its entry trimmed (ComfyUI's history is
bounded) before the watcher looked, or was forgotten: ComfyUI (or this process,
and with it a supervised ComfyUI) restarted. ``standard.backend.continuity``
tells which: a prompt ComfyUI was seen holding in the epoch that still runs
finished, and is let go (its entry is not stored here: ComfyUI no longer had
it); one forgotten is dealt with by what the watcher saw of it:

* one the watcher saw running is *reported failed* (an ``execution_error``
  naming the restart, as the embedded engine reports it): it may be what
  brought ComfyUI down, and running it again could do that on every start;
* one it never saw running is *submitted again*, with its ``prompt_id``, in
  the order they were accepted. (A prompt that started and ended between two
  looks of the watcher (``POLL_S``, longer while ComfyUI's queue is long), and whose history ComfyUI lost
  in a restart right after, is therefore run again; so is one ComfyUI accepted while the front could not
  see it, that finished and had its entry trimmed before a look: the cases where "once" is not kept.)

The history the front serves (``/history``, ``/history/<id>``, ``/jobs``) is
ComfyUI's merged with the stored one, so it answers after a restart as before.
Deleting from ComfyUI's queue or history through the front deletes here too.

With ``finishing`` (an oss:// data dir: ``standard.backend.outputs``) an entry is stored once that
coroutine has handled it (its outputs uploaded, their ``url``s added), in a task of its own: the
watcher goes on meanwhile, and leaves the prompt alone until it is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from ..errors import ConfigError
from ..server.prompt_queue import SENSITIVE_EXTRA_DATA_KEYS
from ..state_store import StateStore, restart_error
from ..tasks import cancel_and_wait
from .continuity import Continuity
from .runtime import Backend
from .watcher import watch_comfyui

log = logging.getLogger("comfyserve.backend")

POLL_S = 0.2  # how often ComfyUI's queue is looked at while prompts of ours are in it...
POLL_PER_PROMPT_S = 0.002  # ...less often the longer ComfyUI's queue is (it answers /queue with every prompt in it)
MAX_POLL_S = 3.0
REQUEST_TIMEOUT_S = 10.0
MAX_IDS_LOGGED = 10
FORWARDED_HEADERS = ("Comfy-User",)  # request headers ComfyUI reads that a re-submission must carry too


@dataclass
class Outstanding:
    """A prompt ComfyUI accepted from us and that has no history entry yet."""

    number: float
    body: dict[str, Any]
    headers: dict[str, str]
    running: bool = False
    epoch: int | None = None  # when ComfyUI was last seen holding it (``continuity``); None: not while seen


class PromptJournal:
    """The stored prompts and history of a front; the watcher task that keeps them in step with ComfyUI."""

    def __init__(self, store: StateStore, backend: Backend, *, strip_auth: bool) -> None:
        self.store = store
        self.backend = backend
        self.strip_auth = strip_auth  # our token is not ComfyUI's business
        self.outstanding: OrderedDict[str, Outstanding] = OrderedDict()
        self.history: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.session: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._round = asyncio.Lock()
        # An entry on its way to being stored (``finishing``): what ComfyUI answered, handled first.
        self.finishing: Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]] | None = None
        self._finishing: dict[str, asyncio.Task[None]] = {}
        self._queue_length = 0  # ComfyUI's queue (running and pending) at the last look
        self._look_soon = asyncio.Event()  # the socket to ComfyUI opened: anchor what it holds at once
        self.continuity = Continuity(backend, on_open=self._look_soon.set)
        self._follow: asyncio.Task[None] | None = None
        self._held = False
        self.trimmed = 0  # prompts finished whose history entry ComfyUI no longer had when the watcher looked
        self.requeued = 0  # prompts ComfyUI forgot, queued again

    # -- lifecycle -------------------------------------------------------------

    async def start(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        state = await asyncio.to_thread(self.store.load)
        for stored in state.history:
            self.history[stored.prompt_id] = stored.entry
        for prompt in state.prompts:
            body = prompt.payload.get("body") if isinstance(prompt.payload, dict) else None
            if not isinstance(body, dict):
                raise ConfigError(f"state file {self.store.path}: prompt {prompt.prompt_id} was not stored by a "
                                  "front of ComfyUI (an embedded-engine state file?); give this front another "
                                  "--state-dir or --port")
            self.outstanding[prompt.prompt_id] = Outstanding(prompt.number, body, prompt.payload.get("headers") or {},
                                                             prompt.running)
        log.info("state %s: %d prompt(s) forwarded and not finished, %d history entr%s", self.store.path,
                 len(self.outstanding), len(self.history), "y" if len(self.history) == 1 else "ies")
        self._follow = asyncio.create_task(self.continuity.follow(session), name="comfyserve-journal-socket")
        self._task = asyncio.create_task(self._watch(), name="comfyserve-journal")

    async def stop(self) -> None:
        """One last look at ComfyUI (what finished while draining is kept), then close the store."""
        if self._task is not None:
            await cancel_and_wait(self._task)
        await self.sync()
        if self._follow is not None:
            await cancel_and_wait(self._follow)
        if self._finishing:  # entries being handled are stored before the store closes
            await asyncio.gather(*list(self._finishing.values()), return_exceptions=True)
        await asyncio.to_thread(self.store.close)

    async def hold(self) -> None:
        """Stop watching before a drain past its timeout clears ComfyUI's queue: the prompts cleared are
        kept for the next start, not re-submitted meanwhile as forgotten ones (nor let go as finished)."""
        self._held = True
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def sync(self) -> None:
        """Take in what ComfyUI finished by now (before it is restarted on purpose); quiet if it does not answer."""
        if self.outstanding and self.backend.base_url is not None:
            with contextlib.suppress(TimeoutError, aiohttp.ClientError, OSError, ValueError):
                await self._look(resubmit=False, let_go=not self._held)

    # -- what the routes tell it -------------------------------------------------

    def record(self, prompt_id: str, number: float, body: dict[str, Any], headers: dict[str, str]) -> None:
        """ComfyUI accepted this prompt: handed to the writer before the client is answered (not awaited,
        as ``POST /prompt`` of the embedded engine: see ``standard.state_store``)."""
        epoch = self.continuity.anchor()
        if epoch is None:
            self.continuity.wanted()
        self.outstanding[prompt_id] = Outstanding(number, body, headers, epoch=epoch)
        self.store.add_prompt(prompt_id, number, {"body": body, "headers": headers})
        self._wake.set()

    async def forget_pending(self, prompt_ids: list[str] | None) -> None:
        """Deleted from ComfyUI's queue through us (all pending ones when None): not to be re-submitted."""
        ids = [pid for pid, o in self.outstanding.items() if not o.running] if prompt_ids is None else prompt_ids
        for prompt_id in ids:
            outstanding = self.outstanding.get(prompt_id)
            if outstanding is not None and not outstanding.running:
                del self.outstanding[prompt_id]
        self.store.drop_prompts(ids if prompt_ids is not None else None)
        await self.store.flush()

    async def forget_history(self, prompt_ids: list[str] | None) -> None:
        if prompt_ids is None:
            self.history.clear()
        for prompt_id in prompt_ids or ():
            self.history.pop(prompt_id, None)
        self.store.delete_history(prompt_ids)
        await self.store.flush()

    # -- the watcher -------------------------------------------------------------

    async def _watch(self) -> None:
        await watch_comfyui(self.backend, self._wake, name="journal", busy=lambda: bool(self.outstanding),
                            look=lambda: self._look(resubmit=True, let_go=True),
                            interval_s=self._interval_s, soon=self._look_soon)

    def _interval_s(self) -> float:
        """Longer while ComfyUI's queue is long (what a look costs), never with what awaits a look: the
        prompts that finished since the last one should still be in ComfyUI's history (it keeps a bounded
        number) when the next looks for them, or their entries are not stored here."""
        return min(MAX_POLL_S, POLL_S + POLL_PER_PROMPT_S * self._queue_length)

    async def _get(self, base_url: str, path: str) -> Any:
        assert self.session is not None
        try:
            async with self.session.get(base_url + path,
                                        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as resp:
                resp.raise_for_status()
                return await resp.json(content_type=None)
        except aiohttp.ClientResponseError:
            raise  # ComfyUI answered
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self.continuity.lost(f"GET {path.partition('?')[0]} failed: {exc!r}")
            raise

    async def _look(self, *, resubmit: bool, let_go: bool) -> None:
        """One round: note what runs, store what finished, let go of what finished with its entry trimmed,
        deal with what ComfyUI forgot (``resubmit``)."""
        async with self._round:
            base_url = self.backend.base_url
            if base_url is None:
                return
            # before asking: a prompt recorded later is not judged on this answer
            ids = [prompt_id for prompt_id in self.outstanding if prompt_id not in self._finishing]
            asked_in = self.continuity.anchor()
            queue = await self._get(base_url, "/queue")
            if not isinstance(queue, dict):
                raise ValueError(f"/queue answered {type(queue).__name__}, not an object")
            # the ComfyUI of one epoch, followed all along, answered: what it holds is anchored to the epoch
            epoch = asked_in if self.continuity.anchor() == asked_in else None
            running = {item[1] for item in queue.get("queue_running") or [] if _is_item(item)}
            pending = {item[1] for item in queue.get("queue_pending") or [] if _is_item(item)}
            self._queue_length = len(running) + len(pending)
            gone = []
            for prompt_id in ids:
                outstanding = self.outstanding.get(prompt_id)
                if outstanding is None:
                    continue
                if epoch is not None and (prompt_id in running or prompt_id in pending):
                    outstanding.epoch = epoch
                if prompt_id in running and not outstanding.running:
                    outstanding.running = True
                    self.store.mark_running(prompt_id)
                    log.info("prompt %s is running in ComfyUI", prompt_id)
                elif prompt_id not in running and prompt_id not in pending:
                    gone.append(prompt_id)
            forgotten, trimmed = [], []
            # ComfyUI writes the history entry before it leaves the queue. What just finished is among the
            # newest entries: one request for them all, then one per prompt not found there.
            newest = await self._get(base_url, f"/history?max_items={2 * len(gone) + 16}") if gone else {}
            for prompt_id in gone:
                found = newest if isinstance(newest, dict) and prompt_id in newest else await self._get(
                    base_url, f"/history/{prompt_id}")
                if isinstance(found, dict) and isinstance(found.get(prompt_id), dict):
                    self._take(prompt_id, found[prompt_id])
                elif (outstanding := self.outstanding.get(prompt_id)) is None:
                    continue
                elif epoch is not None and outstanding.epoch == epoch:  # it left the queue of this ComfyUI
                    trimmed.append(prompt_id)
                else:
                    forgotten.append(prompt_id)
            if trimmed and let_go:
                self._let_go(trimmed)
            if forgotten and resubmit:
                await self._recover(base_url, forgotten)
            await self.store.flush()

    def _let_go(self, prompt_ids: list[str]) -> None:
        """Finished in ComfyUI, whose bounded history dropped their entries before they were looked for."""
        for prompt_id in prompt_ids:
            del self.outstanding[prompt_id]
        self.store.drop_prompts(prompt_ids)
        self.trimmed += len(prompt_ids)
        shown = ", ".join(prompt_ids[:MAX_IDS_LOGGED]) + (", ..." if len(prompt_ids) > MAX_IDS_LOGGED else "")
        log.warning("%d prompt(s) finished in ComfyUI, whose history no longer held their entries when the front "
                    "looked (it keeps a bounded number): not stored here, not run again: %s", len(prompt_ids), shown)

    def _take(self, prompt_id: str, entry: dict[str, Any]) -> None:
        """ComfyUI's history entry of a prompt of ours: stored now, or once ``finishing`` handled it."""
        if self.finishing is None:
            self._finish(prompt_id, entry)
            return
        task = asyncio.create_task(self._finish_later(self.finishing, prompt_id, entry),
                                   name="comfyserve-journal-finish")
        self._finishing[prompt_id] = task
        task.add_done_callback(lambda _: self._finishing.pop(prompt_id, None))

    async def _finish_later(self, finishing: Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]],
                            prompt_id: str, entry: dict[str, Any]) -> None:
        try:
            entry = await finishing(prompt_id, entry)
        except Exception:  # stored as ComfyUI made it rather than not at all
            log.exception("journal: prompt %s: its entry was not handled", prompt_id)
        if prompt_id in self.outstanding:  # not deleted through us meanwhile
            self._finish(prompt_id, entry)
            await self.store.flush()

    def _finish(self, prompt_id: str, entry: dict[str, Any]) -> None:
        self.outstanding.pop(prompt_id, None)
        self.history.pop(prompt_id, None)
        self.history[prompt_id] = entry
        while len(self.history) > self.store.history_max_items:
            self.history.popitem(last=False)
        self.store.finish(prompt_id, entry, None)

    async def _recover(self, base_url: str, prompt_ids: list[str]) -> None:
        order = {prompt_id: index for index, prompt_id in enumerate(self.outstanding)}
        for prompt_id in sorted(prompt_ids, key=lambda pid: (self.outstanding[pid].number, order[pid])):
            outstanding = self.outstanding[prompt_id]
            if outstanding.running:
                log.warning("prompt %s was running when ComfyUI stopped: reported failed in its history", prompt_id)
                self._finish(prompt_id, self._failed_entry(prompt_id, outstanding, [restart_error(prompt_id)]))
                continue
            await self._resubmit(base_url, prompt_id, outstanding)

    async def _resubmit(self, base_url: str, prompt_id: str, outstanding: Outstanding) -> None:
        assert self.session is not None
        body = {k: v for k, v in outstanding.body.items() if k not in ("front", "number")}
        body["prompt_id"] = prompt_id
        async with self.session.post(base_url + "/prompt", json=body, headers=outstanding.headers,
                                      timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as resp:
            answer = await resp.json(content_type=None) if resp.status in (200, 400) else None
            if resp.status == 200:
                outstanding.epoch = self.continuity.anchor()  # held by this ComfyUI now
                self.requeued += 1
                log.info("prompt %s: ComfyUI forgot it (it restarted); queued it again", prompt_id)
                return
        if resp.status == 400 and isinstance(answer, dict):
            error = answer.get("error")
            message = error.get("message") if isinstance(error, dict) else str(error)
            log.warning("prompt %s: ComfyUI forgot it and refuses it now: %s", prompt_id, message)
            status = ["execution_error", {**restart_error(prompt_id)[1], "exception_type": "PromptRefused",
                                          "exception_message": f"queued again after a restart, refused: {message}"}]
            self._finish(prompt_id, self._failed_entry(prompt_id, outstanding, [status]))
            return
        raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)  # tried again next round

    @staticmethod
    def _failed_entry(prompt_id: str, outstanding: Outstanding, messages: list[Any]) -> dict[str, Any]:
        body = outstanding.body
        extra_data = {k: v for k, v in (body.get("extra_data") or {}).items() if k not in SENSITIVE_EXTRA_DATA_KEYS}
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        item: list[Any] = [outstanding.number, prompt_id, body.get("prompt") or {}, extra_data, []]
        return {"prompt": item, "outputs": {}, "status": {"status_str": "error", "completed": False,
                                                          "messages": messages}, "meta": {}}


def _is_item(item: Any) -> bool:
    return isinstance(item, list) and len(item) > 1 and isinstance(item[1], str)


JOURNAL: web.AppKey[PromptJournal] = web.AppKey("backend_journal", PromptJournal)
