"""``create_embedded_app(settings)``: the instance app on the embedded engine.

Route modules by URL:
    /prompt /queue /interrupt /free /history      routes_prompt.py
    /jobs (the frontend's queue/history panels)   routes_jobs.py
    /ws                                           routes_ws.py
    /object_info /embeddings /models /system_stats /features   routes_info.py
    /view /upload/image /upload/mask              routes_files.py
    /healthz /readyz /metrics /restart            routes_ops.py
    /login /logout                                standard.auth
    /users /settings /userdata /v2/userdata       userdata.py
    /internal/* /i18n /extensions ...             internal.py
    /  (the ComfyUI frontend, registered last)    frontend.py
Every route is served as ``/X`` and ``/api/X``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from ..auth import INSTANCE_PUBLIC_PATHS, AccessGuard
from ..datadir import init_data_dir
from ..serving import drain_of
from ..settings import StandardSettings
from . import keys, routes_files, routes_info, routes_jobs, routes_ops, routes_prompt, routes_ws
from .frontend import setup_frontend
from .identity import token_identity_routes
from .internal import setup_internal_routes
from .middlewares import json_errors_middleware
from .prompt_server import PromptServer
from .routing import add_routes_with_api_prefix
from .storage_web import setup_storage
from .userdata import setup_userdata


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
    app.router.add_routes(token_identity_routes(login=settings.token is not None))
    setup_userdata(app)
    setup_internal_routes(app)
    setup_frontend(app)  # last: it serves the frontend's files under /
    return app


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
