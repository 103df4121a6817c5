"""``comfyserve api`` / ``python -m api_edition``: the API edition.

All-in-one (default): the queue service (SQLite under ``--data-dir``, or
``--redis-url``), the ``/api_prompt`` front, ``--instances N`` local
instances each with its worker — or one worker per ``--instance-url``.
With ``--queue-url`` it is only a stateless front for a queue service that
runs elsewhere (run several behind a load balancer). Every flag also reads
``COMFYSERVE_<FLAG>``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from queue_service.command import add_redis_call_timeout_option, redis_call_timeout_of
from queue_service.settings import DEFAULT_MAX_LENGTH, DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_PENDING_TIMEOUT_S
from standard.datadir import usable_data_dir
from standard.errors import ConfigError
from standard.listen import add_listen_arguments, listen_settings_from_args
from standard.options import add_option
from standard.private import add_secret_option
from standard.serving import Role, stop_event
from standard.storage.settings import add_storage_arguments, instance_flags, storage_settings_from_args

from .dispatch_options import add_dispatch_arguments, dispatch_settings
from .input_options import add_input_arguments, input_settings
from .settings import DEFAULT_INSTANCE_DOWN_S, DEFAULT_MAX_ATTEMPTS, DEFAULT_PORT, DEFAULT_SERVICE, ApiSettings
from .webhook import WebhookPolicy, WebhookRefused

log = logging.getLogger("comfyserve.api")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_storage_arguments(parser.add_argument_group("object storage (OSS), passed on to local instances"))
    add_option(parser, "--data-dir", default=None,
               help="data dir of the local instances; the SQLite queue is DIR/queue/queue.sqlite3")
    add_listen_arguments(parser, default_port=DEFAULT_PORT, port_help="port of the front and the queue routes",
                         token_help="service token: 'Authorization: <token>' or 'Bearer <token>' on every call "
                                    "but /healthz")
    add_option(parser, "--service", default=DEFAULT_SERVICE,
               help="service name: input queue NAME, results on NAME/sink")
    add_option(parser, "--instances", type=int, default=1,
               help="local instances (embedded engine) to spawn, each with its worker (0: none)")
    add_option(parser, "--instance-url", action="append", default=[],
               help="run workers for this instance instead of spawning (repeatable)")
    add_secret_option(parser, "--instance-token", help="token of the --instance-url instances")
    add_option(parser, "--redis-url", default=None, help="keep the queues in Redis (redis://host:port/db)")
    add_redis_call_timeout_option(parser)
    add_option(parser, "--queue-url", default=None,
               help="be a stateless front for the queue service at this URL (no queue, no workers here)")
    add_option(parser, "--max-length", type=int, default=DEFAULT_MAX_LENGTH,
               help="items a queue may hold; /api_prompt answers 429 when the input queue is full")
    add_option(parser, "--dedupe-task-id", action="store_true", default=False,
               help="make task_id a key: /api_prompt with a task_id seen in the last 24 h answers that task "
                    "(index, requestId) and queues nothing, as an Idempotency-Key header does (default: a "
                    "task_id is a label, two puts with one task_id are two tasks, as on the platform)")
    add_option(parser, "--max-payload", type=int, default=DEFAULT_MAX_PAYLOAD_BYTES,
               help="largest workflow / result in bytes (bigger workflows get 413)")
    add_option(parser, "--pending-timeout", type=float, default=DEFAULT_PENDING_TIMEOUT_S,
               help="seconds a task stays with a worker that vanished before another worker gets it")
    add_option(parser, "--instance-down-timeout", type=float, default=DEFAULT_INSTANCE_DOWN_S,
               help="seconds an instance may be unreachable mid-task before its worker gives the task back")
    add_option(parser, "--run-timeout", type=float, default=None,
               help="seconds a task may run before it is interrupted and reported as failed (default: no limit)")
    add_secret_option(parser, "--webhook-secret",
                      help="HMAC-SHA256 key for webhook signatures "
                           "(default: one kept in DIR/.comfyserve/webhook_secret)")
    add_limit_arguments(parser)
    add_input_arguments(parser, front=True)
    add_dispatch_arguments(parser)


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """``--max-attempts`` and ``--webhook-allow``: shared by ``comfyserve api`` and ``comfyserve worker``."""
    add_option(parser, "--max-attempts", type=int, default=DEFAULT_MAX_ATTEMPTS,
               help="runs of a task that may be cut off mid-task (instance or worker died) before it is "
                    "reported as an error instead of run again (0: no cap)")
    add_option(parser, "--webhook-allow", action="append", default=[], metavar="PREFIX",
               help="webhook URLs must start with this scheme://host[:port]/path (repeatable; env: "
                    "comma-separated). Default: any URL except localhost and non-public IP addresses")


def limit_settings(args: argparse.Namespace) -> tuple[int, tuple[str, ...]]:
    """The checked (max_attempts, webhook_allow) of ``add_limit_arguments``."""
    if args.max_attempts < 0:
        raise ConfigError("--max-attempts must be >= 0 (0: no cap)")
    allow = tuple(prefix.strip() for prefix in args.webhook_allow or () if prefix.strip())
    try:
        WebhookPolicy(allow)
    except WebhookRefused as exc:
        raise ConfigError(f"--webhook-allow: {exc}") from None
    return args.max_attempts, allow


def settings_from_args(args: argparse.Namespace) -> ApiSettings:
    listen = listen_settings_from_args(args)
    if args.instances < 0:
        raise ConfigError("--instances must be >= 0")
    if args.max_length < 0 or args.max_payload <= 0 or args.pending_timeout <= 0:
        raise ConfigError("--max-length must be >= 0; --max-payload and --pending-timeout positive")
    max_attempts, webhook_allow = limit_settings(args)
    storage = storage_settings_from_args(args, args.data_dir)
    if storage is not None and storage.location is not None:
        data_dir: Path | None = storage.local_root  # the local mirror of oss://; instances get the bucket
    else:
        data_dir = Path(args.data_dir).expanduser().resolve() if args.data_dir else None
    sqlite_path = None
    if args.queue_url is None:
        if data_dir is None:
            raise ConfigError("--data-dir is required (or --queue-url for a stateless front)")
        if not args.redis_url:
            sqlite_path = data_dir / "queue" / "queue.sqlite3"
    if args.redis_url and not str(args.redis_url).startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"--redis-url must start with redis://, rediss:// or unix://, got {args.redis_url!r}")
    return ApiSettings(
        host=listen.host, port=listen.port, token=listen.token, service=args.service,
        data_dir=data_dir, queue_url=args.queue_url, redis_url=args.redis_url or None, sqlite_path=sqlite_path,
        redis_call_timeout_s=redis_call_timeout_of(args), dedupe_task_id=args.dedupe_task_id,
        instances=args.instances, instance_urls=tuple(args.instance_url or ()),
        instance_token=args.instance_token, max_length=args.max_length, max_payload_bytes=args.max_payload,
        pending_timeout_s=args.pending_timeout, webhook_secret=args.webhook_secret,
        instance_down_s=args.instance_down_timeout, run_timeout_s=args.run_timeout,
        instance_args=tuple(instance_flags(storage)) if storage is not None else (),
        storage=storage if storage is not None and storage.location is not None else None,
        max_attempts=max_attempts, webhook_allow=webhook_allow, shutdown_timeout_s=listen.shutdown_timeout_s,
        access=listen.access, **input_settings(args), **dispatch_settings(args),
    )


def start(args: argparse.Namespace) -> Coroutine[Any, Any, int]:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per queue call is noise
    settings = settings_from_args(args)
    if settings.data_dir is not None:
        usable_data_dir(settings.data_dir)
    return serve(settings)


async def serve(settings: ApiSettings) -> int:
    from .app import running

    stop = stop_event()
    try:
        async with running(settings) as live:
            auth = "token auth" if settings.token else "no auth"
            if settings.queue_url:
                role = f"stateless front for {settings.queue_url}"
            else:
                store = settings.redis_url or settings.sqlite_path
                workers = len(live.pool.workers) if live.pool else 0
                role = f"queue store {store}, {workers} worker(s)"
            print(f"comfyserve api listening on http://{settings.host}:{settings.port} ({auth}, service "
                  f"{settings.service!r}, {role})", flush=True)
            await stop.wait()
            log.info("shutting down")
    except OSError as exc:
        raise ConfigError(f"cannot start: {exc}") from exc
    return 0


ROLE = Role("api", "API edition: /api_prompt front, queue, instances, workers", add_arguments, start)
