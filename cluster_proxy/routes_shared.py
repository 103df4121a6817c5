"""Routes the cluster takes from the standard edition, confined to the asking user.

    /view /upload/image /upload/mask            standard.server.routes_files   (user's folders;
                                                 /view?type=input falls back to the public DIR/input)
    /userdata /v2/userdata /users /settings     standard.server.userdata       (DIR/users/<name>/user)
    GET /queue /prompt /history /history/{id}   standard.server.routes_prompt  (over the user's tasks)
    GET /jobs /jobs/{id}                        standard.server.routes_jobs    (over the user's tasks)
    /internal/* /i18n /extensions ...           standard.server.internal       (logs: empty — shared)
    /system_stats /features /view_metadata      standard.server.routes_info
    /object_info /embeddings /models            from the pool, cached
    /templates/*                                from the pool, cached: the runtime's own templates
    /  (the ComfyUI frontend)                   standard.server.frontend
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web

from standard.http_util import json_error
from standard.server import internal, routes_files, routes_info, routes_jobs, routes_prompt, userdata
from standard.server.context import instance_context
from standard.server.frontend import setup_frontend
from standard.server.routing import add_routes_with_api_prefix

from .graph import STAGE
from .keys import CORE, POOL
from .login import USER
from .scope import Handler, Scopes, call_in, scoped

SKIPPED_INTERNAL = frozenset({"/internal/logs", "/internal/logs/raw", "/internal/logs/subscribe",
                              "/internal/folder_paths"})
QUEUE_READS = {("GET", "/prompt"), ("GET", "/queue"), ("GET", "/history"), ("GET", "/history/{prompt_id}")}
INFO_READS = {"/system_stats", "/features", "/view_metadata/{folder_name}"}
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".mpo"})
POOL_PATHS = ("/object_info", "/embeddings", "/models")


def _table(routes: web.RouteTableDef, keep: object, scopes: Scopes, *, with_queue: bool = False) -> web.RouteTableDef:
    table = web.RouteTableDef()
    for route in routes:
        if isinstance(route, web.RouteDef) and keep(route):  # type: ignore[operator]
            table.route(route.method, route.path, **route.kwargs)(scoped(scopes, route.handler, with_queue=with_queue))
    return table


def _hidden(subfolder: str, name: str) -> bool:
    """A path through a hidden folder or to a hidden file (``.cluster/`` holds every user's staged inputs)."""
    parts = subfolder.replace("\\", "/").split("/") + [name.replace("\\", "/").rsplit("/", 1)[-1]]
    return any(part.startswith(".") for part in parts)


def _view_with_public_input(scopes: Scopes) -> Handler:
    """The user's file; for ``type=input`` a miss falls back to the public ``DIR/input`` (read only).

    Hidden folders of the public input (the ``.cluster/`` staging area) are not part of that fallback.
    """
    user_view = scoped(scopes, routes_files.view_image)

    async def view(request: web.Request) -> web.StreamResponse:
        try:
            return await user_view(request)
        except web.HTTPNotFound:
            name, kind = routes_files.annotated_filepath(request.query.get("filename", ""))
            if (kind or request.query.get("type") or "output") != "input":
                raise
            if _hidden(request.query.get("subfolder", ""), name):
                raise
            return await call_in(scopes.public(request[USER].name), routes_files.view_image, request)

    return view


async def _pooled(request: web.Request) -> web.StreamResponse:
    path = request.path.removeprefix("/api")
    data = await request.app[POOL].cached_json(path)
    if data is None:
        raise json_error(503, "no_instance", "no instance of the pool is up yet")
    if path.startswith("/object_info") and isinstance(data, dict):
        workdirs = request.app[CORE].workdirs(request[USER].name)
        data = await asyncio.to_thread(with_user_inputs, data, workdirs.input)
    return web.json_response(data)


MAX_TEMPLATE_PATH_CHARS = 512
TEMPLATE_TYPES = ("application/json", "image/", "video/", "audio/")


async def _pooled_template(request: web.Request) -> web.StreamResponse:
    """A workflow template file as the pool's runtime serves it (ComfyUI's set, or the embedded engine's)."""
    relative = request.match_info["path"]
    parts = relative.split("/")
    if (len(relative) > MAX_TEMPLATE_PATH_CHARS or "\\" in relative or "\x00" in relative
            or any(part in ("", ".", "..") for part in parts)):
        raise web.HTTPNotFound()
    found = await request.app[POOL].cached_file("/templates/" + quote(relative))
    if found is None:
        if not request.app[POOL].up():
            raise json_error(503, "no_instance", "no instance of the pool is up yet")
        raise web.HTTPNotFound()
    body, content_type = found
    kind = content_type.split(";")[0].strip().lower()
    if not kind.startswith(TEMPLATE_TYPES) or "svg" in kind or "xml" in kind:
        content_type = "application/octet-stream"  # never HTML or script on our origin
    return web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "no-cache",
                                            "X-Content-Type-Options": "nosniff"})


