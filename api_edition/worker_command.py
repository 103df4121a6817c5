"""``comfyserve worker``: one worker for the split deployment (queue on one host, instances on others).

    comfyserve worker --queue-url http://queue:9000 --service svc --instance-url http://127.0.0.1:8000 --token T
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from standard.auth import AccessGuard
from standard.errors import ConfigError
from standard.options import add_option, port_number
from standard.private import add_secret_option
from standard.serving import Role, add_shutdown_timeout_option, shutdown_timeout_of, stop_event
from standard.storage.location import is_oss_url
from standard.storage.settings import add_storage_arguments, storage_settings_from_args

from .command import add_limit_arguments, limit_settings
from .dispatch_options import add_dispatch_arguments, dispatch_settings
from .input_options import add_input_arguments, input_settings
from .settings import DEFAULT_INSTANCE_DOWN_S, DEFAULT_SERVICE, WorkerSettings
from .worker import Worker

log = logging.getLogger("comfyserve.api.worker")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--queue-url", default=None, help="the queue service (http://host:port)")
    add_option(parser, "--service", default=DEFAULT_SERVICE, help="service name: input queue NAME, results NAME/sink")
    add_option(parser, "--instance-url", default=None, help="the instance this worker feeds")
    add_secret_option(parser, "--token", help="the queue service's token")
    add_secret_option(parser, "--instance-token", help="the instance's token (default: --token)")
    add_option(parser, "--worker-id", default=None,
               help="consumer id on the queue; a restarted worker with the same id takes its unfinished task "
                    "back at once (default: derived from the host name and --instance-url; set it where "
                    "either changes across restarts, e.g. to a StatefulSet pod name)")
    add_option(parser, "--instance-down-timeout", type=float, default=DEFAULT_INSTANCE_DOWN_S,
               help="seconds the instance may be unreachable mid-task before the task is given back")
    add_option(parser, "--run-timeout", type=float, default=None,
               help="seconds one task may run before it is reported as failed (default: no limit)")
    add_secret_option(parser, "--webhook-secret",
                      help="HMAC-SHA256 key for webhook signatures (without it webhooks go unsigned)")
    add_option(parser, "--metrics-port", type=port_number, default=None,
               help="serve GET /metrics (Prometheus text) and /healthz on 127.0.0.1:PORT (needs --token if set)")
    add_limit_arguments(parser)
    add_shutdown_timeout_option(parser)
    add_option(parser, "--data-dir", default=None,
               help="the instance's data dir (shared): where tasks' URL inputs are fetched to and removed from; "
                    "oss://BUCKET/PREFIX: they go through a local mirror to the bucket (and are removed from it)")
    add_input_arguments(parser, front=False)
    add_dispatch_arguments(parser)
    add_storage_arguments(parser.add_argument_group("object storage (OSS), for an oss:// --data-dir"))


def settings_from_args(args: argparse.Namespace) -> WorkerSettings:
    if not args.queue_url:
        raise ConfigError("--queue-url is required")
    if not args.instance_url:
        raise ConfigError("--instance-url is required")
    if args.instance_down_timeout <= 0:
        raise ConfigError("--instance-down-timeout must be positive")
    max_attempts, webhook_allow = limit_settings(args)
    storage = storage_settings_from_args(args, args.data_dir) if is_oss_url(args.data_dir) else None
    if storage is not None:
        data_dir: Path | None = storage.local_root  # the local mirror; the instances read the bucket
    else:
        data_dir = Path(args.data_dir).expanduser().resolve() if args.data_dir else None
    return WorkerSettings(
        queue_url=args.queue_url, service=args.service, instance_url=args.instance_url,
        token=args.token or None, instance_token=args.instance_token, worker_id=args.worker_id,
        webhook_secret=args.webhook_secret, instance_down_s=args.instance_down_timeout,
        run_timeout_s=args.run_timeout, max_attempts=max_attempts, webhook_allow=webhook_allow,
        shutdown_timeout_s=shutdown_timeout_of(args),
        data_dir=data_dir, storage=storage, **input_settings(args), **dispatch_settings(args),
    )


def start(args: argparse.Namespace) -> Coroutine[Any, Any, int]:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per queue call is noise
    return serve(settings_from_args(args), metrics_port=args.metrics_port)


async def serve(settings: WorkerSettings, *, metrics_port: int | None = None) -> int:
    if not settings.webhook_secret:
        log.warning("webhooks go unsigned: no --webhook-secret (the service token is never the webhook key)")
    worker = Worker(settings)
    runner = await _serve_metrics(worker, metrics_port) if metrics_port else None
    task = asyncio.create_task(worker.run(), name=worker.name)
    try:
        return await _until_stopped(worker, task, settings)
    finally:
        if runner is not None:
            await runner.cleanup()


async def _serve_metrics(worker: Worker, port: int) -> web.AppRunner:
    """This worker's counters for Prometheus (the queue depths come from the front's /metrics)."""

    async def metrics(request: web.Request) -> web.StreamResponse:
        return worker.metrics.response()

    async def healthz(request: web.Request) -> web.StreamResponse:
        up = worker.metrics.value("comfyserve_api_worker_instance_up", worker=worker.name) == 1
        return web.json_response({"status": "ok", "instance_up": up})

    guard = AccessGuard(token=worker.settings.token, public_paths={"/healthz"}, login_path=None)
    app = web.Application(middlewares=[guard.middleware])
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on 127.0.0.1:{port} (--metrics-port): {exc}") from None
    return runner


async def _until_stopped(worker: Worker, task: asyncio.Task[None], settings: WorkerSettings) -> int:
    stop = stop_event()
    print(f"comfyserve worker {worker.name}: {settings.queue_url} service {settings.service!r} -> "
          f"{settings.instance_url}", flush=True)
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        stopper.cancel()
        exc = task.exception()
        if exc is not None:
            print(f"comfyserve worker: {exc!r}", file=sys.stderr, flush=True)
            return 1
        return 0
    log.info("stopping: finishing the running task (up to %.0fs)", settings.shutdown_timeout_s)
    await worker.shutdown(task, settings.shutdown_timeout_s)
    return 0


ROLE = Role("worker", "one API-edition worker: input queue -> instance -> sink", add_arguments, start)
