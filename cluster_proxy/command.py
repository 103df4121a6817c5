"""``comfyserve cluster`` / ``python -m cluster_proxy``: the multi-user proxy over a pool.

Every flag also reads ``COMFYSERVE_<FLAG>`` from the environment.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from standard.errors import ConfigError
from standard.listen import add_listen_arguments, listen_settings_from_args
from standard.options import add_option
from standard.private import add_secret_option
from standard.serving import Role, serve_until_stopped
from standard.storage.settings import add_storage_arguments, instance_flags, storage_settings_from_args

from .settings import DEFAULT_PORT, ClusterSettings

log = logging.getLogger("comfyserve.cluster")
SHUTDOWN_TIMEOUT_S = 15.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--data-dir", default=None, help="the shared data dir (users' folders live in DIR/users)")
    add_listen_arguments(parser, default_port=DEFAULT_PORT, token_help=None,
                         access_title="who may call (Host, proxies, cookies)")
    add_option(parser, "--instances", type=int, default=0,
               help="spawn this many local embedded-engine instances on loopback ports")
    add_option(parser, "--instance-url", action="append", default=[], metavar="URL",
               help="an instance to schedule onto (repeatable; comma-separated in the environment)")
    add_secret_option(parser, "--instance-token", help="the token the --instance-url instances require")
    add_option(parser, "--redis-url", default=None,
               help="keep accounts and state in Redis (several proxies can share it) instead of SQLite")
    add_secret_option(parser, "--secret-key",
                      help="key that derives the CSRF values of our forms "
                           "(default: one kept in DIR/.comfyserve/secret_key)")
    add_option(parser, "--health-interval", type=float, default=1.0, help="seconds between instance health checks")
    add_option(parser, "--instance-lost-after", type=float, default=3.0,
               help="seconds an instance may stay unreachable under a task before the task is retried elsewhere")
    add_option(parser, "--prefetch", type=int, default=1, metavar="N",
               help="tasks queued on a busy instance behind the one it runs, so ComfyUI starts the next the "
                    "moment the current one ends (0: hand out a task only when an instance is idle)")
    add_option(parser, "--affinity-wait", type=float, default=10.0, metavar="SECONDS",
               help="model affinity: an instance prefers a waiting task whose models it holds; a task is "
                    "passed over for that at most this long, never past another user's fair share (0: off)")
    add_option(parser, "--max-upload-size", type=float, default=100.0, help="largest request body in MB")
    add_storage_arguments(parser.add_argument_group("object storage (OSS), passed on to spawned instances"))


def settings_from_args(args: argparse.Namespace) -> ClusterSettings:
    if not args.data_dir:
        raise ConfigError("--data-dir is required (or COMFYSERVE_DATA_DIR)")
    listen = listen_settings_from_args(args, logins=True)
    storage = storage_settings_from_args(args, args.data_dir)
    if storage is not None and storage.location is not None:
        data_dir = storage.local_root  # the local mirror of the oss:// data dir
    else:
        data_dir = Path(args.data_dir).expanduser().resolve()
    settings = ClusterSettings(
        data_dir=data_dir,
        storage=storage,
        instance_args=tuple(instance_flags(storage)) if storage is not None else (),
        host=listen.host,
        port=listen.port,
        instances=args.instances,
        instance_urls=tuple(args.instance_url or ()),
        instance_token=args.instance_token,
        redis_url=args.redis_url,
        secret_key=args.secret_key,
        health_interval_s=args.health_interval,
        instance_lost_s=args.instance_lost_after,
        prefetch=args.prefetch,
        affinity_wait_s=args.affinity_wait,
        max_upload_size_mb=args.max_upload_size,
        shutdown_timeout_s=listen.shutdown_timeout_s,
        access=listen.access,
    )
    settings.check()
    return settings


def start(args: argparse.Namespace) -> Coroutine[Any, Any, int]:
    settings = settings_from_args(args)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health check otherwise
    return serve(settings)


async def serve(settings: ClusterSettings) -> int:
    """Serve until SIGTERM/SIGINT, then drain (running tasks finish or go back to the store) and stop."""
    from .app import create_cluster_app

    app = await create_cluster_app(settings)
    runner = web.AppRunner(app, shutdown_timeout=SHUTDOWN_TIMEOUT_S, access_log=None)
    await runner.setup()
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    banner = f"comfyserve cluster listening on http://{shown}:{settings.port} (data dir {settings.data_dir})"
    return await serve_until_stopped(runner, web.TCPSite(runner, settings.host, settings.port), role="cluster",
                                     banner=banner, shutdown_timeout_s=settings.shutdown_timeout_s)


ROLE = Role("cluster", "cluster edition: multi-user web UI proxy over a pool", add_arguments, start)
