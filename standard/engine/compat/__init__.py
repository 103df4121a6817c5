"""Stand-ins for the ComfyUI modules plugins import (``folder_paths``, ``comfy.utils``,
``comfy.model_management``, ``nodes``, ``server``), so a plugin written for ComfyUI's
``NODE_CLASS_MAPPINGS`` convention loads into the embedded engine unchanged.

They are installed into ``sys.modules`` only under names nothing else has taken.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from ..node_class import NodeClasses
from . import comfy_utils, folder_paths, model_management

MAX_RESOLUTION = 16384


class _PromptServerStandIn:
    """``server.PromptServer.instance``: plugins send events and register routes through it."""

    def __init__(self) -> None:
        from aiohttp import web

        self.routes = web.RouteTableDef()
        self.send_sync_hook: Any = None
        self.client_id: str | None = None
        self.last_node_id: str | None = None

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        if self.send_sync_hook is not None:
            self.send_sync_hook(event, data, sid)

    def send_progress_text(self, text: str, node_id: str, sid: str | None = None) -> None:
        """Progress text is a newer ComfyUI feature; accepted and dropped."""


PROMPT_SERVER = _PromptServerStandIn()


def _module(name: str, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


def install(node_class_mappings: NodeClasses, display_names: dict[str, str]) -> None:
    """Register the stand-ins (idempotent); ``nodes`` shows the engine's live mappings."""
    comfy = sys.modules.get("comfy") or _module("comfy", __path__=[])
    modules: dict[str, types.ModuleType] = {
        "folder_paths": folder_paths,
        "comfy": comfy,
        "comfy.utils": comfy_utils,
        "comfy.model_management": model_management,
        "nodes": _module("nodes", NODE_CLASS_MAPPINGS=node_class_mappings,
                         NODE_DISPLAY_NAME_MAPPINGS=display_names, MAX_RESOLUTION=MAX_RESOLUTION),
        "server": _module("server", PromptServer=type("PromptServer", (), {"instance": PROMPT_SERVER})),
    }
    for name, module in modules.items():
        existing = sys.modules.get(name)
        if existing is None or getattr(existing, "__comfyserve_compat__", False):
            module.__dict__["__comfyserve_compat__"] = True
            sys.modules[name] = module
    if getattr(sys.modules.get("comfy"), "__comfyserve_compat__", False):
        vars(sys.modules["comfy"]).update(utils=comfy_utils, model_management=model_management)
