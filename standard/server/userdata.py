"""/users, /settings and /userdata: the frontend's per-user storage, as ComfyUI serves it.

One user, ``default`` (ComfyUI without ``--multi-user``): its files live in
``WorkDirs.user/default``, settings in ``comfy.settings.json`` there. Userdata
paths arrive URL-encoded (``workflows%2Fa.json``); aiohttp decodes the match
info once and, as ComfyUI does, a remaining ``%`` is decoded once more. Every
path then goes through :func:`standard.paths.resolve_inside` (403 outside).
Disk work runs in a thread so a slow mounted bucket never stalls the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mimetypes
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from ..datadir import WorkDirs
from ..errors import PathOutsideRoot
from ..http_util import json_error, parse_json
from ..paths import resolve_inside
from . import keys
from .context import USER_ROOT, USER_SETTINGS, SettingsFile, instance_context
from .file_headers import FILE_CSP
from .routing import add_routes_with_api_prefix

log = logging.getLogger("comfyserve.userdata")

DEFAULT_USER = "default"
SETTINGS_FILE = "comfy.settings.json"
USER_CSS = "user.css"
# Files the frontend reads at every load and treats as empty when missing:
# answered with their empty content instead of a 404 (nothing is written).
EMPTY_DEFAULTS: dict[str, tuple[bytes, str]] = {
    USER_CSS: (b"", "text/css"),
    "comfy.templates.json": (b"[]", "application/json"),
}
# Folders the frontend lists while it loads; created up front so a fresh
# data dir answers [] instead of 404.
DEFAULT_FOLDERS = ("workflows", "subgraphs")
# Userdata is arbitrary user content: never rendered inline in the app origin.
DANGEROUS_TYPES = ("text/html", "application/xhtml+xml", "image/svg+xml", "application/javascript",
                   "text/javascript", "application/xml", "text/xml")

routes = web.RouteTableDef()
def _flag(request: web.Request, name: str, default: str = "") -> bool:
    return request.query.get(name, default).lower() == "true"


def _overwrite(request: web.Request) -> bool:
    return request.query.get("overwrite", "true") != "false"


def _decoded(raw: str) -> str:
    """ComfyUI decodes a path that still holds a ``%`` once more (double-encoded slashes)."""
    return unquote(raw) if "%" in raw else raw


def _resolve(request: web.Request, param: str = "file") -> Path:
    """The file a userdata route names, or the 400/403 ComfyUI answers."""
    raw = request.match_info.get(param, "")
    if not raw:
        raise web.HTTPBadRequest()
    try:
        return resolve_inside(instance_context(request).user_root, _decoded(raw))
    except PathOutsideRoot:
        raise web.HTTPForbidden() from None


def file_info(path: Path, relative_to: Path) -> dict[str, Any]:
    """ComfyUI's FileInfo: path, size, and times in milliseconds."""
    stat = path.stat()
    return {
        "path": path.relative_to(relative_to).as_posix(),
        "size": stat.st_size,
        "modified": int(stat.st_mtime * 1000),
        "created": int(stat.st_ctime * 1000),
    }


# -- /users -------------------------------------------------------------------


@routes.get("/users")
async def get_users(request: web.Request) -> web.Response:
    root = instance_context(request).user_root
    return web.json_response({"storage": "server", "migrated": await asyncio.to_thread(root.exists)})


@routes.post("/users")
async def post_users(request: web.Request) -> web.Response:
    body = await _json_body(request)
    username = body.get("username") if isinstance(body, dict) else None
    if not isinstance(username, str) or not username.strip():
        return web.json_response({"error": "username not provided"}, status=400)
    if username == DEFAULT_USER:
        return web.json_response({"error": "Duplicate username."}, status=400)
    return web.json_response(
        {"error": "this server has a single user profile ('default'); multi-user profiles are not enabled"},
        status=400,
    )


# -- /settings ----------------------------------------------------------------


