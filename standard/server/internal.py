"""What the ComfyUI frontend asks for while it loads, answered as ComfyUI does.

    /internal/logs /internal/logs/raw /internal/logs/subscribe   the server log panel
    /internal/folder_paths /internal/files/{directory_type}
    /i18n /workflow_templates[/{module}/{file}]                  from custom_nodes/*
    /experiment/models[/{folder}]                                the model library
    /extensions                                                  JS extension URLs (ours included)
    /node_replacements /global_subgraphs[/{id}]                  empty: the engine has none

ComfyUI serves /internal/* only unprefixed; we add /api/internal/* as well.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import model_folders
from ..datadir import DataDir
from ..errors import PathOutsideRoot
from ..http_util import parse_json
from ..paths import resolve_inside
from . import keys
from .context import instance_context
from .extensions import extension_urls, plugin_web_dirs
from .file_headers import file_headers
from .frontend import frontend_root
from .routing import add_routes_with_api_prefix

log = logging.getLogger("comfyserve.internal")

routes = web.RouteTableDef()
LOG_ENTRIES_MAX = 300
EXTRA_LOCALE_FILES = ("nodeDefs.json", "commands.json", "settings.json")
EXAMPLE_WORKFLOW_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")
EXPERIMENT_MODELS_EXCLUDED = frozenset({"configs", "custom_nodes"})


# -- the server log, as ComfyUI's log panel reads it ----------------------------


class LogBuffer(logging.Handler):
    """The last log lines of this process, as ComfyUI's ``{"t", "m"}`` entries.

    Subscribed WebSocket clients get each new entry as a ``logs`` event.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.entries: collections.deque[dict[str, str]] = collections.deque(maxlen=LOG_ENTRIES_MAX)
        self.listeners: list[Any] = []
        self._local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._local, "busy", False):
            return  # a log line written while delivering one: drop, never loop
        self._local.busy = True
        try:
            entry = {"t": datetime.fromtimestamp(record.created).isoformat(), "m": self.format(record) + "\n"}
            self.entries.append(entry)
            for listener in list(self.listeners):
                listener(entry)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)
        finally:
            self._local.busy = False


_LOG_BUFFER: LogBuffer | None = None


def log_buffer() -> LogBuffer:
    """The process-wide buffer, attached to the root logger on first use."""
    global _LOG_BUFFER
    if _LOG_BUFFER is None:
        _LOG_BUFFER = LogBuffer()
        logging.getLogger().addHandler(_LOG_BUFFER)
    return _LOG_BUFFER


def terminal_size() -> dict[str, int]:
    size = shutil.get_terminal_size((80, 24))
    return {"cols": size.columns, "rows": size.lines}


LOG_SUBSCRIBERS: web.AppKey[set[str]] = web.AppKey("log_subscribers", set)


@routes.get("/internal/logs")
async def get_logs(request: web.Request) -> web.Response:
    return web.json_response("".join(e["t"] + " - " + e["m"] for e in list(log_buffer().entries)))


@routes.get("/internal/logs/raw")
async def get_logs_raw(request: web.Request) -> web.Response:
    return web.json_response({"entries": list(log_buffer().entries), "size": terminal_size()})


@routes.patch("/internal/logs/subscribe")
async def subscribe_logs(request: web.Request) -> web.Response:
    try:
        body = parse_json(await request.read())
        client_id, enabled = str(body["clientId"]), bool(body["enabled"])
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": "expected {\"clientId\": str, \"enabled\": bool}"}, status=400)
    subscribers = request.app[LOG_SUBSCRIBERS]
    if enabled:
        subscribers.add(client_id)
    else:
        subscribers.discard(client_id)
    return web.Response(status=200)


def _log_forwarder(app: web.Application) -> Callable[[dict[str, str]], None]:
    def forward(entry: dict[str, str]) -> None:
        server = app[keys.PROMPT_SERVER]
        for sid in app[LOG_SUBSCRIBERS].copy():
            server.send_sync("logs", {"entries": [entry], "size": terminal_size()}, sid)
    return forward


async def _log_forwarding_ctx(app: web.Application) -> AsyncIterator[None]:
    forward = _log_forwarder(app)
    buffer = log_buffer()
    buffer.listeners.append(forward)
    yield
    buffer.listeners.remove(forward)


# -- folders and files -----------------------------------------------------------


