"""The ComfyUI web UI at ``/``: the pinned ``comfyui-frontend-package`` plus our extension.

    /                          index.html (never cached: it names the hashed bundles)
    /assets/*-<hash>.js ...    cached for a year (the name changes with the content)
    /user.css                  an empty sheet unless the frontend ships one (index.html links it)
    /extensions/comfyserve/*   our extension (web_extension/: the restart button)
    /extensions/<plugin>/*     a plugin's WEB_DIRECTORY, when the engine reports one
    /templates/*               workflow templates: the comfyui-workflow-templates package
                               when installed, else ours (web_templates/)
    /docs/*                    comfyui-embedded-docs, when installed
    /*                         any other file of the frontend package

Registered last, so every API route wins over a file of the same name. With
token auth on, the auth middleware sends a browser to /login first; the
session cookie then covers the page, its assets and its API calls.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import gzip
import importlib.util
import os
import re
import stat as stat_module
from email.utils import formatdate
from pathlib import Path

from aiohttp import web

from ..errors import PathOutsideRoot
from ..http_util import json_error
from ..paths import resolve_inside
from .extensions import OWN_EXTENSION_DIR, OWN_EXTENSION_NAME, plugin_web_dirs

OWN_TEMPLATES_DIR = Path(__file__).resolve().parent / "web_templates"
IMMUTABLE = "public, max-age=31536000, immutable"
NO_CACHE = "no-cache"
# Vite's content hash in asset names: index-B2rHQ9Sn.js, api-BA-sjSl5.js.
HASHED_NAME = re.compile(r"-[A-Za-z0-9_-]{8}\.[a-z0-9]+$")
CONTENT_TYPES = {
    ".js": "application/javascript; charset=utf-8",
    ".mjs": "application/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".webp": "image/webp",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".ttf": "font/ttf",
    ".ico": "image/x-icon",
    ".html": "text/html; charset=utf-8",
}


COMPRESSIBLE = frozenset({".js", ".mjs", ".css", ".json", ".map", ".svg", ".html", ".txt", ".md"})
MIN_COMPRESS_BYTES = 1024
GZIP_LEVEL = 5  # ~4-5x smaller bundles at about half the CPU of level 9
GZIP_CACHE_MAX_BYTES = 64 * 1024 * 1024


class GzipCache:
    """Compressed copies of static files, least recently used dropped past a byte budget.

    The UI is ~23 MB of JavaScript and CSS uncompressed (~5 MB gzipped); behind
    a cloud proxy that difference is the page's load time. Keyed by path, size
    and mtime, so an edited plugin script is compressed afresh.
    """

    def __init__(self, max_bytes: int = GZIP_CACHE_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self.entries: collections.OrderedDict[tuple[str, int, int], bytes] = collections.OrderedDict()

    async def get(self, path: Path, stat: os.stat_result) -> bytes:
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        body = self.entries.get(key)
        if body is not None:
            self.entries.move_to_end(key)
            return body
        body = await asyncio.to_thread(_gzip_file, path)
        if len(body) <= self.max_bytes:
            self.entries[key] = body
            self.size += len(body)
            while self.size > self.max_bytes:
                _, dropped = self.entries.popitem(last=False)
                self.size -= len(dropped)
        return body


def _gzip_file(path: Path) -> bytes:
    return gzip.compress(path.read_bytes(), GZIP_LEVEL, mtime=0)


GZIP_CACHE = GzipCache()


def _accepts_gzip(request: web.Request) -> bool:
    return any(part.split(";")[0].strip() == "gzip" for part in request.headers.get("Accept-Encoding", "").split(","))


def _package_dir(module: str, *parts: str) -> Path | None:
    """A folder inside an installed package, located without importing the package."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location, *parts)
        if candidate.is_dir():
            return candidate.resolve()
    return None


@functools.cache
def frontend_root() -> Path | None:
    """The static folder of the pinned comfyui-frontend-package, or None when it is missing."""
    return _package_dir("comfyui_frontend_package", "static")


@functools.cache
def templates_root() -> Path:
    return _package_dir("comfyui_workflow_templates", "templates") or OWN_TEMPLATES_DIR


@functools.cache
def docs_root() -> Path | None:
    return _package_dir("comfyui_embedded_docs", "docs")


def cache_control(relative: str) -> str:
    """Hashed bundles never change under their name; everything else is revalidated."""
    if relative.startswith("assets/") and HASHED_NAME.search(relative):
        return IMMUTABLE
    return NO_CACHE


