"""``comfyserve standard`` / ``python -m standard``: one ComfyUI-protocol instance.

Flags follow ComfyUI's where they overlap (``--listen`` with no value means
every IPv4 address, ``--port``, ``--max-upload-size`` in MB); each flag also
reads ``COMFYSERVE_<FLAG>`` from the environment.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from .datadir import usable_data_dir
from .errors import ConfigError
from .listen import add_listen_arguments, listen_settings_from_args
from .options import add_option
from .serving import Role, serve_until_stopped
from .settings import DEFAULT_MAX_UPLOAD_SIZE_MB, DEFAULT_PORT, StandardSettings
from .storage.settings import add_storage_arguments, storage_settings_from_args

log = logging.getLogger("comfyserve.standard")
SHUTDOWN_TIMEOUT_S = 15.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--data-dir", default=None,
               help="the data dir (models, custom_nodes, input, output, ...): a folder or oss://BUCKET/PREFIX")
    add_listen_arguments(parser, default_port=DEFAULT_PORT, access_title="who may call (Host, proxies, cookies)",
                         token_help="require 'Authorization: <token>' or 'Bearer <token>' on every route but /healthz")
    add_option(parser, "--max-upload-size", type=float, default=DEFAULT_MAX_UPLOAD_SIZE_MB,
               help="largest request body in MB (bigger ones get 413)")
    add_option(parser, "--history-max-items", type=int, default=10000,
               help="finished prompts kept in /history (oldest dropped first)")
    add_option(parser, "--comfyui-dir", default=None,
               help="a ComfyUI checkout to run as a supervised child instead of the embedded engine")
    add_option(parser, "--comfyui-python", default=sys.executable,
               help="python interpreter for --comfyui-dir")
    add_option(parser, "--comfyui-args", default="",
               help="extra arguments for ComfyUI's main.py: one shell-quoted string ('--comfyui-args --cpu', "
                    "'--comfyui-args \"--cpu --preview-method auto\"'); the words after a bare '--' are added too")
    add_option(parser, "--backend-url", default=None,
               help="front a ComfyUI (or comfyserve) instance running at this URL instead of the embedded engine")
    add_storage_arguments(parser.add_argument_group("object storage (OSS)"))


def settings_from_args(args: argparse.Namespace) -> StandardSettings:
    """Build the frozen settings; raises ConfigError for impossible values."""
    if not args.data_dir:
        raise ConfigError("--data-dir is required (or COMFYSERVE_DATA_DIR)")
    listen = listen_settings_from_args(args)
    if args.max_upload_size <= 0:
        raise ConfigError("--max-upload-size must be positive (MB)")
    if args.history_max_items < 1:
        raise ConfigError("--history-max-items must be at least 1")
    storage = storage_settings_from_args(args, args.data_dir)
    local_dir = storage.local_root if storage is not None and storage.location else Path(args.data_dir)
    settings = StandardSettings(
        data_dir=local_dir.expanduser().resolve(),
        host=listen.host,
        port=listen.port,
        token=listen.token,
        no_auth=listen.no_auth,
        max_upload_size_mb=args.max_upload_size,
        comfyui_dir=Path(args.comfyui_dir).expanduser().resolve() if args.comfyui_dir else None,
        comfyui_python=args.comfyui_python,
        comfyui_args=comfyui_args(args),
        backend_url=args.backend_url,
        history_max_items=args.history_max_items,
        shutdown_timeout_s=listen.shutdown_timeout_s,
        storage=storage,
        access=listen.access,
    )
    settings.check()
    return settings


def comfyui_args(args: argparse.Namespace) -> tuple[str, ...]:
    """``--comfyui-args`` split as a shell would; refused without ``--comfyui-dir`` (nothing would take them)."""
    try:
        words = tuple(shlex.split(args.comfyui_args or ""))
    except ValueError as exc:
        raise ConfigError(f"--comfyui-args {args.comfyui_args!r}: {exc}") from None
    if words and not args.comfyui_dir:
        raise ConfigError(f"ComfyUI arguments ({shlex.join(words)}) need --comfyui-dir: "
                          "the embedded engine and --backend-url take none")
    return words


def start(args: argparse.Namespace) -> Coroutine[Any, Any, int]:
    settings = settings_from_args(args)
    usable_data_dir(settings.data_dir)
    return serve(settings)


def _site(runner: web.AppRunner, settings: StandardSettings) -> web.TCPSite:
    """A front of real ComfyUI relays plain API requests on its fast path."""
    if settings.backend_url or settings.comfyui_dir:
        from .backend.fastpath import FastProxySite

        return FastProxySite(runner, settings.host, settings.port)
    return web.TCPSite(runner, settings.host, settings.port)


def runtime_name(settings: StandardSettings) -> str:
    if settings.backend_url:
        return f"real ComfyUI at {settings.backend_url}"
    if settings.comfyui_dir:
        return f"real ComfyUI from {settings.comfyui_dir}"
    return "embedded engine"


async def serve(settings: StandardSettings) -> int:
    """Serve until SIGTERM/SIGINT, then shut down gracefully."""
    from .app import create_app

    app = create_app(settings)
    runner = web.AppRunner(app, shutdown_timeout=SHUTDOWN_TIMEOUT_S, access_log=None)
    await runner.setup()
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    auth = "token auth" if settings.token else "no auth"
    banner = (f"comfyserve standard listening on http://{shown}:{settings.port} ({auth}, "
              f"data dir {settings.data_dir}, {runtime_name(settings)})")
    return await serve_until_stopped(runner, _site(runner, settings), role="standard", banner=banner,
                                     shutdown_timeout_s=settings.shutdown_timeout_s)


ROLE = Role("standard", "one ComfyUI-protocol instance on a data dir", add_arguments, start,
            passthrough="--comfyui-args")