def folder_paths(data_dir: DataDir) -> dict[str, list[str]]:
    """ComfyUI's ``folder_names_and_paths`` keys with their directories."""
    out: dict[str, list[str]] = {}
    for name in model_folders.folder_names():
        path = model_folders.folder_path(data_dir, name)
        if path is not None:
            out[name] = [str(path)]
    return out


@routes.get("/internal/folder_paths")
async def get_folder_paths(request: web.Request) -> web.Response:
    return web.json_response(folder_paths(instance_context(request).data_dir))


def _files_newest_first(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    entries = [e for e in os.scandir(directory) if e.is_file() and not e.name.startswith(".")]
    entries.sort(key=lambda e: -e.stat().st_mtime)
    return [e.name for e in entries]


@routes.get("/internal/files/{directory_type}")
async def get_files(request: web.Request) -> web.Response:
    kind = request.match_info["directory_type"]
    if kind not in ("output", "input", "temp"):
        return web.json_response({"error": "Invalid directory type"}, status=400)
    directory = instance_context(request).workdirs.by_type(kind)
    return web.json_response(await asyncio.to_thread(_files_newest_first, directory))


# -- custom node translations and example workflows -------------------------------


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        log.error("error loading %s", path)
        return {}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def build_translations(custom_nodes: Path) -> dict[str, Any]:
    """``{lang: {...main.json, nodeDefs, commands, settings}}`` from ``custom_nodes/*/locales``."""
    translations: dict[str, Any] = {}
    if not custom_nodes.is_dir():
        return translations
    for plugin in sorted(p for p in custom_nodes.iterdir() if p.is_dir()):
        locales = plugin / "locales"
        if not locales.is_dir():
            continue
        for lang_dir in sorted(p for p in locales.iterdir() if p.is_dir()):
            found = _load_json(lang_dir / "main.json")
            found = found if isinstance(found, dict) else {}
            for extra in EXTRA_LOCALE_FILES:
                data = _load_json(lang_dir / extra)
                if data:
                    found[extra.split(".")[0]] = data
            if found:
                translations[lang_dir.name] = _merge(translations.get(lang_dir.name, {}), found)
    return translations


@routes.get("/i18n")
async def get_i18n(request: web.Request) -> web.Response:
    custom_nodes = instance_context(request).data_dir.custom_nodes
    return web.json_response(await asyncio.to_thread(build_translations, custom_nodes))


def collect_workflow_templates(custom_nodes: Path) -> dict[str, dict[str, Path]]:
    """``{plugin: {template name: file}}``; the same physical folder counts once."""
    found: dict[str, dict[str, Path]] = {}
    if not custom_nodes.is_dir():
        return found
    seen: dict[str, set[Path]] = {}
    for folder_name in EXAMPLE_WORKFLOW_FOLDERS:
        for workflows in sorted(custom_nodes.glob(f"*/{folder_name}")):
            if not workflows.is_dir():
                continue
            plugin = workflows.parent.name
            real = workflows.resolve()
            if real in seen.setdefault(plugin, set()):
                continue
            seen[plugin].add(real)
            templates = found.setdefault(plugin, {})
            for file in sorted(workflows.glob("*.json")):
                name, suffix = file.stem, 2
                while name in templates:
                    name = f"{file.stem}-{folder_name}" if suffix == 2 else f"{file.stem}-{folder_name}-{suffix}"
                    suffix += 1
                templates[name] = file
    return found


@routes.get("/workflow_templates")
async def get_workflow_templates(request: web.Request) -> web.Response:
    found = await asyncio.to_thread(collect_workflow_templates, instance_context(request).data_dir.custom_nodes)
    return web.json_response({plugin: list(templates) for plugin, templates in found.items()})


@routes.get("/workflow_templates/{module_name}/{filename}")
async def get_workflow_template_file(request: web.Request) -> web.StreamResponse:
    filename = request.match_info["filename"]
    if not filename.endswith(".json"):
        raise web.HTTPNotFound()
    found = await asyncio.to_thread(collect_workflow_templates, instance_context(request).data_dir.custom_nodes)
    path = found.get(request.match_info["module_name"], {}).get(filename[: -len(".json")])
    if path is None:
        raise web.HTTPNotFound()
    return web.FileResponse(path)


# -- the model library ---------------------------------------------------------------


@routes.get("/experiment/models")
async def get_model_folders(request: web.Request) -> web.Response:
    paths = folder_paths(instance_context(request).data_dir)
    return web.json_response(
        [{"name": name, "folders": dirs} for name, dirs in paths.items() if name not in EXPERIMENT_MODELS_EXCLUDED]
    )


def model_files(root: Path) -> list[dict[str, Any]]:
    """ComfyUI's model file entries: name, pathIndex, modified, created, size."""
    out: list[dict[str, Any]] = []
    if not root.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if d not in model_folders.EXCLUDED_DIR_NAMES and not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in model_folders.SUPPORTED_PT_EXTENSIONS:
                continue
            full = os.path.join(dirpath, name)
            try:
                stat = os.stat(full)
            except OSError:
                continue
            out.append({"name": os.path.relpath(full, root), "pathIndex": 0,
                        "modified": stat.st_mtime, "created": stat.st_ctime, "size": stat.st_size})
    return out


@routes.get("/experiment/models/{folder}")
async def get_models_in_folder(request: web.Request) -> web.Response:
    folder = request.match_info["folder"]
    root = model_folders.folder_path(instance_context(request).data_dir, folder)
    if root is None:
        return web.Response(status=404)
    return web.json_response(await asyncio.to_thread(model_files, root))


@routes.get("/experiment/models/preview/{folder}/{path_index}/{filename:.*}")
async def get_model_preview(request: web.Request) -> web.StreamResponse:
    root = model_folders.folder_path(instance_context(request).data_dir, request.match_info["folder"])
    if root is None or request.match_info["path_index"] != "0":
        return web.Response(status=404)
    try:
        model = resolve_inside(root, request.match_info["filename"])
    except PathOutsideRoot:
        return web.Response(status=404)
    base = model.with_suffix("")
    for candidate in (base.with_suffix(".webp"), base.with_suffix(".png"), base.with_suffix(".jpg"),
                      base.with_suffix(".preview.png"), base.with_suffix(".preview.webp")):
        if await asyncio.to_thread(candidate.is_file):
            return web.FileResponse(candidate, headers=file_headers(candidate.name))
    return web.Response(status=404)


# -- extensions and things the engine has none of ------------------------------------


@routes.get("/extensions")
async def get_extensions(request: web.Request) -> web.Response:
    urls = await asyncio.to_thread(extension_urls, frontend_root(), plugin_web_dirs(request))
    return web.json_response(urls)


@routes.get("/node_replacements")
async def get_node_replacements(request: web.Request) -> web.Response:
    return web.json_response({})


def custom_node_subgraphs(custom_nodes: Path) -> dict[str, dict[str, Any]]:
    """``custom_nodes/*/subgraphs/*.json`` keyed by a stable hash, as ComfyUI lists them."""
    out: dict[str, dict[str, Any]] = {}
    if not custom_nodes.is_dir():
        return out
    for file in sorted(custom_nodes.glob("*/subgraphs/*.json")):
        path = file.relative_to(custom_nodes).as_posix()
        key = hashlib.sha256(f"custom_node{path}".encode()).hexdigest()
        out[key] = {"source": "custom_node", "name": file.stem, "path": path,
                    "info": {"node_pack": file.parent.parent.name}}
    return out


@routes.get("/global_subgraphs")
async def get_global_subgraphs(request: web.Request) -> web.Response:
    custom_nodes = instance_context(request).data_dir.custom_nodes
    return web.json_response(await asyncio.to_thread(custom_node_subgraphs, custom_nodes))


@routes.get("/global_subgraphs/{id}")
async def get_global_subgraph(request: web.Request) -> web.Response:
    custom_nodes = instance_context(request).data_dir.custom_nodes
    entry = (await asyncio.to_thread(custom_node_subgraphs, custom_nodes)).get(request.match_info["id"])
    if entry is not None:
        data = await asyncio.to_thread(_load_json, custom_nodes / entry["path"])
        entry = {**entry, "data": json.dumps(data)}
    return web.json_response(entry)


def setup_internal_routes(app: web.Application) -> None:
    """Attach the frontend's load-time routes and start capturing the log."""
    log_buffer()
    app[LOG_SUBSCRIBERS] = set()
    app.cleanup_ctx.append(_log_forwarding_ctx)
    add_routes_with_api_prefix(app, routes)
