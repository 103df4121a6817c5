"""/object_info, /embeddings, /models, /system_stats and /features (read-only facts)."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import sys
from typing import Any

from aiohttp import web

from .. import __version__, model_folders
from ..errors import PathOutsideRoot
from ..http_util import json_error
from ..settings import StandardSettings
from .context import instance_context

routes = web.RouteTableDef()


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def server_features(settings: StandardSettings) -> dict[str, Any]:
    """ComfyUI's server feature flags (GET /features and the WS ``feature_flags`` reply)."""
    return {
        "supports_preview_metadata": False,
        "max_upload_size": settings.max_upload_size_bytes,
        "extension": {"manager": {"supports_v4": False}},
    }


def _registry(request: web.Request) -> Any:
    registry = instance_context(request).server.registry
    if registry is None:
        raise json_error(503, "runtime_not_ready", "The embedded engine is not ready")
    return registry


@routes.get("/object_info")
async def get_object_info(request: web.Request) -> web.Response:
    return web.json_response(_registry(request).object_info())


@routes.get("/object_info/{node_class}")
async def get_object_info_node(request: web.Request) -> web.Response:
    node_class = request.match_info["node_class"]
    info = _registry(request).object_info_for(node_class)
    return web.json_response({} if info is None else {node_class: info})


@routes.get("/embeddings")
async def get_embeddings(request: web.Request) -> web.Response:
    data_dir = instance_context(request).data_dir
    return web.json_response(await asyncio.to_thread(model_folders.list_embeddings, data_dir))


@routes.get("/models")
async def list_model_types(request: web.Request) -> web.Response:
    return web.json_response(model_folders.folder_names())


@routes.get("/models/{folder}")
async def get_models(request: web.Request) -> web.Response:
    data_dir = instance_context(request).data_dir
    files = await asyncio.to_thread(model_folders.list_folder, data_dir, request.match_info["folder"])
    if files is None:
        return web.Response(status=404)
    return web.json_response(files)


@routes.get("/view_metadata/{folder_name}")
async def view_metadata(request: web.Request) -> web.Response:
    filename = request.query.get("filename")
    if not filename:
        return web.Response(status=404)
    data_dir = instance_context(request).data_dir
    try:
        metadata = await asyncio.to_thread(
            model_folders.safetensors_metadata, data_dir, request.match_info["folder_name"], filename
        )
    except PathOutsideRoot:
        raise json_error(403, "forbidden", "filename leaves the model folder") from None
    if metadata is None:
        return web.Response(status=404)
    return web.json_response(metadata)


def _memory_bytes() -> tuple[int, int]:
    """(total, available) RAM from sysconf; 0 when the platform hides it."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        free = os.sysconf("SC_AVPHYS_PAGES") * page
        return int(total), int(free)
    except (ValueError, OSError, AttributeError):
        return 0, 0


HIDDEN_SYSTEM_FACTS = ("environ", "env")


def flag_names(argv: Any) -> list[str]:
    """A command line reduced to its program name and flag names: no value (tokens, keys, paths) is shown.

    The key stays because ComfyUI's web UI reads ``system.argv`` (it looks for
    ``--enable-manager`` and ``--disable-api-nodes``, and fails without a list).
    """
    if not isinstance(argv, list) or not argv:
        return []
    program = os.path.basename(str(argv[0]))
    return [program, *(a.split("=", 1)[0] for a in argv[1:] if isinstance(a, str) and a.startswith("-"))]


def without_secrets(stats: Any) -> Any:
    """A ``/system_stats`` body (ours, or relayed from ComfyUI) with flag names only and no environment."""
    if isinstance(stats, dict) and isinstance(stats.get("system"), dict):
        system = {k: v for k, v in stats["system"].items() if k not in HIDDEN_SYSTEM_FACTS}
        if "argv" in system:
            system["argv"] = flag_names(system["argv"])
        stats = {**stats, "system": system}
    return stats


@routes.get("/system_stats")
async def system_stats(request: web.Request) -> web.Response:
    """Versions and memory; never our command line (it holds --token and keys)."""
    ram_total, ram_free = _memory_bytes()
    frontend_version = _version("comfyui-frontend-package")
    stats = {
        "system": {
            "os": sys.platform,
            "ram_total": ram_total,
            "ram_free": ram_free,
            "comfyui_version": f"comfyserve-{__version__}",
            "required_frontend_version": frontend_version,
            "installed_templates_version": None,
            "required_templates_version": None,
            "python_version": sys.version,
            "pytorch_version": "none (embedded numpy engine)",
            "embedded_python": os.path.split(os.path.split(sys.executable)[0])[1] == "python_embeded",
            "argv": ["comfyserve"],  # never sys.argv: it holds --token and keys
            "runtime": "embedded",
            "comfyserve_version": __version__,
            "numpy_version": _version("numpy"),
            "pillow_version": _version("pillow"),
            "frontend_version": frontend_version,
        },
        "devices": [
            {
                "name": "cpu",
                "type": "cpu",
                "index": None,
                "vram_total": ram_total,
                "vram_free": ram_free,
                "torch_vram_total": 0,
                "torch_vram_free": 0,
            }
        ],
    }
    return web.json_response(stats)


@routes.get("/features")
async def get_features(request: web.Request) -> web.Response:
    return web.json_response(server_features(instance_context(request).settings))