async def _file_response(request: web.Request, root: Path | None, relative: str, *,
                         cache: str | None = None) -> web.StreamResponse:
    """``root/relative`` if it is a file inside ``root`` (gzipped when the client takes it), else 404."""
    if root is None or not relative:
        raise web.HTTPNotFound()
    try:
        path = resolve_inside(root, relative)
    except PathOutsideRoot:
        raise web.HTTPNotFound() from None
    try:
        stat = await asyncio.to_thread(path.stat)
    except OSError:
        raise web.HTTPNotFound() from None
    if not stat_module.S_ISREG(stat.st_mode):
        raise web.HTTPNotFound()
    headers = {"Cache-Control": cache or cache_control(relative)}
    content_type = CONTENT_TYPES.get(path.suffix.lower())
    if content_type is not None:
        headers["Content-Type"] = content_type
    if path.suffix.lower() not in COMPRESSIBLE or stat.st_size < MIN_COMPRESS_BYTES:
        return web.FileResponse(path, headers=headers)
    headers["Vary"] = "Accept-Encoding"
    headers["Last-Modified"] = formatdate(stat.st_mtime, usegmt=True)
    if not _accepts_gzip(request):
        return web.FileResponse(path, headers=headers)
    etag = f'"{stat.st_mtime_ns:x}-{stat.st_size:x}-gz"'
    headers["ETag"] = etag
    if etag in (tag.strip() for tag in request.headers.get("If-None-Match", "").split(",")):
        return web.Response(status=304, headers={k: v for k, v in headers.items() if k != "Content-Type"})
    body = await GZIP_CACHE.get(path, stat)
    headers["Content-Encoding"] = "gzip"
    return web.Response(body=body, headers=headers)


async def index(request: web.Request) -> web.StreamResponse:
    root = frontend_root()
    if root is None:
        raise json_error(404, "frontend_missing", "comfyui-frontend-package is not installed",
                         "pip install comfyui-frontend-package==1.58.1")
    response = await _file_response(request, root, "index.html")
    response.headers.update({"Cache-Control": "no-cache", "Pragma": "no-cache", "Expires": "0"})
    return response


async def user_css(request: web.Request) -> web.StreamResponse:
    root = frontend_root()
    if root is not None and (root / "user.css").is_file():
        return await _file_response(request, root, "user.css")
    return web.Response(body=b"", content_type="text/css", headers={"Cache-Control": NO_CACHE})


async def extension_file(request: web.Request) -> web.StreamResponse:
    name, relative = request.match_info["name"], request.match_info["path"]
    if name == OWN_EXTENSION_NAME:
        return await _file_response(request, OWN_EXTENSION_DIR, relative, cache=NO_CACHE)
    directory = plugin_web_dirs(request).get(name)
    if directory is None:
        # The frontend's own extensions/core/*.js live in its static folder.
        return await _file_response(request, frontend_root(), f"extensions/{name}/{relative}", cache=NO_CACHE)
    return await _file_response(request, directory, relative, cache=NO_CACHE)


LOCALIZED_INDEX = re.compile(r"^index\.[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]+)?\.json$")


async def template_file(request: web.Request) -> web.StreamResponse:
    root, relative = templates_root(), request.match_info["path"]
    if root == OWN_TEMPLATES_DIR and LOCALIZED_INDEX.match(relative):
        relative = "index.json"  # our few templates are described in English only
    return await _file_response(request, root, relative, cache=NO_CACHE)


async def docs_file(request: web.Request) -> web.StreamResponse:
    relative = request.match_info["path"] or "index.html"
    return await _file_response(request, docs_root(), relative, cache=NO_CACHE)


async def static_file(request: web.Request) -> web.StreamResponse:
    return await _file_response(request, frontend_root(), request.match_info["path"])


async def own_extension_file(request: web.Request) -> web.StreamResponse:
    return await _file_response(request, OWN_EXTENSION_DIR, request.match_info["path"], cache=NO_CACHE)


def own_extension_routes() -> list[web.RouteDef]:
    """Just our extension's files, for a front that proxies another server's web UI.

    Such a front also appends :func:`standard.server.extensions.own_extension_urls`
    to the backend's ``/extensions`` answer so the page loads them.
    """
    return [web.get(f"/extensions/{OWN_EXTENSION_NAME}/{{path:.+}}", own_extension_file)]


def setup_frontend(app: web.Application) -> None:
    """Serve the web UI; call after every API route so those win."""
    app.router.add_routes([
        web.get("/", index),
        web.get("/index.html", index),
        web.get("/user.css", user_css),
        web.get("/extensions/{name}/{path:.+}", extension_file),
        web.get("/templates/{path:.+}", template_file),
        web.get("/docs/{path:.*}", docs_file),
        web.get("/{path:.+}", static_file),
    ])
