"""The API edition's apps and its pool of instances + workers.

All-in-one: the queue service's own app (``queue_service.server.create_app``:
``/api/predict/{queue}``, its store, auth and watch sockets) with the front's
routes added, so one port serves ``/api_prompt``, ``/api/predict/{service}/
api_prompt``, ``/api/predict/{service}`` and ``/api/predict/{service}/sink``.
Stateless front (``queue_url``): only the front, putting over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web

from queue_service.server import STORE_KEY
from queue_service.server import create_app as create_queue_app
from queue_service.settings import QueueSettings
from queue_service.store import QueueStore
from standard.auth import AccessGuard
from standard.serving import drain_of
from standard.supervised import StandardChild

from .attempts import StoreAttemptRecords
from .cancel import CANCELLER_KEY, Canceller, cancel_of
from .events import HUB_KEY, EventHub, events_of
from .front import INBOX_KEY, METRICS_KEY, SETTINGS_KEY, add_front_routes
from .inbox import RemoteInbox, StoreInbox
from .metrics import ApiMetrics
from .progress import StoreRecords
from .queue_ops import StoreQueueOps
from .settings import ApiSettings, WorkerSettings
from .status import INDEX_KEY, STATUS_KEY, RemoteTaskIndex, TaskStatus, progress_of
from .webhook import WebhookPolicy, WebhookSender, webhook_secret
from .worker import Worker, slot_worker_id

log = logging.getLogger("comfyserve.api")


def queue_settings(settings: ApiSettings) -> QueueSettings:
    return QueueSettings(
        host=settings.host, port=settings.port, token=settings.token, sqlite_path=settings.sqlite_path,
        redis_url=settings.redis_url, redis_call_timeout_s=settings.redis_call_timeout_s,
        max_length=settings.max_length, max_payload_bytes=settings.max_payload_bytes,
        pending_timeout_s=settings.pending_timeout_s, access=settings.access,
    )


def create_api_app(settings: ApiSettings) -> web.Application:
    """The all-in-one app (queue + front), or the stateless front when ``settings.queue_url`` is set."""
    if settings.queue_url is not None:
        guard = AccessGuard(settings.access, token=settings.token, public_paths={"/healthz"}, login_path=None)
        app = web.Application(middlewares=[guard.middleware], client_max_size=settings.max_payload_bytes + 65536)
        inbox = RemoteInbox(settings.queue_url, settings.service, settings.token)

        async def healthz(request: web.Request) -> web.StreamResponse:
            return web.json_response({"status": "ok", "queue": settings.queue_url})

        app[INDEX_KEY] = task_index = RemoteTaskIndex(settings.queue_url, settings.service, settings.token)

        async def close_inbox(app: web.Application) -> None:
            await inbox.aclose()
            await task_index.aclose()

        app.router.add_get("/healthz", healthz)
        app.on_cleanup.append(close_inbox)
        app[INBOX_KEY] = inbox
    else:
        app = create_queue_app(queue_settings(settings))
        app[INBOX_KEY] = StoreInbox(app[STORE_KEY], settings.service, settings.max_length)
        app[STATUS_KEY] = status = TaskStatus(app[STORE_KEY], settings.service)
        app[CANCELLER_KEY] = Canceller(app[STORE_KEY], settings.service, settings.max_length, status)
        app[HUB_KEY] = hub = EventHub(app[STORE_KEY], settings.service)

        async def close_status(app: web.Application) -> None:
            await hub.aclose()
            await status.aclose()

        app.on_shutdown.append(close_status)
    app[SETTINGS_KEY] = settings
    app[METRICS_KEY] = ApiMetrics()
    add_front_routes(app, settings)
    drain_of(app)  # ``running`` adds the pool's drain
    return app


class Pool:
    """The local instances and one worker per instance (spawned or listed)."""

    def __init__(self, settings: ApiSettings, queue_url: str, metrics: ApiMetrics,
                 store: QueueStore | None = None) -> None:
        self.settings = settings
        self.store = store
        self.queue_url = queue_url
        self.metrics = metrics
        self.instances: list[StandardChild] = []
        self.workers: list[tuple[Worker, asyncio.Task[None]]] = []
        self.webhooks = WebhookSender(None, policy=WebhookPolicy(self.settings.webhook_allow),  # keyed in start()
                                      retry=settings.webhook_retry,
                                      on_give_up=self._webhook_failed)

    def _webhook_failed(self) -> None:
        self.metrics.webhook_failures.inc()

    async def start(self) -> None:
        self.webhooks.secret = await asyncio.to_thread(webhook_secret, self.settings.webhook_secret,
                                                       self.settings.data_dir)
        if self.webhooks.secret is None:
            log.warning("webhooks go unsigned: no --webhook-secret and no data dir to keep one in")
        urls = list(self.settings.instance_urls)
        instance_token = self.settings.instance_token
        if not urls and self.settings.instances > 0:
            if self.settings.data_dir is None:
                raise ValueError("local instances need a data dir")
            taken = {self.settings.port}  # ours: listened on, but a child must not be given it
            for index in range(self.settings.instances):
                # The token goes in the child's environment: on the command line every local user sees it.
                instance = StandardChild(f"instance {index}", self.settings.data_dir, token=self.settings.token,
                                         extra_args=self.settings.instance_args, avoid_ports=taken)
                taken.add(instance.port)
                instance.start()
                self.instances.append(instance)
            urls = [instance.url for instance in self.instances]
            instance_token = self.settings.token
            # Let the supervisors fork the children now, not after the workers are built below (a second
            # or so: each worker's HTTP clients load TLS contexts): a restart's in-flight tasks wait for them.
            await asyncio.sleep(0)
        # A spawned instance's worker waits for that very child, not whatever answers on its port.
        gates: list[Callable[[], bool] | None] = [i.answering for i in self.instances] or [None] * len(urls)
        for slot, (url, ours) in enumerate(zip(urls, gates, strict=True)):
            worker_id = slot_worker_id(self.deployment(), slot)
            worker = Worker(WorkerSettings(
                queue_url=self.queue_url, service=self.settings.service, instance_url=url, worker_id=worker_id,
                token=self.settings.token,
                instance_token=instance_token if instance_token is not None else self.settings.token,
                instance_down_s=self.settings.instance_down_s, run_timeout_s=self.settings.run_timeout_s,
                max_attempts=self.settings.max_attempts, webhook_allow=self.settings.webhook_allow,
                webhook_retry=self.settings.webhook_retry, data_dir=self.settings.data_dir,
                input_limits=self.settings.input_limits, input_url_allow=self.settings.input_url_allow,
                input_fetch_timeout_s=self.settings.input_fetch_timeout_s,
                max_inline_output_bytes=self.settings.max_inline_output_bytes, storage=self.settings.storage,
                prefetch=self.settings.prefetch, affinity_wait_s=self.settings.affinity_wait_s,
            ), metrics=self.metrics, webhooks=self.webhooks, ops=self._store_ops(), attempts=self._store_attempts(),
                ours=ours, progress=self._store_records(progress_of(self.settings.service)),
                cancels=self._store_records(cancel_of(self.settings.service)),
                events=self._store_records(events_of(self.settings.service)))
            self.workers.append((worker, asyncio.create_task(worker.run(), name=worker.name)))

    def deployment(self) -> str:
        """What tells this all-in-one from others on the host (and on a shared Redis) and stays the same
        across its restarts: its data dir and its port (two at once on one data dir need two ports)."""
        return f"{self.settings.data_dir}|{self.settings.port}"

    def _store_ops(self) -> StoreQueueOps | None:
        """In the queue's own process the worker's put/commit/lookup skip HTTP."""
        if self.store is None:
            return None
        return StoreQueueOps(self.store, self.settings.service, max_length=self.settings.max_length,
                             max_payload_bytes=self.settings.max_payload_bytes)

    def _store_records(self, queue: str) -> StoreRecords | None:
        return StoreRecords(self.store, queue) if self.store is not None else None

    def _store_attempts(self) -> StoreAttemptRecords | None:
        if self.store is None:
            return None
        return StoreAttemptRecords(self.store, self.settings.service, max_length=self.settings.max_length)

    async def drain(self, timeout_s: float) -> None:
        """Every worker finishes its running task within ``timeout_s`` or hands it back; the instances
        stay up meanwhile (``stop`` ends them)."""
        await asyncio.gather(*(worker.shutdown(task, timeout_s) for worker, task in self.workers),
                             return_exceptions=True)

    async def stop(self) -> None:
        await self.drain(0.0)  # no-op after a drain: the workers have ended
        await asyncio.gather(*(instance.stop() for instance in self.instances), return_exceptions=True)
        await self.webhooks.aclose()


def local_queue_url(settings: ApiSettings, port: int) -> str:
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass
class Running:
    app: web.Application
    pool: Pool | None

    @property
    def metrics(self) -> ApiMetrics:
        return self.app[METRICS_KEY]


@contextlib.asynccontextmanager
async def running(settings: ApiSettings) -> AsyncIterator[Running]:
    """Serve the app on ``settings.host:port`` and run the pool, for the CLI, tests and the bench.

    On the way out the app drains first (``/api_prompt`` answers 503, the workers finish or hand back
    their tasks while the queue still serves them), then the instances stop, then the site closes.
    """
    app = create_api_app(settings)
    runner = web.AppRunner(app, shutdown_timeout=5.0, access_log=None)
    await runner.setup()
    pool: Pool | None = None
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        if settings.queue_url is None:
            pool = Pool(settings, local_queue_url(settings, settings.port), app[METRICS_KEY], app[STORE_KEY])
            drain_of(app).hooks.append(pool.drain)
            await pool.start()
        yield Running(app, pool)
    finally:
        await drain_of(app).run(settings.shutdown_timeout_s)
        if pool is not None:
            await pool.stop()
        await runner.cleanup()

