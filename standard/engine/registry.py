"""The node classes an instance can run: the built-in CPU node set plus plugins
from ``DIR/custom_nodes`` (ComfyUI's ``NODE_CLASS_MAPPINGS`` convention).

``load()`` runs at start and again on ``/restart``: it re-imports every plugin,
so a file dropped into ``custom_nodes`` becomes usable without a new process.
A plugin that fails to import is recorded in ``plugin_errors`` and skipped.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from ..datadir import DataDir, WorkDirs
from . import compat, context, nodes_io, nodes_postprocessing, nodes_transform
from .node_class import NodeClasses

log = logging.getLogger("comfyserve.engine")

BUILTIN_MODULES = (nodes_io, nodes_transform, nodes_postprocessing)


class NodeRegistry:
    """Node classes by name, display names, plugin import errors and web folders."""

    def __init__(self, data_dir: DataDir, workdirs: WorkDirs) -> None:
        self.data_dir = data_dir
        self.context = context.EngineContext(data_dir, workdirs)
        self.node_classes: NodeClasses = {}
        self.display_names: dict[str, str] = {}
        self.plugin_errors: dict[str, str] = {}
        self.plugins: list[str] = []
        self.web_directories: dict[str, Path] = {}
        self._module_prefix = "comfyserve_plugin_" + hashlib.sha1(str(data_dir.root).encode()).hexdigest()[:8]

    @property
    def builtin_names(self) -> frozenset[str]:
        return frozenset(name for module in BUILTIN_MODULES for name in module.NODE_CLASS_MAPPINGS)

    def load(self) -> None:
        """(Re)build the node set: built-ins first, then every plugin in ``custom_nodes``."""
        classes: NodeClasses = {}
        names: dict[str, str] = {}
        for module in BUILTIN_MODULES:
            classes.update(module.NODE_CLASS_MAPPINGS)
            names.update(module.NODE_DISPLAY_NAME_MAPPINGS)
        self.node_classes, self.display_names = classes, names
        self.plugin_errors, self.plugins, self.web_directories = {}, [], {}
        context.set_default(self.context)
        compat.install(self.node_classes, self.display_names)
        with context.use(self.context):
            for path in self._plugin_paths():
                self._load_plugin(path)

    def _plugin_paths(self) -> list[Path]:
        root = self.data_dir.custom_nodes
        if not root.is_dir():
            return []
        found = []
        for path in sorted(root.iterdir()):
            if path.name.startswith((".", "__")) or path.name.endswith(".disabled"):
                continue
            if path.is_file() and path.suffix == ".py":
                found.append(path)
            elif path.is_dir() and (path / "__init__.py").is_file():
                found.append(path)
        return found

    def _load_plugin(self, path: Path) -> None:
        name = path.stem if path.is_file() else path.name
        module_name = f"{self._module_prefix}_{name}"
        for loaded in [m for m in sys.modules if m == module_name or m.startswith(module_name + ".")]:
            del sys.modules[loaded]  # re-import on restart, never reuse the old code
        try:
            module = _import_file(module_name, path)
            mappings = getattr(module, "NODE_CLASS_MAPPINGS", None)
            if not isinstance(mappings, dict):
                raise ImportError("the module defines no NODE_CLASS_MAPPINGS dict")
        except BaseException as exc:  # a plugin may raise anything, SystemExit included
            if isinstance(exc, KeyboardInterrupt):
                raise
            sys.modules.pop(module_name, None)
            self.plugin_errors[name] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            log.error("Cannot import %s module for custom nodes: %s\n%s", path, exc, traceback.format_exc())
            return
        builtins = self.builtin_names
        for class_name, node_class in mappings.items():
            if class_name in builtins:
                log.warning("plugin %s may not replace the built-in node %s", name, class_name)
                continue
            node_class.RELATIVE_PYTHON_MODULE = f"custom_nodes.{name}"
            self.node_classes[class_name] = node_class
        display = getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", None)
        if isinstance(display, dict):
            self.display_names.update({k: v for k, v in display.items() if k not in builtins})
        web_dir = getattr(module, "WEB_DIRECTORY", None)
        if isinstance(web_dir, str):
            base = path.parent if path.is_file() else path
            candidate = (base / web_dir).resolve()
            if candidate.is_dir():
                self.web_directories[name] = candidate
        self.plugins.append(name)
        log.info("loaded custom nodes from %s: %s", path.name, ", ".join(mappings))

    # -- /object_info ----------------------------------------------------------

    def object_info(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in list(self.node_classes):
            try:
                out[name] = self.object_info_for(name)
            except Exception:
                log.exception("[ERROR] An error occurred while retrieving information for the '%s' node.", name)
        return out

    def object_info_for(self, name: str) -> dict[str, Any] | None:
        """ComfyUI's description of one node class, or None when unknown."""
        node_class = self.node_classes.get(name)
        if node_class is None:
            return None
        with context.use(self.context):
            input_types = node_class.INPUT_TYPES()
        outputs = list(getattr(node_class, "RETURN_TYPES", ()))
        info: dict[str, Any] = {
            "input": input_types,
            "input_order": {key: list(value.keys()) for key, value in input_types.items()},
            "output": outputs,
            "output_is_list": list(getattr(node_class, "OUTPUT_IS_LIST", [False] * len(outputs))),
            "output_name": list(getattr(node_class, "RETURN_NAMES", outputs)),
            "name": name,
            "display_name": self.display_names.get(name, name),
            "description": getattr(node_class, "DESCRIPTION", ""),
            "python_module": getattr(node_class, "RELATIVE_PYTHON_MODULE", "nodes"),
            "category": getattr(node_class, "CATEGORY", "sd"),
            "output_node": bool(getattr(node_class, "OUTPUT_NODE", False)),
        }
        for attribute, key in (("OUTPUT_TOOLTIPS", "output_tooltips"), ("DEPRECATED", "deprecated"),
                               ("EXPERIMENTAL", "experimental"), ("API_NODE", "api_node")):
            if hasattr(node_class, attribute):
                info[key] = getattr(node_class, attribute)
        return info


def _import_file(module_name: str, path: Path) -> ModuleType:
    """Import a plugin file or package under ``module_name`` (relative imports work)."""
    if path.is_dir():
        spec = importlib.util.spec_from_file_location(
            module_name, path / "__init__.py", submodule_search_locations=[str(path)])
    else:
        spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