def _read_settings(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        log.error("the user settings file is corrupted: %s", path)
        return {}
    return data if isinstance(data, dict) else {}


def _write_settings(path: Path, settings: dict[str, Any]) -> None:
    _atomic_write(path, json.dumps(settings, indent=4).encode())


class _SettingsStore:
    """Read-modify-write of the settings file, one writer at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = asyncio.Lock()

    async def read(self) -> dict[str, Any]:
        return await asyncio.to_thread(_read_settings, self.path)

    async def update(self, changes: dict[str, Any]) -> None:
        async with self.lock:
            settings = await self.read()
            settings.update(changes)
            await asyncio.to_thread(_write_settings, self.path, settings)


async def _json_body(request: web.Request) -> Any:
    try:
        return parse_json(await request.read())
    except ValueError as exc:
        raise json_error(400, "invalid_json", "Request body is not valid JSON", str(exc)) from None


@routes.get("/settings")
async def get_settings(request: web.Request) -> web.Response:
    return web.json_response(await instance_context(request).user_settings.read())


@routes.get("/settings/{id}")
async def get_setting(request: web.Request) -> web.Response:
    settings = await instance_context(request).user_settings.read()
    return web.json_response(settings.get(request.match_info["id"]))


@routes.post("/settings")
async def post_settings(request: web.Request) -> web.Response:
    changes = await _json_body(request)
    if not isinstance(changes, dict):
        raise json_error(400, "invalid_request", "settings must be a JSON object")
    await instance_context(request).user_settings.update(changes)
    return web.Response(status=200)


@routes.post("/settings/{id}")
async def post_setting(request: web.Request) -> web.Response:
    value = await _json_body(request)
    await instance_context(request).user_settings.update({request.match_info["id"]: value})
    return web.Response(status=200)


# -- /userdata listings -------------------------------------------------------


def _list_dir(path: Path, recurse: bool, full_info: bool, split: bool) -> list[Any]:
    results: list[Any] = []
    entries = path.rglob("*") if recurse else path.glob("*")
    for entry in sorted(entries):
        # glob.glob (ComfyUI) skips dotfiles; so do we (and our temp files).
        if not entry.is_file() or any(part.startswith(".") for part in entry.relative_to(path).parts):
            continue
        if full_info:
            results.append(file_info(entry, path))
            continue
        rel = entry.relative_to(path).as_posix()
        results.append([rel, *rel.split("/")] if split else rel)
    return results


@routes.get("/userdata")
async def list_userdata(request: web.Request) -> web.Response:
    directory = request.query.get("dir", "")
    if not directory:
        return web.Response(status=400, text="Directory not provided")
    try:
        path = resolve_inside(instance_context(request).user_root, _decoded(directory))
    except PathOutsideRoot:
        return web.Response(status=403, text="Invalid directory")
    if not await asyncio.to_thread(path.is_dir):
        return web.Response(status=404, text="Directory not found")
    results = await asyncio.to_thread(
        _list_dir, path, _flag(request, "recurse"), _flag(request, "full_info"), _flag(request, "split")
    )
    return web.json_response(results)


def _walk_v2(target: Path, base: Path) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for dirpath, dirnames, filenames in os.walk(target):
        for name in dirnames:
            rel = Path(dirpath, name).relative_to(base).as_posix()
            results.append({"name": name, "path": rel, "type": "directory"})
        for name in filenames:
            full = Path(dirpath, name)
            entry: dict[str, Any] = {"name": name, "path": full.relative_to(base).as_posix(), "type": "file"}
            try:
                stat = full.stat()
                entry["size"] = stat.st_size
                entry["modified"] = stat.st_mtime
            except OSError:
                pass
            results.append(entry)
    results.sort(key=lambda e: (e["type"] != "directory", e["name"].lower()))
    return results


@routes.get("/v2/userdata")
async def list_userdata_v2(request: web.Request) -> web.Response:
    base = instance_context(request).user_root
    requested = unquote(request.query.get("path", ""))
    try:
        target = resolve_inside(base, requested) if requested else base
    except PathOutsideRoot:
        return web.Response(status=400, text="Invalid path requested")
    if not await asyncio.to_thread(target.exists):
        if target == base:
            return web.json_response([])
        return web.Response(status=404, text="Requested path not found")
    if not await asyncio.to_thread(target.is_dir):
        return web.Response(status=400, text="Requested path is not a directory")
    try:
        results = await asyncio.to_thread(_walk_v2, target, base)
    except OSError:
        log.exception("error listing %s", target)
        return web.Response(status=500, text="Error reading directory contents")
    return web.json_response(results)


# -- /userdata/{file} ---------------------------------------------------------


@routes.get("/userdata/{file}")
async def get_userdata(request: web.Request) -> web.StreamResponse:
    path = _resolve(request)
    root = instance_context(request).user_root
    is_user_css = path == root / USER_CSS
    if not await asyncio.to_thread(path.is_file):
        default = EMPTY_DEFAULTS.get(path.relative_to(root).as_posix()) if path != root else None
        if default is None:
            return web.Response(status=404)
        body, content_type = default
        return web.Response(body=body, content_type=content_type, headers={"Cache-Control": "no-cache"})
    if is_user_css:
        content_type, disposition = "text/css", "inline"
    else:
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if content_type in DANGEROUS_TYPES:
            content_type = "application/octet-stream"
        disposition = "attachment"
    return web.FileResponse(path, headers={
        "Content-Type": content_type,
        "X-Content-Type-Options": "nosniff",
        "Content-Disposition": disposition,
        "Content-Security-Policy": FILE_CSP,
    })


def _atomic_write(path: Path, body: bytes) -> None:
    """Write ``body`` to ``path`` through a temp file so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(body)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _result(path: Path, root: Path, full_info: bool) -> Any:
    return file_info(path, root) if full_info else path.relative_to(root).as_posix()


@routes.post("/userdata/{file}")
async def post_userdata(request: web.Request) -> web.Response:
    path = _resolve(request)
    root = instance_context(request).user_root
    if path == root:
        return web.Response(status=400, reason="Invalid filename")
    if not _overwrite(request) and await asyncio.to_thread(path.exists):
        return web.Response(status=409, text="File already exists")
    body = await request.read()
    try:
        await asyncio.to_thread(_atomic_write, path, body)
    except OSError as exc:
        log.warning("error saving userdata file %s: %s", path, exc)
        return web.Response(status=400, reason='Invalid filename. Please avoid special characters like :\\/*?"<>|')
    info = await asyncio.to_thread(_result, path, root, _flag(request, "full_info", "false"))
    return web.json_response(info)


@routes.delete("/userdata/{file}")
async def delete_userdata(request: web.Request) -> web.Response:
    path = _resolve(request)
    if not await asyncio.to_thread(path.is_file):
        return web.Response(status=404)
    await asyncio.to_thread(path.unlink)
    return web.Response(status=204)


def _move(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(source, dest)


@routes.post("/userdata/{file}/move/{dest}")
async def move_userdata(request: web.Request) -> web.Response:
    source = _resolve(request)
    if not await asyncio.to_thread(source.exists) or source == instance_context(request).user_root:
        return web.Response(status=404)
    dest = _resolve(request, "dest")
    root = instance_context(request).user_root
    if dest == root:
        return web.Response(status=400)
    if not _overwrite(request) and await asyncio.to_thread(dest.exists):
        return web.Response(status=409, text="File already exists")
    log.info("moving userdata %s -> %s", source, dest)
    await asyncio.to_thread(_move, source, dest)
    info = await asyncio.to_thread(_result, dest, root, _flag(request, "full_info", "false"))
    return web.json_response(info)


def open_userdata(workdirs: WorkDirs) -> tuple[Path, SettingsFile]:
    """The default user's folder in ``workdirs.user`` (with the folders the frontend lists) and its settings."""
    root = workdirs.user / DEFAULT_USER
    for folder in DEFAULT_FOLDERS:
        (root / folder).mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    return root, _SettingsStore(root / SETTINGS_FILE)


def setup_userdata(app: web.Application) -> None:
    """Attach the userdata routes, over the instance's own ``WorkDirs.user``."""
    app[USER_ROOT], app[USER_SETTINGS] = open_userdata(app[keys.WORKDIRS])
    add_routes_with_api_prefix(app, routes)
