"""Saved workflows called by name with a few parameters: ``POST /api_prompt?workflow=NAME`` ``{"params": {...}}``.

``DIR/workflows/NAME.json`` is an API-format graph (what *Save (API format)* writes);
``DIR/workflows/NAME.params.json``, optional, names its parameters::

    {"prompt": {"path": "6.inputs.text", "type": "string", "default": "a cat", "description": "what to draw"},
     "seed":   {"path": "3.inputs.seed", "type": "int", "min": 0, "max": 4294967295, "random": true},
     "steps":  "3.inputs.steps",
     "image":  {"path": "10.inputs.image", "type": "image"}}

A path is ``NODE.inputs.INPUT`` and must name an existing, non-link input of the graph. ``type`` is one of
``string``, ``int``, ``float``, ``bool``, ``image`` (a file name: send the file as an input of the same name);
when left out (or for the ``"name": "path"`` shorthand) it is the type of the graph's value there, and the
graph's value is the default. ``min``/``max`` bound numbers, ``choices`` lists the allowed values, and
``random: true`` (int) draws a value in ``[min, max]`` when the client sends none. A parameter with no
default and no random is required.

Files are read again when they change (their size and mtime are checked on each call: edit, then call).
Names are ``[A-Za-z0-9][A-Za-z0-9_.-]*`` without ``..``; anything else (``/``, ``..``) is refused before any
file is touched.
"""

from __future__ import annotations

import asyncio
import copy
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from standard.errors import RequestError
from standard.http_util import parse_json

from .graph import GraphError, check_graph, is_link

WORKFLOWS_FOLDER = "workflows"
PARAMS_SUFFIX = ".params.json"
MAX_FILE_BYTES = 8 * 1024 * 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
TYPES = ("string", "int", "float", "bool", "image")
DEFAULT_RANDOM_MAX = 2**32 - 1
_NO_DEFAULT = object()


class WorkflowRefused(RequestError):
    """A workflow call that cannot be queued: ``status`` (400/404) and ``kind`` for the JSON error."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class Param:
    name: str
    node: str
    input: str
    type: str
    default: Any = _NO_DEFAULT
    min: float | None = None
    max: float | None = None
    random: bool = False
    choices: tuple[Any, ...] | None = None
    description: str = ""

    @property
    def required(self) -> bool:
        return self.default is _NO_DEFAULT and not self.random

    def describe(self) -> dict[str, Any]:
        """What ``GET /workflows`` shows of it (enough to generate a form)."""
        out: dict[str, Any] = {"type": self.type, "path": f"{self.node}.inputs.{self.input}",
                               "required": self.required}
        if self.default is not _NO_DEFAULT:
            out["default"] = self.default
        for key in ("min", "max", "choices"):
            if getattr(self, key) is not None:
                out[key] = list(self.choices or ()) if key == "choices" else getattr(self, key)
        if self.random:
            out["random"] = True
        if self.description:
            out["description"] = self.description
        return out

    def check(self, value: Any) -> Any:
        """The client's value, checked; ``WorkflowRefused`` naming this parameter."""
        ok = {"string": isinstance(value, str), "image": isinstance(value, str),
              "bool": isinstance(value, bool),
              "int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool)}[self.type]
        if not ok:
            raise _bad(f"parameter {self.name!r} must be {_article(self.type)}, got {type(value).__name__}")
        if self.min is not None and value < self.min:
            raise _bad(f"parameter {self.name!r} must be >= {self.min}, got {value}")
        if self.max is not None and value > self.max:
            raise _bad(f"parameter {self.name!r} must be <= {self.max}, got {value}")
        if self.choices is not None and value not in self.choices:
            raise _bad(f"parameter {self.name!r} must be one of {list(self.choices)}, got {value!r}")
        return value

    def value_for(self, params: dict[str, Any]) -> Any:
        if self.name in params:
            return self.check(params[self.name])
        if self.random:
            low = int(self.min) if self.min is not None else 0
            high = int(self.max) if self.max is not None else DEFAULT_RANDOM_MAX
            return random.randint(low, high)  # noqa: S311 - a seed, not a secret
        if self.default is _NO_DEFAULT:
            raise _bad(f"parameter {self.name!r} is required")
        return self.default


def _article(kind: str) -> str:
    return {"int": "an int", "image": "an image file name (string)"}.get(kind, f"a {kind}")


def _bad(message: str) -> WorkflowRefused:
    return WorkflowRefused(400, "bad_param", message)


@dataclass(frozen=True)
class Workflow:
    name: str
    graph: dict[str, Any]
    params: dict[str, Param] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "params": {name: p.describe() for name, p in self.params.items()}}

    def build(self, params: Any) -> dict[str, Any]:
        """A fresh graph with the client's parameters set; ``WorkflowRefused`` naming a bad one."""
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise _bad("'params' must be an object of parameter values")
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise _bad(f"unknown parameter {unknown[0]!r} (workflow {self.name!r} takes: "
                       f"{', '.join(sorted(self.params)) or 'none'})")
        graph = copy.deepcopy(self.graph)
        for param in self.params.values():
            graph[param.node]["inputs"][param.input] = param.value_for(params)
        return graph


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or ".." in name or name.endswith(".params"):
        raise WorkflowRefused(400, "bad_request", f"workflow name {name[:80]!r} must be letters, digits, '_', '-' "
                                                  "and '.' (no '/' or '..')")
    return name


