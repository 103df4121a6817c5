"""``create_backend_app(settings)``: the instance app in front of real ComfyUI.

Local routes: ``/healthz`` (this process), ``/readyz`` (the backend answers),
``/metrics``, ``/restart`` (a ``--comfyui-dir`` child is replaced; a
``--backend-url`` backend gets the request itself), ``/extensions`` (ComfyUI's
list plus our restart button, whose script is served here), ``/system_stats``
(ComfyUI's, without its ``argv``), ``/login``
``/logout`` with a token. Everything else — every HTTP route and the ``/ws``
socket — is forwarded to ComfyUI, behind the same token auth as the embedded
app. While a supervised child (re)starts, requests wait for it (up to
``REQUEST_WAIT_S``) rather than fail. ``comfyserve standard`` serves this app
on ``fastpath.FastProxySite``, which relays plain API calls at the byte level.
With a state file (``settings.state_file``; the command line always gives one)
the front keeps a journal of ComfyUI's queue and history that outlives ComfyUI's
restarts and its own (``journal``, ``journal_routes``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from ..auth import INSTANCE_PUBLIC_PATHS, AccessGuard
from ..datadir import DataDir, WorkDirs, init_data_dir
from ..errors import ConfigError
from ..http_util import json_error
from ..server.extensions import OWN_EXTENSION_NAME, own_extension_urls
from ..server.frontend import own_extension_routes
from ..server.identity import ME_PATH, token_identity_routes
from ..server.middlewares import json_errors_middleware
from ..server.prompt_request import refused_while_draining
from ..server.routes_files import view_path
from ..server.routes_info import without_secrets
from ..server.storage_web import bucket_fallback
from ..serving import drain_of, draining_headers, is_draining
from ..settings import StandardSettings
from ..state_store import StateStore
from ..storage.names import is_image_name
from ..supervised import instance_identity
from .fastpath import FAST_PATH, FastPathConfig
from .inputs import (
    PROMPT_INPUTS,
    PromptInputs,
    forward_prompt,
    inputs_context,
    object_info_node,
    with_bucket_images,
)
from .journal import JOURNAL, PromptJournal
from .journal_routes import add_journal_routes, is_local, tap
from .metrics import BackendMetrics
from .outputs import OUTPUTS, OutputPublisher, history_prompt_id, history_with_urls
from .proxy import FILE_ROUTES, BackendDown, backend_unavailable, forward_http, forward_websocket
from .runtime import Backend, RemoteBackend
from .supervisor import ComfyUIChild

log = logging.getLogger("comfyserve.backend")

BACKEND = web.AppKey("backend", Backend)
SESSION = web.AppKey("backend_session", aiohttp.ClientSession)
SETTINGS = web.AppKey("backend_settings", StandardSettings)
METRICS = web.AppKey("backend_metrics", BackendMetrics)
SOCKETS: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("backend_sockets", set)
WORKDIRS = web.AppKey("backend_workdirs", WorkDirs)  # ComfyUI's input/output/temp (an oss:// data dir's)
CONNECT_TIMEOUT_S = 10.0
RESTART_WAIT_S = 120.0
REQUEST_WAIT_S = 30.0  # a request arriving while the ComfyUI child (re)starts waits this long
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})
DRAIN_POLL_S = 0.1  # ComfyUI tells no one when its queue empties: the drain asks /queue this often
PROMPT_PATHS = frozenset({"/prompt", "/api/prompt"})


def make_backend(settings: StandardSettings) -> Backend:
    if settings.backend_url:
        url = settings.backend_url
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--backend-url must be an http:// or https:// URL, got {url!r}")
        return RemoteBackend(url)
    if settings.comfyui_dir is None:
        raise ConfigError("the real-ComfyUI runtime needs --comfyui-dir or --backend-url")
    return ComfyUIChild(
        settings.comfyui_dir, init_data_dir(settings.data_dir), python=settings.comfyui_python,
        extra_args=settings.comfyui_args, max_upload_size_mb=settings.max_upload_size_mb,
    )


def create_backend_app(settings: StandardSettings, backend: Backend | None = None) -> web.Application:
    """The proxy app; ``backend`` defaults to the one the settings name."""
    backend = backend or make_backend(settings)
    guard = AccessGuard(settings.access, token=settings.token, public_paths=INSTANCE_PUBLIC_PATHS)
    # Bodies are streamed to the backend; the size limit is checked while streaming.
    app = web.Application(middlewares=[json_errors_middleware, guard.middleware],
                          client_max_size=settings.max_upload_size_bytes)
    app[SETTINGS] = settings
    app[BACKEND] = backend
    app[METRICS] = BackendMetrics(backend)
    app[SOCKETS] = set()
    app.cleanup_ctx.append(_backend_ctx)
    if settings.storage is not None and settings.storage.location is not None:  # --data-dir oss://
        from ..storage.storage import ObjectStorage  # oss2 is loaded only for a bucket

        storage = ObjectStorage(settings.storage, settings.data_dir)
        app[PROMPT_INPUTS] = PromptInputs(storage, backend)
        app[WORKDIRS] = DataDir(Path(settings.data_dir).expanduser().resolve()).workdirs()
        app[OUTPUTS] = OutputPublisher(storage, {"output": app[WORKDIRS].output})
        app.cleanup_ctx.append(inputs_context(SESSION))
    app.on_shutdown.append(_close_sockets)
    drain_of(app).hooks.append(lambda timeout_s: _drain(app, timeout_s))
    if settings.token is not None:
        from ..pages import setup_templates  # jinja2 is loaded only for the login page

        setup_templates(app)
        app.router.add_routes(guard.login_routes())
    for prefix in ("", "/api"):
        app.router.add_get(prefix + "/healthz", healthz)
        app.router.add_get(prefix + "/readyz", readyz)
        app.router.add_get(prefix + "/metrics", metrics)
        app.router.add_post(prefix + "/restart", restart)
        app.router.add_get(prefix + "/extensions", extensions)
        app.router.add_get(prefix + "/system_stats", system_stats)
    app.router.add_routes(own_extension_routes())  # the restart button, added to ComfyUI's web UI
    if settings.state_file is not None:  # the durable queue and history (standard.backend.journal)
        add_journal_routes(app)
    app.router.add_routes(token_identity_routes(login=settings.token is not None))  # our user menu
    app.router.add_route("*", "/{tail:.*}", proxy)
    local = ("/healthz", "/readyz", "/metrics", "/restart", "/extensions", "/system_stats")
    app[FAST_PATH] = FastPathConfig(
        # While draining every request takes the slow path, where POST /prompt is refused.
        token=settings.token, base_url=lambda: None if is_draining(app) else backend.base_url,
        # /view takes the slow path too: its headers are rewritten there (file_headers policy)
        local_paths=frozenset({prefix + path for prefix in ("", "/api") for path in local}
                              | {"/login", "/logout", ME_PATH, "/api" + ME_PATH} | FILE_ROUTES),
        local_prefixes=(f"/extensions/{OWN_EXTENSION_NAME}/",),
        max_body_bytes=settings.max_upload_size_bytes, metrics=app[METRICS], relay_allowed=guard.relay_allowed,
        # An oss:// data dir: POST /prompt takes the slow path, where its inputs are fetched first, and
        # GET /history/<id>, where a finished prompt's outputs are uploaded first, and GET /object_info, where
        # the bucket's input images join LoadImage's list.
        is_local=lambda method, path: (is_local(app, method, path) or PROMPT_INPUTS in app and (
            method == "POST" and path in PROMPT_PATHS or history_prompt_id(method, path) is not None
            or object_info_node(method, path) is not None)),
        tap=lambda method, path: tap(app, method, path),
    )
    return app


async def _backend_ctx(app: web.Application) -> AsyncIterator[None]:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False, enable_cleanup_closed=True),
        timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S, sock_connect=CONNECT_TIMEOUT_S),
        cookie_jar=aiohttp.DummyCookieJar(),  # the browser keeps cookies, not the proxy
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        trust_env=False,
    )
    app[SESSION] = session
    backend = app[BACKEND]
    settings = app[SETTINGS]
    journal: PromptJournal | None = None
    try:
        if settings.state_file is not None:  # before ComfyUI starts: a state file that is not ours stops us
            store = await asyncio.to_thread(StateStore.open, settings.state_file,
                                            history_max_items=settings.history_max_items)
            journal = app[JOURNAL] = PromptJournal(store, backend, strip_auth=settings.token is not None)
            if OUTPUTS in app:  # an oss:// data dir: stored entries carry their outputs' bucket urls
                journal.finishing = app[OUTPUTS].published
            app[METRICS].follow(journal)
            await journal.start(session)
        if PROMPT_INPUTS in app:  # an oss:// data dir: what ComfyUI loads at start comes from the bucket first
            await app[PROMPT_INPUTS].prepare()
        await backend.start(session)
    except BaseException:
        if journal is not None:
            await journal.stop()
        await session.close()
        raise
    log.info("real-ComfyUI runtime: %s", backend.kind)
    yield
    try:
        if journal is not None:
            await journal.stop()  # a last look at ComfyUI first: what finished while draining is kept
    finally:
        try:
            await backend.stop()
        finally:
            await session.close()


async def _drain(app: web.Application, timeout_s: float) -> None:
    """SIGTERM: ComfyUI runs what it was given (new prompts get 503) within ``timeout_s``. Past it a
    supervised child's queue is cleared and its prompt interrupted; a ``--backend-url`` backend is
    not ours to interrupt (others may use it): it runs on."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (queue := await _backend_queue(app)) and (queue.get("queue_running") or queue.get("queue_pending")):
        if loop.time() >= deadline:
            break
        await asyncio.sleep(DRAIN_POLL_S)
    else:
        return
    pending = [item[1] for item in queue.get("queue_pending") or [] if isinstance(item, list) and len(item) > 1]
    if not isinstance(app[BACKEND], ComfyUIChild):
        log.warning("shutdown timeout: the backend still has %d prompt(s); they run on there",
                    len(pending) + len(queue.get("queue_running") or []))
        return
    if pending and JOURNAL in app:
        log.warning("shutdown timeout: %d queued prompt(s) kept for the next start: %s", len(pending),
                    ", ".join(map(str, pending)))
    elif pending:
        log.warning("shutdown timeout: %d queued prompt(s) not run: %s", len(pending), ", ".join(map(str, pending)))
    if JOURNAL in app:
        await app[JOURNAL].hold()  # or it would queue the cleared prompts again as ones ComfyUI forgot
    await _backend_post(app, "/queue", {"clear": True})
    await _backend_post(app, "/interrupt", {})


