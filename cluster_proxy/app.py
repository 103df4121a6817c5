"""``create_cluster_app(settings)``: the cluster edition's proxy.

Module by job:
    login.py, accounts.py     who is asking (pages, sessions, tokens)
    routes_api.py             /prompt /queue /interrupt /history /jobs-cancel /ws (per user)
    routes_shared.py          the standard edition's handlers, run in the user's scope (scope.py)
    core.py                   store + pool + scheduler + runs + user sockets
    scheduler.py pool.py runner.py graph.py outputs.py hub.py store.py store_redis.py
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator

from aiohttp import web

from standard.auth import AccessGuard
from standard.datadir import init_data_dir
from standard.server.middlewares import json_errors_middleware
from standard.server.routing import add_routes_with_api_prefix
from standard.serving import drain_of, draining_headers, is_draining

from . import routes_api
from .accounts import Accounts
from .core import ClusterCore
from .keys import CLUSTER_SETTINGS, CORE, POOL, SCOPES
from .login import DEFAULT_PUBLIC_PATHS, load_or_create_secret, setup_login
from .pages import setup_pages
from .pool import LocalInstances, Pool
from .routes_shared import setup_shared_routes, setup_web_ui
from .scope import Scopes, scope_middleware
from .settings import ClusterSettings
from .store import SqliteStateStore, StateStore

log = logging.getLogger("comfyserve.cluster")
LOCAL_INSTANCES: web.AppKey[LocalInstances | None] = web.AppKey("cluster_local_instances")
ACCOUNTS_KEY: web.AppKey[Accounts] = web.AppKey("cluster_core_accounts", Accounts)

ops = web.RouteTableDef()


@ops.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@ops.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    up = len(request.app[POOL].up())
    if is_draining(request.app):
        return web.json_response({"ready": False, "draining": True, "instances_up": up}, status=503,
                                 headers=draining_headers())
    return web.json_response({"ready": up > 0, "instances_up": up}, status=200 if up else 503)


async def open_store(settings: ClusterSettings) -> StateStore:
    if settings.redis_url:
        from .store_redis import RedisStateStore

        return RedisStateStore(settings.redis_url, history_max_items=settings.history_max_items)
    path = settings.data_dir / ".comfyserve" / "cluster_state.sqlite"
    return SqliteStateStore(path, history_max_items=settings.history_max_items)


async def create_cluster_app(settings: ClusterSettings) -> web.Application:
    """The proxy app; its pool (and spawned instances) start with the app."""
    settings.check()
    data_dir = init_data_dir(settings.data_dir)
    data_dir.users.mkdir(exist_ok=True)
    public = DEFAULT_PUBLIC_PATHS | {"/healthz", "/api/healthz", "/readyz", "/api/readyz"}
    # Host check and the request's policy (client address, https); the logins decide on credentials.
    guard = AccessGuard(settings.access, public_paths=public, login_path=None, external_auth=True)
    app = web.Application(client_max_size=settings.max_upload_size_bytes,
                          middlewares=[json_errors_middleware, guard.middleware])
    app[CLUSTER_SETTINGS] = settings
    store = await open_store(settings)
    pool = Pool(health_interval_s=settings.health_interval_s, lost_after_s=settings.instance_lost_s,
                info_cache_s=settings.object_info_cache_s)
    object_storage = None
    if settings.storage is not None:
        from standard.storage.storage import ObjectStorage

        object_storage = ObjectStorage(settings.storage, data_dir.root)
    core = ClusterCore(data_dir, store, pool, instance_token=settings.instance_token,
                       local_validation=settings.local_validation, storage=object_storage,
                       prefetch=settings.prefetch, affinity_wait_s=settings.affinity_wait_s)
    pool.on_change = core.scheduler.wake
    app[POOL] = pool
    app[CORE] = core
    accounts = await Accounts.open(data_dir, settings.redis_url)
    app[ACCOUNTS_KEY] = accounts
    scopes = Scopes(settings.standard_settings(), data_dir, store, core.workdirs)
    app[SCOPES] = scopes
    local = None
    if settings.instances:
        local = LocalInstances(settings.instances, data_dir.root, secrets.token_urlsafe(24), settings.instance_args,
                               avoid_ports=(settings.port,))
    app[LOCAL_INSTANCES] = local
    secret_key = settings.secret_key or load_or_create_secret(data_dir)
    setup_login(app, accounts, secret_key, public_paths=frozenset(public), guard=guard)
    setup_pages(app, core)
    app.middlewares.append(scope_middleware(scopes))  # after the login middleware: it names the user
    add_routes_with_api_prefix(app, ops)
    add_routes_with_api_prefix(app, routes_api.routes)
    setup_shared_routes(app, scopes)
    setup_web_ui(app)
    app.cleanup_ctx.append(_lifecycle)  # torn down after the drain: spawned instances stop last
    drain_of(app).hooks.append(core.drain)
    app.on_shutdown.append(_close_sockets)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    settings, core, pool = app[CLUSTER_SETTINGS], app[CORE], app[POOL]
    local = app[LOCAL_INSTANCES]
    try:
        if local is not None:
            await local.start(pool)
            core.fixed_urls.update(local.urls)
        for url in settings.instance_urls:
            core.fixed_urls.add(pool.add(url, settings.instance_token).url)
        for url in await core.store.instance_urls():
            pool.add(url, settings.instance_token)
        await core.start(settings.redis_url)
        log.info("cluster proxy ready: %d instance(s) in the pool", len(pool.instances))
        yield
    finally:
        with contextlib.suppress(Exception):
            await core.aclose()
        if local is not None:
            await local.aclose()
        await core.store.aclose()
        await app[ACCOUNTS_KEY].aclose()


async def _close_sockets(app: web.Application) -> None:
    hub = app[CORE].hub
    for sockets in list(hub.sockets.values()):
        for ws in list(sockets.values()):
            with contextlib.suppress(Exception):
                await ws.close(code=1001, message=b"server shutdown")
