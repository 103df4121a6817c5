"""``comfyserve queue`` / ``python -m queue_service``: the queue service.

The store is SQLite under ``--data-dir`` (``DIR/queue/queue.sqlite3``) or at
``--store sqlite:PATH``, or Redis with ``--redis-url`` (several processes may
share one Redis). Every flag also reads ``COMFYSERVE_<FLAG>``.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from standard.errors import ConfigError
from standard.listen import add_listen_arguments, listen_settings_from_args
from standard.options import add_option
from standard.serving import Role, serve_until_stopped

from .settings import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_MAX_PAYLOAD_BYTES,
    DEFAULT_PENDING_TIMEOUT_S,
    DEFAULT_PORT,
    DEFAULT_REDIS_CALL_TIMEOUT_S,
    QueueSettings,
)

log = logging.getLogger("comfyserve.queue")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--data-dir", default=None, help="data dir; the SQLite store is DIR/queue/queue.sqlite3")
    add_option(parser, "--store", default=None, metavar="sqlite:PATH", help="SQLite store file (instead of --data-dir)")
    add_option(parser, "--redis-url", default=None, help="use Redis (redis://host:port/db) as the store")
    add_redis_call_timeout_option(parser)
    add_listen_arguments(parser, default_port=DEFAULT_PORT, aliases=("--host",),
                         token_help="require 'Authorization: <token>' on every call")
    add_option(parser, "--max-length", type=int, default=DEFAULT_MAX_LENGTH,
               help="items a queue may hold; a put to a full queue gets 429 (0 = unbounded)")
    add_option(parser, "--max-payload", type=int, default=DEFAULT_MAX_PAYLOAD_BYTES,
               help="largest item body in bytes (bigger ones get 413)")
    add_option(parser, "--pending-timeout", type=float, default=DEFAULT_PENDING_TIMEOUT_S,
               help="seconds an item stays with a watcher that vanished before others get it")


def add_redis_call_timeout_option(parser: argparse.ArgumentParser) -> None:
    """``--redis-call-timeout``: shared by ``comfyserve queue`` and the all-in-one ``comfyserve api``."""
    add_option(parser, "--redis-call-timeout", type=float, default=DEFAULT_REDIS_CALL_TIMEOUT_S,
               help="seconds a Redis call may take before the call is answered 503 (a put answered so may "
                    "still land: retry it with the same Idempotency-Key)")


def redis_call_timeout_of(args: argparse.Namespace) -> float:
    if args.redis_call_timeout <= 0:
        raise ConfigError("--redis-call-timeout must be positive (seconds)")
    return float(args.redis_call_timeout)


def settings_from_args(args: argparse.Namespace) -> QueueSettings:
    listen = listen_settings_from_args(args)
    if args.max_length < 0:
        raise ConfigError("--max-length must be >= 0 (0 = unbounded)")
    if args.max_payload <= 0:
        raise ConfigError("--max-payload must be positive (bytes)")
    if args.pending_timeout <= 0:
        raise ConfigError("--pending-timeout must be positive (seconds)")
    sqlite_path: Path | None = None
    if args.store:
        kind, _, path = str(args.store).partition(":")
        if kind != "sqlite" or not path:
            raise ConfigError(f"--store must look like sqlite:PATH, got {args.store!r}")
        sqlite_path = Path(path).expanduser().resolve()
    elif args.data_dir:
        sqlite_path = Path(args.data_dir).expanduser().resolve() / "queue" / "queue.sqlite3"
    if sqlite_path is None and not args.redis_url:
        raise ConfigError("give a store: --data-dir DIR, --store sqlite:PATH or --redis-url URL")
    if args.redis_url and not str(args.redis_url).startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"--redis-url must start with redis://, rediss:// or unix://, got {args.redis_url!r}")
    return QueueSettings(
        host=listen.host, port=listen.port, token=listen.token, shutdown_timeout_s=listen.shutdown_timeout_s,
        sqlite_path=None if args.redis_url else sqlite_path, redis_url=args.redis_url or None,
        redis_call_timeout_s=redis_call_timeout_of(args),
        max_length=args.max_length, max_payload_bytes=args.max_payload,
        pending_timeout_s=args.pending_timeout, access=listen.access,
    )


def start(args: argparse.Namespace) -> Coroutine[Any, Any, int]:
    return serve(settings_from_args(args))


async def serve(settings: QueueSettings) -> int:
    """Serve until SIGTERM/SIGINT; then stop listening, close the watches (their uncommitted items go back
    at once) and give requests in flight up to ``settings.shutdown_timeout_s``."""
    shutdown_timeout_s = settings.shutdown_timeout_s
    from .fastput import FastPutSite
    from .server import create_app

    app = create_app(settings)
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout_s, access_log=None)
    try:
        await runner.setup()
    except Exception as exc:  # the store could not be opened
        raise ConfigError(f"cannot open the store: {exc}") from exc
    store = re.sub(r"//[^/@]*@", "//***@", settings.redis_url) if settings.redis_url else settings.sqlite_path
    auth = "token auth" if settings.token else "no auth"
    banner = f"comfyserve queue listening on http://{settings.host}:{settings.port} ({auth}, store {store})"
    return await serve_until_stopped(runner, FastPutSite(runner, settings.host, settings.port), role="queue",
                                     banner=banner, shutdown_timeout_s=shutdown_timeout_s)


ROLE = Role("queue", "the queue service (wire-compatible with the platform's)", add_arguments, start)
