"""``create_embedded_app(settings)``: the instance app on the embedded engine.

Route modules by URL:
    /prompt /queue /interrupt /free /history      routes_prompt.py
    /jobs (the frontend's queue/history panels)   routes_jobs.py
    /ws                                           routes_ws.py
    /object_info /embeddings /models /system_stats /features   routes_info.py
    /view /upload/image /upload/mask              routes_files.py
    /healthz /readyz /metrics /restart            routes_ops.py
    /login /logout                                standard.auth
    /users /settings /userdata /v2/userdata       userdata.py       (frontend engineer)
    /internal/* /i18n /extensions ...             internal.py       (frontend engineer)
    /  (the ComfyUI frontend, registered last)    frontend.py       (frontend engineer)
Every route is served as ``/X`` and ``/api/X``.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator

from aiohttp import web

from ..auth import INSTANCE_PUBLIC_PATHS, AccessGuard
from ..datadir import init_data_dir
from ..serving import drain_of
from ..settings import StandardSettings
from . import keys, routes_files, routes_info, routes_jobs, routes_ops, routes_prompt, routes_ws
from .middlewares import json_errors_middleware
from .prompt_server import PromptServer
from .routing import add_routes_with_api_prefix
from .storage_web import setup_storage

# The frontend engineer's setup functions, called in this order after our routes.
FRONTEND_SETUPS: tuple[tuple[str, str], ...] = (
    ("standard.server.userdata", "setup_userdata"),
    ("standard.server.internal", "setup_internal_routes"),
    ("standard.server.frontend", "setup_frontend"),
)


def create_embedded_app(settings: StandardSettings) -> web.Application:
    """The full ComfyUI-protocol app; the engine loads when the app starts."""
    data_dir = init_data_dir(settings.data_dir)
    workdirs = data_dir.workdirs()
    guard = AccessGuard(settings.access, token=settings.token, public_paths=INSTANCE_PUBLIC_PATHS)
    app = web.Application(client_max_size=settings.max_upload_size_bytes,
                          middlewares=[json_errors_middleware, guard.middleware])
    app[keys.SETTINGS] = settings
    app[keys.DATA_DIR] = data_dir
    app[keys.WORKDIRS] = workdirs
    app[keys.PROMPT_SERVER] = PromptServer(settings, data_dir, workdirs)
    setup_storage(app)  # before the engine: an oss:// data dir syncs custom_nodes first
    app.cleanup_ctx.append(_prompt_server_ctx)
    drain_of(app).hooks.append(app[keys.PROMPT_SERVER].drain)
    app.on_shutdown.append(_close_sockets)

    if settings.token is not None:
        from ..pages import setup_templates  # jinja2 is loaded only for the login page

        setup_templates(app)
        app.router.add_routes(guard.login_routes())
    for module in (routes_prompt, routes_jobs, routes_ws, routes_info, routes_files, routes_ops):
        add_routes_with_api_prefix(app, module.routes)
    for module_name, function_name in FRONTEND_SETUPS:
        setup = _optional_setup(module_name, function_name)
        if setup is not None:
            setup(app)
    return app


def _optional_setup(module_name: str, function_name: str):  # type: ignore[no-untyped-def]
    """The frontend engineer's module, or None while it has not landed yet."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise
    return getattr(module, function_name)


async def _prompt_server_ctx(app: web.Application) -> AsyncIterator[None]:
    server = app[keys.PROMPT_SERVER]
    await server.start()
    yield
    await server.stop()


async def _close_sockets(app: web.Application) -> None:
    """Open WebSockets would hold a graceful shutdown until its timeout."""
    server = app[keys.PROMPT_SERVER]
    for ws in list(server.sockets.values()):
        await ws.close(code=1001, message=b"server shutdown")