def with_user_inputs(object_info: dict[str, Any], user_input: Path) -> dict[str, Any]:
    """Upload widgets (``image_upload``) list the user's own input files too, as ComfyUI lists its input dir.

    The cached pool answer is shared: touched node entries are copied, never changed in place.
    """
    files: list[str] | None = None
    patched = dict(object_info)
    for name, info in object_info.items():
        inputs = info.get("input") if isinstance(info, dict) else None
        if not isinstance(inputs, dict):
            continue
        for section, specs in inputs.items():
            if not isinstance(specs, dict):
                continue
            for key, spec in specs.items():
                if not (isinstance(spec, list) and len(spec) > 1 and isinstance(spec[0], list)
                        and isinstance(spec[1], dict) and spec[1].get("image_upload")):
                    continue
                if files is None:
                    files = _input_files(user_input)
                node = patched[name] = copy.deepcopy(patched[name]) if patched[name] is info else patched[name]
                public = {c for c in spec[0] if not (isinstance(c, str) and c.startswith(STAGE + "/"))}
                node["input"][section][key] = [sorted(public | set(files)), spec[1]]
    return patched


def _input_files(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


async def _folder_paths(request: web.Request) -> web.StreamResponse:
    """Model folders; absolute server paths for admins only (the web UI uses them only in the desktop app)."""
    data_dir = instance_context(request).data_dir
    paths = await asyncio.to_thread(internal.folder_paths, data_dir)
    if request[USER].is_admin:
        return web.json_response(paths)
    root = data_dir.root
    return web.json_response({name: [_relative(Path(p), root) for p in folders] for name, folders in paths.items()})


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


async def _empty_logs(request: web.Request) -> web.StreamResponse:
    """The proxy's log mentions every user: not for users' eyes."""
    if request.path.endswith("/raw"):
        return web.json_response({"entries": [], "size": {"cols": 80, "rows": 24}})
    if request.method == "PATCH":
        return web.Response(status=200)
    return web.json_response("")


def setup_shared_routes(app: web.Application, scopes: Scopes) -> None:
    files = web.RouteTableDef()
    files.get("/view")(_view_with_public_input(scopes))
    add_routes_with_api_prefix(app, files)
    add_routes_with_api_prefix(app, _table(routes_files.routes, lambda r: r.path != "/view", scopes))
    add_routes_with_api_prefix(app, _table(userdata.routes, lambda r: True, scopes))
    add_routes_with_api_prefix(app, _table(routes_prompt.routes, lambda r: (r.method, r.path) in QUEUE_READS,
                                           scopes, with_queue=True))
    add_routes_with_api_prefix(app, _table(routes_jobs.routes, lambda r: r.method == "GET", scopes, with_queue=True))
    add_routes_with_api_prefix(app, _table(routes_info.routes, lambda r: r.path in INFO_READS, scopes))
    pooled = web.RouteTableDef()
    for path in POOL_PATHS:
        pooled.get(path)(_pooled)
    pooled.get("/object_info/{node_class}")(_pooled)
    pooled.get("/models/{folder}")(_pooled)
    app.router.add_get("/templates/{path:.+}", _pooled_template)  # before the web UI's own /templates
    pooled.get("/internal/logs")(_empty_logs)
    pooled.get("/internal/logs/raw")(_empty_logs)
    pooled.patch("/internal/logs/subscribe")(_empty_logs)
    pooled.get("/internal/folder_paths")(_folder_paths)
    add_routes_with_api_prefix(app, pooled)
    add_routes_with_api_prefix(app, _table(internal.routes, lambda r: r.path not in SKIPPED_INTERNAL, scopes))


def setup_web_ui(app: web.Application) -> None:
    """The ComfyUI frontend; registered last so every API route wins."""
    setup_frontend(app)
