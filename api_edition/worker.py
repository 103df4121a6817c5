"""A worker: input queue -> its instance -> sink queue.

It watches the input queue with window ``1 + --prefetch`` under a consumer id that survives
restarts (``slot_worker_id``, ``default_worker_id``), so a restarted worker
gets back the item it held at once instead of after ``--pending-timeout``. It
runs each graph on its instance with ``InstanceClient.run`` (POST /prompt +
WS), then puts the result on the sink with the input's tags and commits the
input. So a worker that dies before its commit loses nothing: the queue hands
the item to another worker once the dead one's lease runs out (or to the
worker itself, restarted, at once).

Exactly one result per task: the sink put carries the input's ``requestId``
(over HTTP also as its idempotency key, so a retried put stores nothing
twice); before running, a worker looks that id up on the sink, where the
queue also remembers results committed recently (and in its own memory of
recent tasks) and, when a result was put, just commits the input. In the
all-in-one the put and the commit are one atomic store operation
(``QueueOps.put_result_and_commit``); over HTTP (split deployment) they are
two calls, and a worker that dies between them leaves a result that the
redelivered input finds, whether or not a client has committed it since.

Prefetch (``flights``, ``--prefetch``, 1 by default): the tasks beyond the running one are checked and
queued on the instance at once, behind it, so the instance never waits for a round trip between two
tasks. Each is its own ``Flight``: its own prompt, progress record, cancel watch and attempt count (a
task queued behind another counts as a run from its ``execution_start``, not from its submit: an
instance that dies under the running task did not run it). A cancel of a queued-ahead task takes it off
the instance's queue; an interrupt targets its own prompt only. With ``--affinity-wait`` the watch
prefers tasks tagged with the models of the last task it handed this worker
(``queue_service.affinity``). A queued-ahead task that a worker which became idle could run now is given
back when the queue asks for it (``queue_service.handback``): taken back if it has not started (never
sent, or taken off the instance's queue; not counted as a run, nothing reported), then released on the
queue for that worker; one that has started already runs here as usual. When the running task's last
sampler step begins the worker says so to the queue, which then fills a slot that waited for a task with
the same models with any task: at a model switch, too, the next task is on the instance before the
current one ends.

Backpressure: a full sink makes the put wait (with backoff) while the worker
holds its uncommitted items, so it takes no more input. An instance that
stops answering for ``instance_down_s`` makes the worker give its item back
(closing its watch cleanly releases it at once) and wait until the instance
is ready again.

A task cut off mid-run (instance gone: ``GiveBack``; worker killed) is run
again by the next worker, at most ``max_attempts`` times in all (a run counts
once the instance has accepted its prompt: a submit to an instance that is
already dead is no run, so it takes none of the task's tries): the count
lives on the ``{service}/attempts`` queue (see ``attempts``), and a worker
that receives a task at the cap puts a ``too_many_attempts`` error result
instead of running it. Webhook URLs are checked again here (``WebhookPolicy``):
items put on the input queue directly never passed the front.

SIGTERM drains (``shutdown``): no more input; the tasks queued ahead on the
instance are taken off it and handed back (not run, not counted); the running
task finishes and is reported, or, past ``--shutdown-timeout``, is interrupted
on the instance and given back like a ``GiveBack`` (a cut-off run: it counts as
an attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any

from queue_service.client import Control, DataFrame, QueueClient, QueueClientError, Watcher
from queue_service.handback import FINISHING, GIVE_BACK, RELEASE
from standard.client import ClientTimeouts, InstanceClient, in_last_step
from standard.errors import InstanceError, InstanceUnavailable, PromptLost, PromptRejected, WorkerError
from standard.retry import QUEUE
from standard.tasks import cancel_and_wait

from . import results
from .attempts import TOO_MANY_ATTEMPTS, AttemptLedger, AttemptRecords, HttpAttemptRecords, Ticket, attempts_of
from .cancel import MESSAGE as CANCEL_MESSAGE
from .cancel import CancelWatch, cancel_of
from .events import EventPublisher, events_of, result_event
from .flights import Flight, Flights
from .graph import GraphError, parse_graph
from .input_bucket import input_bucket
from .input_fetch import FetchFailed, InputFetcher
from .metrics import ApiMetrics
from .outputs import OutputLinks
from .progress import HttpRecords, Records, TaskProgress
from .queue_ops import HttpQueueOps, QueueOps, ResultTooLarge, SinkFull, Transient, Uncommitted
from .runner import Dropped, InstanceRunner
from .settings import MODELS_TAG, TASK_ID_TAG, WEBHOOK_TAG, WorkerSettings, sink_of
from .status import CANCELLED, progress_of
from .webhook import WebhookPolicy, WebhookRefused, WebhookSender

log = logging.getLogger("comfyserve.api.worker")

REMEMBERED_TASKS = 10_000
HEALTH_TIMEOUTS = ClientTimeouts(connect_s=1.0, request_s=2.0, get_retries=0)
RUN_TIMEOUTS = ClientTimeouts(disconnected_s=None)
PROBE_INTERVAL_S = 0.25
RESTART_WATCH_S = 2.0  # after the queue refused the watch, or an unexpected error
QUEUE_RETRY = QUEUE.but(retry_on=(Transient,))  # until the queue answers
REPORT_RETRY = QUEUE.but(retry_on=(Transient, SinkFull, ResultTooLarge))  # a full sink holds the result
COMMIT_RETRY = QUEUE.but(attempts=5, retry_on=(Transient,))
HAND_BACK_S = 10.0  # after a drain's timeout: how long handing the task back (or its last report) may take


def default_worker_id(instance_url: str) -> str:
    """A standalone worker's id (no ``--worker-id``): stable per host and instance URL, which the operator
    chose, so a restarted worker takes over the item its predecessor held.

    The host name is part of it: every GPU host may call its own instance http://127.0.0.1:8000.
    """
    return "worker-" + _digest(f"{socket.gethostname()}|{instance_url}")


def slot_worker_id(deployment: str, slot: int) -> str:
    """The id of worker ``slot`` (0, 1, ...) of one all-in-one ``deployment`` (data dir, port) on this host.

    Not derived from the instance URL: each start gives the local instances new ports, and a worker with
    a new id is a new consumer, whose predecessor's in-flight item waits out ``--pending-timeout``. With
    the same id the restarted worker's watch is that consumer's new session, which the queue hands the
    consumer's pending items at once (``QueueStore.open_session``). Slots are distinct, so two workers of
    one deployment never share an id (the queue would take one for the other reconnecting).
    """
    return f"worker-{_digest(f'{socket.gethostname()}|{deployment}')}-{slot}"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class GiveBack(WorkerError):
    """The instance went away mid-task: release the item for another worker."""


class HandedBack(WorkerError):
    """The queue asked for this queued-ahead task back and it had not started: its flight ends unreported."""


class Worker:
    def __init__(self, settings: WorkerSettings, *, metrics: ApiMetrics | None = None,
                 webhooks: WebhookSender | None = None, ops: QueueOps | None = None,
                 attempts: AttemptRecords | None = None, ours: Callable[[], bool] | None = None,
                 progress: Records | None = None, cancels: Records | None = None,
                 events: Records | None = None) -> None:
        self.settings = settings
        # A spawned instance (``standard.supervised``): is its own child the one answering on the URL?
        self.ours = ours
        self.name = settings.worker_id or default_worker_id(settings.instance_url)
        self.metrics = metrics or ApiMetrics()
        self.stats = self.metrics.worker(self.name)
        token = settings.token
        self.input = QueueClient(settings.queue_url, settings.service, token=token, uid=self.name)
        self.sink = QueueClient(settings.queue_url, sink_of(settings.service), token=token, uid=self.name)
        self.ops = ops or HttpQueueOps(self.input, self.sink)
        self.attempt_records = attempts or HttpAttemptRecords(
            QueueClient(settings.queue_url, attempts_of(settings.service), token=token, uid=self.name))
        self.ledger = AttemptLedger(self.attempt_records, max_attempts=settings.max_attempts,
                                    holder=f"{self.name} on {settings.instance_url}")
        self.webhook_policy = WebhookPolicy(settings.webhook_allow)
        instance_token = settings.instance_token if settings.instance_token is not None else token
        self.instance = InstanceClient(settings.instance_url, instance_token, timeouts=RUN_TIMEOUTS)
        self.runner = InstanceRunner(self.instance)
        self.probe = InstanceClient(settings.instance_url, instance_token, timeouts=HEALTH_TIMEOUTS)
        self._own_webhooks = webhooks is None
        self.webhooks = webhooks or WebhookSender(settings.webhook_secret, policy=self.webhook_policy,
                                                  retry=settings.webhook_retry, on_give_up=self._webhook_failed)
        self.fetcher = InputFetcher(settings.data_dir, allow=settings.input_url_allow, limits=settings.input_limits,
                                    timeout_s=settings.input_fetch_timeout_s, bucket=input_bucket(settings.storage))
        self.outputs = OutputLinks(self.probe, settings.max_inline_output_bytes)
        self.progress = TaskProgress(progress or HttpRecords(QueueClient(
            settings.queue_url, progress_of(settings.service), token=token, uid=self.name)),
            self.name, settings.instance_url)
        self.events = EventPublisher(events or HttpRecords(QueueClient(
            settings.queue_url, events_of(settings.service), token=token, uid=self.name)))
        self.runner.on_event = self._on_instance_event
        self.cancels = CancelWatch(cancels or HttpRecords(QueueClient(
            settings.queue_url, cancel_of(settings.service), token=token, uid=self.name)))
        self.flights = Flights()
        self.loaded_models: str | None = None  # the models tag of the last task sent to the instance
        # Whether the queue service keeps prefetch slots for idle workers (None: not known yet). One that does
        # not (the platform's) would hand this worker tasks ahead while another is idle: one at a time then.
        self.prefetch_served: bool | None = None
        self._giving_back = False  # a task went back: take no more, leave the watch once the others end
        self._reported: OrderedDict[str, None] = OrderedDict()
        self._stopping = False
        self._cut = asyncio.Event()  # drain timeout: the running task goes back to the queue
        self._idle = asyncio.Event()
        self._idle.set()
        self._background: set[asyncio.Task[None]] = set()
        self._watch: Watcher | None = None  # the input watch while one is open

    # -- lifecycle -----------------------------------------------------------------

    async def run(self) -> None:
        """Work until cancelled (or ``shutdown``)."""
        try:
            while not self._stopping:
                await self._wait_instance()
                try:
                    await self._consume()
                except QueueClientError as exc:
                    log.warning("%s: queue refused the watch (%s); retrying", self.name, exc)
                    await asyncio.sleep(RESTART_WATCH_S)
                except Exception:  # never let one bad task end the worker; its item comes back
                    log.exception("%s: unexpected error; restarting the watch", self.name)
                    await asyncio.sleep(RESTART_WATCH_S)
        finally:
            await self.aclose()

    async def shutdown(self, task: asyncio.Task[None], timeout_s: float) -> None:
        """Drain: stop taking input; let the running task finish (result put, input committed) within
        ``timeout_s``; past it, hand the task back (interrupted on the instance, its item released at once
        for another worker, never reported by this one). Then the worker ends."""
        self._stopping = True
        if self._idle.is_set():
            task.cancel()  # waiting for input: leaving the watch is all there is to do
        else:
            await self._hand_back_queued()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):  # not wait_for: on 3.11 it can swallow a cancel
                    await self._idle.wait()
            self._cut.set()
        await asyncio.wait({task}, timeout=HAND_BACK_S)  # past the limit the task goes on: cancelled below, warned
        if not task.done():
            log.warning("%s: the task did not end %.0fs after it was handed back; cancelling", self.name, HAND_BACK_S)
            await cancel_and_wait(task)

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def aclose(self) -> None:
        if self._background:  # bookkeeping of the last task (its attempt records) finishes first
            await asyncio.wait(set(self._background), timeout=5.0)
        for client in (self.input, self.sink):
            await client.aclose()
        await self.attempt_records.aclose()
        await self.runner.aclose()
        await self.instance.aclose()
        await self.probe.aclose()
        await self.fetcher.aclose()
        await self.progress.aclose()
        await self.cancels.aclose()
        await self.events.aclose()
        if self._own_webhooks:
            await self.webhooks.aclose()

    async def _wait_instance(self) -> None:
        logged = False
        while not (self._is_ours() and await self.probe.ready()):
            self.stats.instance_up.set(0)
            if not logged:
                log.warning("%s: instance %s is not ready (down, loading, or refusing the token); waiting",
                            self.name, self.settings.instance_url)
                logged = True
            await asyncio.sleep(PROBE_INTERVAL_S)
        if logged:
            log.info("%s: instance %s is back", self.name, self.settings.instance_url)
        self.stats.instance_up.set(1)

    def _watch_options(self) -> dict[str, str]:
        """The watch's extensions (``queue_service.affinity``): the slots beyond the first are queued ahead
        (filled while no other worker is idle); tasks with the models the instance holds come first."""
        options = {"_prefetch_": "true"} if self._window() > 1 else {}
        if self.settings.affinity_wait_s > 0:
            options.update({"_affinity_": MODELS_TAG, "_affinity_wait_": f"{self.settings.affinity_wait_s:g}s"})
            if self.loaded_models:
                options["_affinity_prefer_"] = self.loaded_models
        return options

    def _window(self) -> int:
        return 1 + self.settings.prefetch if self.prefetch_served is not False else 1

    async def _consume(self) -> None:
        """One watch session: each task handed over runs as its own flight; returns once every flight has
        ended after a task had to go back (instance down) or on stop, so leaving the watch releases only
        the items no flight reported."""
        await self.runner.ready(timeout_s=2.0)
        self._giving_back = False
        failure: BaseException | None = None
        async with self.input.watch(window=self._window(), options=self._watch_options(),
                                    on_control=self._on_control) as frames:
            self._watch = frames
            if self._window() > 1 and self.prefetch_served is None:
                await frames.open()
                self.prefetch_served = "prefetch" in frames.extensions
                if not self.prefetch_served:  # leaving now gives back whatever this watch was handed
                    log.warning("%s: the queue service keeps no slots ahead for idle workers (it ignores "
                                "_prefetch_): taking one task at a time (--prefetch ignored)", self.name)
                    return
            reader: asyncio.Future[DataFrame] | None = None
            try:
                while True:
                    leaving = self._stopping or self._giving_back
                    if reader is None and not leaving:
                        reader = asyncio.ensure_future(anext(frames))
                    waits: set[asyncio.Future[Any]] = {f.task for f in self.flights.by_index.values() if f.task}
                    if reader is not None:
                        waits.add(reader)
                    if not waits or (leaving and len(waits) == (reader is not None)):
                        return
                    done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    if reader is not None and reader in done:
                        got, reader = reader, None
                        if got.exception() is not None:  # the watch ended or was refused: let the flights land
                            self._giving_back = True
                            if not isinstance(got.exception(), StopAsyncIteration):
                                failure = failure or got.exception()
                            continue
                        frame = got.result()
                        if frame.index in self.flights:  # sent again after a reconnect: an ask for it is void
                            self.flights.by_index[frame.index].redelivered = True
                        elif not (self._stopping or self._giving_back):
                            self._take_off(frame)  # else: a frame to leave
                    for flight in list(self.flights.by_index.values()):
                        if flight.task is not None and flight.task in done:
                            failure = self._landed(flight, frames) or failure
            finally:
                self._watch = None
                if reader is not None:
                    reader.cancel()  # safe: the watch stays usable (``Watcher.__anext__``)
                await self._ground_all()
        if failure is not None:
            raise failure

    def _take_off(self, frame: DataFrame) -> None:
        flight = self.flights.add(frame, frame.request_id or f"index-{frame.index}")
        self._idle.clear()
        flight.task = asyncio.create_task(self.handle(flight), name=f"{self.name}-{frame.index}")

    def _landed(self, flight: Flight, frames: Watcher) -> BaseException | None:
        """A flight ended: drop it; a task given back (or an unexpected error) ends the watch once the
        others have ended; one handed back at the queue's ask is released for the idle worker. Returns the
        unexpected error, if any."""
        self.flights.remove(flight)
        if not self.flights.by_index:
            self._idle.set()
        assert flight.task is not None
        if flight.task.cancelled():
            return None
        exc = flight.task.exception()
        if exc is None:
            return None
        if isinstance(exc, HandedBack):
            self._release(flight, frames)
            return None
        self._giving_back = True  # leaving the watch cleanly releases the item to the other workers
        if isinstance(exc, GiveBack):
            log.warning("%s: giving task %s back: %s", self.name, flight.frame.tags.get(TASK_ID_TAG), exc)
            return None
        log.error("%s: unexpected error in task %s", self.name, flight.frame.tags.get(TASK_ID_TAG), exc_info=exc)
        return exc

    async def _ground_all(self) -> None:
        """Leaving the watch with flights still going (the worker is cancelled): end them first."""
        for flight in list(self.flights.by_index.values()):
            if flight.task is not None and not flight.task.done():
                flight.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await flight.task
            self.flights.remove(flight)
        self._idle.set()

    async def _hand_back_queued(self) -> None:
        """Drain: the tasks queued ahead on the instance come off it (not run); they go back to the input
        queue when the watch closes, after the running task is reported."""
        for flight in self.flights.not_started():
            if self.flights.ahead_on_instance(flight):
                await self._take_back(flight)

    def _on_control(self, control: Control) -> None:
        """The queue asks for a queued-ahead task back: a worker that became idle could run it now. Never the
        oldest flight (running, or next to run), and only once per flight."""
        index = control.message.get(GIVE_BACK)
        flight = self.flights.by_index.get(index) if type(index) is int else None
        if flight is None or flight is self.flights.first() or flight.asked_on is not None or self._stopping:
            return
        flight.asked_on = control.connection
        self._in_background(self._hand_back(flight))

    async def _hand_back(self, flight: Flight) -> None:
        """Take the flight back (``_take_back``) if it has not started: it then ends with ``HandedBack``."""
        if flight.ran or flight.redelivered or (flight.task is not None and flight.task.done()):
            return
        flight.handing_back = True
        if not await self._take_back(flight):
            flight.handing_back = False
            log.info("%s: task %s has started: it runs here, not handed back", self.name,
                     flight.frame.tags.get(TASK_ID_TAG))
            return
        log.info("%s: handing task %s back to the queue for an idle worker", self.name,
                 flight.frame.tags.get(TASK_ID_TAG))

    def _release(self, flight: Flight, frames: Watcher) -> None:
        """A flight handed back has ended: release its item on the queue, on the connection that asked for it.
        Sent again since (the watch reconnected, or resent what it holds), the item is this worker's again:
        it runs here after all."""
        assert flight.asked_on is not None
        if self._stopping or self._giving_back:
            return  # leaving the watch releases it with the rest
        if flight.redelivered or frames.connection != flight.asked_on:
            self._take_off(flight.frame)
            return
        # Not sent (the connection went meanwhile): the new session sends the item again, and it runs here.
        self._in_background(self._tell(frames, {RELEASE: flight.frame.index}, flight.asked_on))

    async def _take_back(self, flight: Flight) -> bool:
        """Keep ``flight`` from running: not sent yet, it never will be; queued on the instance, it comes
        off. False when it has started there already."""
        if not flight.submitting:
            flight.held = True
            flight.sent.set()
            return True
        await flight.sent.wait()
        if flight.started or flight.ran:
            return False
        try:
            flight.dropped = await self.runner.drop(flight.prompt_id)
        except InstanceError as exc:
            log.info("%s: could not take prompt %s off the instance's queue: %s", self.name, flight.prompt_id, exc)
            return False
        return flight.dropped

    # -- one task ---------------------------------------------------------------------

    async def handle(self, flight: Flight) -> None:
        frame, request_id = flight.frame, flight.request_id
        if request_id in self._reported:
            await self._skip_reported(frame, request_id)
            return
        # The sink lookup overlaps the graph check and the attempts read, and is answered before the run:
        # a task whose result is on the sink, or was committed from it (its worker died between the put
        # and the input's commit), is committed here, never run again.
        reported = asyncio.create_task(self._in_sink(request_id))
        started = time.monotonic()
        prompt_id: str | None = None
        ticket = Ticket(request_id)
        graph: dict[str, Any] | None = None
        try:
            try:
                graph = parse_graph(frame.data)  # items put on the queue directly skip the front's checks
                await self.fetcher.prepare(frame.data)  # the task's URL inputs (input_fetch)
            except (GraphError, FetchFailed) as exc:
                graph = None  # not run: the failure is its result
                status, events = results.from_failure(exc.kind, str(exc))
            else:
                ticket = await self.ledger.check(request_id)
            already = await reported
        finally:
            if not reported.done():
                reported.cancel()
        if already:
            await self._skip_reported(frame, request_id)
            await self.ledger.finish(ticket)
            return
        async with contextlib.AsyncExitStack() as record:
            if graph is not None:
                if ticket.exhausted is not None:
                    status, events = results.from_failure(TOO_MANY_ATTEMPTS, ticket.message())
                else:
                    # Its progress record stays until the result is on the sink: held by the worker with no
                    # record, a task answers queued (``status``), which it must not once it has run.
                    await record.enter_async_context(self.progress.running(request_id, queued=None))
                    status, events, prompt_id = await self._watched_attempt(graph, ticket, flight)
                    if status == "success":
                        await self.outputs.annotate(events, frame.tags)  # urls, inline bytes (outputs)
            if ticket.exhausted is not None:
                log.warning("%s: task %s is not run again: %s", self.name, frame.tags.get(TASK_ID_TAG),
                            ticket.message())
                self.stats.abandoned.inc()
            tags = {**frame.tags, results.STATUS_TAG: status}
            tags[TASK_ID_TAG] = tags.get(TASK_ID_TAG) or request_id
            tags["requestId"] = request_id
            if prompt_id:
                tags[results.PROMPT_ID_TAG] = prompt_id
            tags.pop(WEBHOOK_TAG, None)
            tags.pop(MODELS_TAG, None)
            sink_index = await self._report(results.encode(events), tags, frame.index)
        self.events.publish(request_id, result_event(status))  # GET /api_events: the result is on the sink
        if status == "error" and events and events[0].get("data", {}).get("exception_type") == CANCELLED:
            self._in_background(self.cancels.forget(request_id))
        self._in_background(self.fetcher.release(frame.data))
        self._remember(request_id)
        self._in_background(self.ledger.finish(ticket))  # the next task need not wait for it
        self.stats.finished(status, time.monotonic() - started)
        webhook = frame.tags.get(WEBHOOK_TAG)
        if webhook:
            try:
                self.webhook_policy.check(webhook)
            except WebhookRefused as exc:
                log.warning("%s: not delivering the webhook of task %s: %s", self.name, tags[TASK_ID_TAG], exc)
                self._webhook_failed()
                return
            self.webhooks.send(webhook, {"task_id": tags[TASK_ID_TAG], "request_id": request_id,
                                         "status": status, "index": sink_index, "result": events})

    async def _skip_reported(self, frame: DataFrame, request_id: str) -> None:
        self.stats.redeliveries.inc()
        log.info("%s: task %s was already reported; committing it", self.name, frame.tags.get(TASK_ID_TAG))
        self._remember(request_id)
        await self._commit(frame.index)
        self._in_background(self.fetcher.release(frame.data))

    async def _watched_attempt(self, graph: dict[str, Any], ticket: Ticket,
                               flight: Flight) -> tuple[str, list[Any], str | None]:
        """``_attempt`` with its cancel records watched (``POST /api_task/cancel``): a cancelled task is not
        run, or is interrupted (queued on the instance: taken off its queue), and reported cancelled."""
        request_id = flight.request_id
        async with self.cancels.watching(request_id, lambda: self._stop(flight)) as cancel:
            if cancel.requested:
                return (*results.from_failure(CANCELLED, CANCEL_MESSAGE), None)
            status, events, prompt_id = await self._attempt(graph, ticket, flight)
        if cancel.requested and status != "success":  # a run that finished first keeps its result
            status, events = results.from_failure(CANCELLED, CANCEL_MESSAGE)
        return status, events, prompt_id

    def _on_instance_event(self, item: dict[str, Any]) -> None:
        """An event of one of the worker's prompts: its task's progress record and event stream (``events``);
        a queued-ahead task's ``execution_start`` makes it the running one, and counts its run."""
        flight = self.flights.by_prompt.get(str(item["data"].get("prompt_id")))
        if flight is None:
            return
        if item.get("type") == "execution_start" and not flight.started:
            flight.started = True
            if flight.on_start is not None:
                flight.on_start()
        elif item.get("type") == "progress" and flight.started and in_last_step(item["data"], flight.prompt_id):
            self._finishing(flight)
        self.progress.event(flight.request_id, item)
        self.events.publish(flight.request_id, item)

    def _finishing(self, flight: Flight) -> None:
        """The running task is in its last sampler step (``in_last_step``): tell the queue, so a slot ahead that
        waits for a task with the same models takes any (``queue_service.handback``); at a model switch the
        next task is then on the instance before this one ends. Only with a slot ahead and a model
        preference."""
        watch = self._watch
        if (flight.finishing or watch is None or self._window() < 2 or self.settings.affinity_wait_s <= 0
                or flight is not self.flights.first()):
            return
        flight.finishing = True
        self._in_background(self._tell(watch, {FINISHING: flight.frame.index}, watch.connection))

    @staticmethod
    async def _tell(watch: Watcher, message: dict[str, Any], connection: int) -> None:
        """A text message to the queue on one connection of the watch (not sent if it has gone)."""
        await watch.send(message, connection=connection)

    async def _stop(self, flight: Flight) -> None:
        """A cancel: a task not started on the instance comes off its queue; a running one is interrupted
        (its own prompt only: the instance ignores an interrupt of a prompt it is not running)."""
        if not await self._take_back(flight) and flight.submitting and not flight.held:
            await self.probe.interrupt(flight.prompt_id)

    async def _attempt(self, graph: dict[str, Any], ticket: Ticket,
                       flight: Flight) -> tuple[str, list[Any], str | None]:
        """One run, counted once the instance has accepted the prompt (a submit that never reached it is
        no run) or, queued behind another, once it starts; a run cut off keeps its count, with the
        reason, for the next worker."""
        with self.stats.in_flight.track_inprogress():
            try:
                return await self._run(graph, flight, ticket)
            except GiveBack as exc:
                await self.ledger.give_back(ticket, str(exc))
                raise

    async def _run(self, graph: dict[str, Any], flight: Flight,
                   ticket: Ticket) -> tuple[str, list[Any], str | None]:
        """Run on the instance while a watchdog checks it stays reachable; ``GiveBack`` if not, or if
        a drain's timeout cuts the run (then the prompt is interrupted on the instance first), or if a
        drain took it off the instance's queue before it started (then it counts as no run)."""
        await flight.turn()
        if self._stopping and self.flights.ahead_on_instance(flight):
            flight.held = True
        if flight.held:  # taken back before it went to the instance: by a drain, the queue, or a cancel
            flight.sent.set()
            if flight.handing_back:
                raise HandedBack(f"the queue asked for task {flight.request_id} back before it went to the instance")
            if self._stopping:
                raise GiveBack(f"worker {self.name} is shutting down: the task had not started")
            return (*results.from_failure(CANCELLED, CANCEL_MESSAGE), None)
        prompt_id = flight.prompt_id
        flight.behind = self.flights.ahead_on_instance(flight)
        self.progress.queued(flight.request_id, flight.behind)
        flight.started = not flight.behind
        flight.submitting = True
        flight.on_start = (lambda: self.ledger.record(ticket)) if flight.behind else None
        if flight.frame.tags.get(MODELS_TAG):
            self.loaded_models = flight.frame.tags[MODELS_TAG]

        def accepted(_: str) -> None:
            flight.sent.set()
            if not flight.behind:
                self.ledger.accepted(ticket)

        if not flight.behind:
            await self.ledger.count_before_submit(ticket)
        run = asyncio.create_task(self.runner.run(graph, timeout_s=self.settings.run_timeout_s, prompt_id=prompt_id,
                                                  on_accepted=accepted, queued=flight.behind))
        watchdog = asyncio.create_task(self._instance_down())
        cut = asyncio.create_task(self._cut.wait())
        try:
            await asyncio.wait({run, watchdog, cut}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watchdog.cancel()
            cut.cancel()
            if not run.done():
                run.cancel()
            flight.ran = True
            flight.sent.set()
        if not run.done() or run.cancelled():
            with contextlib.suppress(Exception):
                await cancel_and_wait(run)
            if self._cut.is_set():
                with contextlib.suppress(InstanceError):
                    if not await self.runner.drop(prompt_id):  # still queued there: it comes off
                        await self.probe.interrupt(prompt_id)
                raise GiveBack(f"worker {self.name} is shutting down and its --shutdown-timeout has passed")
            raise GiveBack(f"instance {self.settings.instance_url} unreachable for {self.settings.instance_down_s}s")
        try:
            result = run.result()
        except PromptRejected as exc:
            return (*results.from_rejection(exc), None)
        except (Dropped, PromptLost) as exc:
            if not (flight.dropped or isinstance(exc, Dropped)):
                raise GiveBack(str(exc)) from exc
            if flight.handing_back:
                raise HandedBack(f"the queue asked for task {flight.request_id} back before it started") from exc
            if self._stopping:
                raise GiveBack(f"worker {self.name} is shutting down: the task had not started") from exc
            return (*results.from_failure(CANCELLED, CANCEL_MESSAGE), None)  # a cancel took it off the queue
        except InstanceUnavailable as exc:
            raise GiveBack(str(exc)) from exc
        except InstanceError as exc:
            return (*results.from_failure("instance_error", str(exc)), None)
        return (*results.from_run(result), result.prompt_id)

    def _is_ours(self) -> bool:
        return self.ours is None or self.ours()

    async def _instance_down(self) -> None:
        """Returns once the instance has failed its health check for ``instance_down_s``."""
        down_since: float | None = None
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            if self._is_ours() and await self.probe.health():
                down_since = None
                continue
            now = time.monotonic()
            down_since = down_since or now
            if now - down_since >= self.settings.instance_down_s:
                self.stats.instance_up.set(0)
                return

    # -- queue calls ------------------------------------------------------------------

    async def _in_sink(self, request_id: str) -> bool:
        return await QUEUE_RETRY.call(lambda: self.ops.in_sink(request_id), what=f"{self.name}: sink lookup",
                                      log=log)

    async def _report(self, data: bytes, tags: dict[str, str], index: int) -> int:
        """Put the result and commit input ``index`` until it succeeds; returns the sink index.

        A full sink blocks here with the input uncommitted, so no further input is taken. A put whose
        outcome is unknown is looked up before it is tried again (``StoreQueueOps``) or is tried again
        under the same idempotency key (``HttpQueueOps``): either way the sink gets one result.
        """
        async def once() -> int:
            nonlocal data, tags
            try:
                return await self.ops.put_result_and_commit(data, tags, index)
            except Uncommitted as exc:  # split deployment: the result is on the sink, the commit failed
                await self._commit(index)
                return exc.sink_index
            except ResultTooLarge:  # the next try puts an error result in its place
                message = f"the result ({len(data)} bytes) exceeds the sink's payload limit"
                data = results.encode(results.from_failure("result_too_large", message)[1])
                tags = {**tags, results.STATUS_TAG: "error"}
                raise

        return await REPORT_RETRY.call(once, what=f"{self.name}: sink put", log=log)

    async def _commit(self, index: int) -> None:
        # Left uncommitted after its tries: it comes back, and the sink lookup commits it then.
        with contextlib.suppress(Transient):
            await COMMIT_RETRY.call(lambda: self.ops.commit(index), what=f"{self.name}: commit {index}", log=log)

    def _remember(self, request_id: str) -> None:
        self._reported[request_id] = None
        self._reported.move_to_end(request_id)
        while len(self._reported) > REMEMBERED_TASKS:
            self._reported.popitem(last=False)

    def _webhook_failed(self) -> None:
        self.metrics.webhook_failures.inc()