def _read_json(path: Path, what: str) -> Any:
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"{what} is larger than {MAX_FILE_BYTES} bytes")
    try:
        return parse_json(path.read_bytes())
    except ValueError as exc:
        raise ValueError(f"{what} is not JSON: {exc}") from None


def _param(name: str, spec: Any, graph: dict[str, Any]) -> Param:
    if isinstance(spec, str):
        spec = {"path": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
        raise ValueError(f"parameter {name!r} needs a 'path' like \"6.inputs.text\"")
    path = spec["path"]
    node, sep, input_name = path.partition(".inputs.")
    node_spec = graph.get(node)
    if not sep or not isinstance(node_spec, dict) or input_name not in node_spec.get("inputs", {}):
        raise ValueError(f"parameter {name!r}: path {path!r} does not exist in the workflow (NODE.inputs.INPUT)")
    current = node_spec["inputs"][input_name]
    if is_link(current):
        raise ValueError(f"parameter {name!r}: {path!r} is a link to another node, not a value")
    kind = spec.get("type") or _type_of(current)
    if kind not in TYPES:
        raise ValueError(f"parameter {name!r}: type {kind!r} is not one of {', '.join(TYPES)}")
    default = spec["default"] if "default" in spec else (current if "type" not in spec else _NO_DEFAULT)
    choices = spec.get("choices")
    param = Param(name=name, node=node, input=input_name, type=kind, default=default,
                  min=_number(spec, "min", name), max=_number(spec, "max", name), random=bool(spec.get("random")),
                  choices=tuple(choices) if isinstance(choices, list) else None,
                  description=str(spec.get("description", "")))
    if param.random and kind != "int":
        raise ValueError(f"parameter {name!r}: 'random' is for int parameters")
    if param.default is not _NO_DEFAULT:
        try:
            param.check(param.default)
        except WorkflowRefused as exc:
            raise ValueError(f"default of {exc.message}") from None
    return param


def _number(spec: dict[str, Any], key: str, name: str) -> float | None:
    value = spec.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"parameter {name!r}: {key!r} must be a number")
    return value


def _type_of(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return "string"


def load(folder: Path, name: str) -> Workflow:
    """Read and check ``NAME.json`` (+ ``NAME.params.json``); ValueError saying what is wrong."""
    graph = _read_json(folder / f"{name}.json", f"{name}.json")
    try:
        check_graph(graph)
    except GraphError as exc:
        raise ValueError(f"{name}.json: {exc.message}") from None
    params_path = folder / f"{name}{PARAMS_SUFFIX}"
    specs = _read_json(params_path, params_path.name) if params_path.exists() else {}
    if not isinstance(specs, dict):
        raise ValueError(f"{params_path.name} must be an object of parameter names")
    return Workflow(name, graph, {key: _param(key, spec, graph) for key, spec in specs.items()})


Stamp = tuple[tuple[int, int], tuple[int, int] | None]


def _stamp(folder: Path, name: str) -> Stamp | None:
    try:
        main = (folder / f"{name}.json").stat()
    except FileNotFoundError:
        return None
    try:
        extra = (folder / f"{name}{PARAMS_SUFFIX}").stat()
        params: tuple[int, int] | None = (extra.st_mtime_ns, extra.st_size)
    except FileNotFoundError:
        params = None
    return (main.st_mtime_ns, main.st_size), params


class Workflows:
    """The workflows of a data dir, read again whenever their files change."""

    def __init__(self, data_dir: Path | None) -> None:
        self.folder = data_dir / WORKFLOWS_FOLDER if data_dir is not None else None
        self._cache: dict[str, tuple[Stamp, Workflow | str]] = {}

    def _lookup(self, name: str) -> Workflow | str | None:
        """The workflow, its load error (a string), or None when there is no such file. Blocking."""
        if self.folder is None:
            return None
        stamp = _stamp(self.folder, name)
        if stamp is None:
            self._cache.pop(name, None)
            return None
        cached = self._cache.get(name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            loaded: Workflow | str = load(self.folder, name)
        except (OSError, ValueError) as exc:
            loaded = str(exc)
        self._cache[name] = (stamp, loaded)
        return loaded

    async def get(self, name: str) -> Workflow:
        check_name(name)
        found = await asyncio.to_thread(self._lookup, name)
        if found is None:
            raise WorkflowRefused(404, "unknown_workflow", f"no workflow {name!r} (DIR/workflows/{name}.json)")
        if isinstance(found, str):
            raise WorkflowRefused(400, "invalid_workflow", f"workflow {name!r} cannot be used: {found}")
        return found

    async def describe_all(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._describe_all)

    def _describe_all(self) -> list[dict[str, Any]]:
        if self.folder is None or not self.folder.is_dir():
            return []
        names = sorted(p.name[:-5] for p in self.folder.glob("*.json") if not p.name.endswith(PARAMS_SUFFIX))
        out: list[dict[str, Any]] = []
        for name in names:
            if not _NAME.fullmatch(name) or ".." in name:
                continue
            found = self._lookup(name)
            if isinstance(found, Workflow):
                out.append(found.describe())
            elif isinstance(found, str):
                out.append({"name": name, "error": found})
        return out