async def _backend_queue(app: web.Application) -> dict | None:
    base_url = app[BACKEND].base_url
    if base_url is None:
        return None
    try:
        async with app[SESSION].get(base_url + "/queue", timeout=aiohttp.ClientTimeout(total=5.0)) as response:
            queue = await response.json(content_type=None)
    except (TimeoutError, aiohttp.ClientError, ValueError):
        return None
    return queue if isinstance(queue, dict) else None


async def _backend_post(app: web.Application, path: str, body: dict) -> None:
    base_url = app[BACKEND].base_url
    if base_url is None:
        return
    try:
        async with app[SESSION].post(base_url + path, json=body, timeout=aiohttp.ClientTimeout(total=5.0)):
            pass
    except (TimeoutError, aiohttp.ClientError) as exc:
        log.warning("shutdown: POST %s to the backend failed: %r", path, exc)


async def _close_sockets(app: web.Application) -> None:
    """Open WebSockets would hold a graceful shutdown until its timeout."""
    for ws in app[SOCKETS].copy():
        await ws.close(code=1001, message=b"server shutdown")


async def healthz(request: web.Request) -> web.Response:
    """This process answers; a supervised child also names itself (``standard.supervised``)."""
    return web.json_response({"status": "ok", **instance_identity()})


async def readyz(request: web.Request) -> web.Response:
    status = await request.app[BACKEND].status()
    if is_draining(request.app):  # a load balancer sends no new work here
        return web.json_response({**status, "ready": False, "draining": True}, status=503,
                                 headers=draining_headers())
    return web.json_response(status, status=200 if status["ready"] else 503)


async def metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    metrics.ready.set(1 if (await request.app[BACKEND].status())["ready"] else 0)
    return metrics.response()


async def restart(request: web.Request) -> web.StreamResponse:
    """Replace a supervised child (409 while it runs a prompt); otherwise ask the backend."""
    backend = request.app[BACKEND]
    if not isinstance(backend, ComfyUIChild):
        return await proxy(request)
    if await _prompt_running(request):
        raise json_error(409, "prompt_running", "cannot restart while a prompt runs",
                         "interrupt it or wait for it to finish")
    if JOURNAL in request.app:
        await request.app[JOURNAL].sync()  # what ComfyUI finished is kept before it forgets
    if PROMPT_INPUTS in request.app:  # the plugins it imports again: the bucket's, as at start
        try:
            await request.app[PROMPT_INPUTS].prepare()
        except ConfigError as exc:
            raise json_error(502, "storage_error", "the bucket's custom nodes were not synced", str(exc)) from None
    status = await backend.restart(wait_s=RESTART_WAIT_S)
    return web.json_response({"restarted": True, **status}, status=200 if status["ready"] else 503)


async def _backend_json(request: web.Request, path: str) -> Any:
    """ComfyUI's JSON answer to ``GET path``, for routes the front rewrites; a ``web.Response`` to
    relay as it is when ComfyUI answers anything but 200 (raises 503/502 while it starts or is gone)."""
    base_url = await _backend_url(request.app[BACKEND])
    if base_url is None:
        raise backend_unavailable(_not_ready(request.app[BACKEND]), 503)
    try:
        async with request.app[SESSION].get(base_url + path, timeout=aiohttp.ClientTimeout(total=30.0)) as response:
            if response.status != 200:
                return web.Response(status=response.status, body=await response.read(),
                                    content_type=response.content_type)
            return await response.json(content_type=None)
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        raise backend_unavailable(repr(exc)) from None


async def extensions(request: web.Request) -> web.StreamResponse:
    """ComfyUI's list of extension scripts, plus ours (the restart button)."""
    urls = await _backend_json(request, "/extensions")
    if isinstance(urls, web.StreamResponse):
        return urls
    if not isinstance(urls, list):
        urls = []
    return web.json_response(urls + [url for url in own_extension_urls() if url not in urls])


async def system_stats(request: web.Request) -> web.StreamResponse:
    """ComfyUI's ``/system_stats`` without its ``argv`` (command lines hold secrets: never relayed)."""
    stats = await _backend_json(request, "/system_stats")
    if isinstance(stats, web.StreamResponse):
        return stats
    return web.json_response(without_secrets(stats))


async def _prompt_running(request: web.Request) -> bool:
    base_url = request.app[BACKEND].base_url
    if base_url is None:
        return False
    try:
        async with request.app[SESSION].get(base_url + "/queue",
                                            timeout=aiohttp.ClientTimeout(total=5.0)) as response:
            queue = await response.json(content_type=None)
    except (TimeoutError, aiohttp.ClientError, ValueError):
        return False
    return bool(isinstance(queue, dict) and queue.get("queue_running"))


async def proxy(request: web.Request) -> web.StreamResponse:
    app = request.app
    if request.method == "POST" and request.path in PROMPT_PATHS:
        if is_draining(app):
            raise refused_while_draining()
        if PROMPT_INPUTS in app:  # an oss:// data dir: the prompt's inputs are fetched first
            return await forward_prompt(request, lambda body: _forward(request, body))
    if PROMPT_INPUTS in app and request.method in IDEMPOTENT and request.path in FILE_ROUTES:
        url = await _bucket_view(request)
        if url is not None:
            raise web.HTTPFound(url)
    if PROMPT_INPUTS in app and (node := object_info_node(request.method, request.path)) is not None:
        info = await _backend_json(request, "/object_info" + (f"/{quote(node, safe='')}" if node else ""))
        if isinstance(info, web.StreamResponse):
            return info
        images = [name for name in app[PROMPT_INPUTS].storage.input_names() if is_image_name(name)]
        return web.json_response(with_bucket_images(info, images))  # the bucket's inputs in LoadImage's list
    if OUTPUTS in app and (prompt_id := history_prompt_id(request.method, request.path)) is not None:
        answer = await _backend_json(request, "/history/" + quote(prompt_id, safe=""))
        if isinstance(answer, web.StreamResponse):
            return answer
        return await history_with_urls(app[OUTPUTS], prompt_id, answer)  # a finished prompt's files uploaded
    return await _forward(request)


async def _bucket_view(request: web.Request) -> str | None:
    """``/view`` of a file ComfyUI's disk lacks (an oss:// data dir), as the embedded engine answers it: an
    input is fetched into ``input/`` (then ComfyUI serves it: None), anything else the bucket has gets a
    signed URL to redirect to. A request ComfyUI would refuse is left to it (None)."""
    storage = request.app[PROMPT_INPUTS].storage
    try:
        path, _ = view_path(request.app[WORKDIRS], request.query)
    except web.HTTPException:
        return None
    if path.is_file():
        return None
    return await bucket_fallback(storage, path)


async def _forward(request: web.Request, body: bytes | None = None) -> web.StreamResponse:
    app = request.app
    backend = app[BACKEND]
    base_url = await _backend_url(backend)
    if base_url is None:
        raise backend_unavailable(_not_ready(backend), 503)
    settings = app[SETTINGS]
    strip_auth = settings.token is not None
    if request.headers.get("Upgrade", "").lower() == "websocket":
        app[METRICS].websockets.inc()
        # An oss:// data dir: an executed event's files are uploaded and given urls before it is relayed.
        rewrite = app[OUTPUTS].executed if OUTPUTS in app else None
        return await forward_websocket(request, app[SESSION], base_url, strip_auth=strip_auth,
                                       max_msg_bytes=settings.max_upload_size_bytes, sockets=app[SOCKETS],
                                       rewrite=rewrite)
    app[METRICS].requests.inc()
    for attempt in range(2):
        try:
            return await forward_http(request, app[SESSION], base_url, strip_auth=strip_auth,
                                      max_body_bytes=settings.max_upload_size_bytes, body=body)
        except BackendDown as exc:
            # A child that died (or is being restarted) comes back: a request that changes
            # nothing waits for it and goes once more; anything else is answered 502.
            if attempt == 0 and request.method in IDEMPOTENT and isinstance(backend, ComfyUIChild):
                retry_url = await _backend_url(backend, failed_url=base_url)
                if retry_url is not None:
                    base_url = retry_url
                    continue
            app[METRICS].errors.inc()
            raise backend_unavailable(str(exc), exc.status) from None
    raise AssertionError("unreachable")


def _not_ready(backend: Backend) -> str:
    """The detail of a 503 while there is no ComfyUI to ask (a child that failed at start says how)."""
    return backend.not_ready_reason() if isinstance(backend, ComfyUIChild) else "ComfyUI is starting"


async def _backend_url(backend: Backend, failed_url: str | None = None) -> str | None:
    """The backend's address; while a child (re)starts, wait up to REQUEST_WAIT_S for the new one.

    None at once when the child's last start failed and no new one runs (a backoff wait): the
    503 says how it failed rather than after REQUEST_WAIT_S. A start under way is waited for.

    With ``failed_url`` (a request to it just failed) an address other than that
    one is awaited, unless the same child is still there a second later.
    """
    base_url = backend.base_url
    if base_url is not None and base_url != failed_url:
        return base_url
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + REQUEST_WAIT_S
    while loop.time() < deadline:
        if base_url is None:
            if isinstance(backend, ComfyUIChild):
                if backend.failed:
                    return None
                await backend.wait_ready(deadline - loop.time(), until_failed=True)
            else:
                await backend.wait_ready(deadline - loop.time())
        elif loop.time() - started > 1.0:
            return base_url  # it did not go away: worth one more try
        else:
            await asyncio.sleep(0.05)
        base_url = backend.base_url
        if base_url is not None and base_url != failed_url:
            return base_url
    return None
