"""``PromptExecutor``: runs one validated API-format graph the way ComfyUI does.

It executes only what the requested outputs need, in dependency order; reuses
a node's outputs from the previous prompts when its inputs' signature did not
change (ComfyUI's classic cache, ``IS_CHANGED`` included); maps nodes over list
inputs (``INPUT_IS_LIST`` / ``OUTPUT_IS_LIST``); reports ComfyUI's events through
``send_sync`` in ComfyUI's order (``progress_state`` included, see ``progress``);
and stops between nodes, or inside a node that checks, when interrupted.
``execute`` blocks: the server calls it on a worker thread.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
import traceback
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import EngineError
from . import compat, context
from .context import InterruptProcessingException
from .node_class import NodeClass
from .progress import ProgressState
from .registry import NodeRegistry

log = logging.getLogger("comfyserve.engine")

UNENCODED_PREVIEW_IMAGE = 2
SendSync = Callable[[Any, Any, Any], None]


@dataclass
class CachedNode:
    outputs: list[list[Any]]
    ui: dict[str, Any] | None


class NodeFailed(EngineError):
    """A node raised: carries what ComfyUI's execution_error reports."""

    def __init__(self, node_id: str, cause: BaseException, inputs: dict[str, list[Any]]) -> None:
        super().__init__(str(cause))
        self.node_id = node_id
        self.cause = cause
        self.inputs = inputs


class PromptExecutor:
    """One per instance; holds the output cache between prompts."""

    def __init__(self, registry: NodeRegistry, send_sync: SendSync) -> None:
        self.registry = registry
        self._send = send_sync
        self.cache: dict[str, CachedNode] = {}
        self._objects: dict[tuple[str, str], Any] = {}
        self.success = True
        self.status_messages: list[tuple[str, dict[str, Any]]] = []
        self.history_result: dict[str, Any] = {}
        self.client_id: str | None = None
        self._node_progress: ProgressState | None = None
        # Called with True right before a node's function runs and False right after (the server holds the
        # hand-over of events to its loop in between nodes: see PromptServer.node_running).
        self.on_node: Callable[[bool], None] | None = None
        compat.PROMPT_SERVER.send_sync_hook = send_sync

    # -- control from other threads ---------------------------------------------

    def interrupt(self) -> None:
        self.registry.context.interrupted.set()

    def reset(self) -> None:
        """Drop cached outputs and node objects (ComfyUI's /free)."""
        self.cache.clear()
        self._objects.clear()

    # -- events -------------------------------------------------------------------

    def add_message(self, event: str, data: dict[str, Any], broadcast: bool) -> None:
        """Recorded in the history status; sent to the prompt's client (or everyone)."""
        data = {**data, "timestamp": int(time.time() * 1000)}
        self.status_messages.append((event, data))
        if self.client_id is not None or broadcast:
            self._send(event, data, self.client_id)

    def _progress(self, prompt_id: str) -> Callable[[float, float, str | None, Any], None]:
        def hook(value: float, total: float, node_id: str | None, preview: Any) -> None:
            if self._node_progress is not None and node_id is not None:
                self._node_progress.update(node_id, value, total)
            self._send("progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id},
                       self.client_id)
            if preview is not None:
                self._send(UNENCODED_PREVIEW_IMAGE, preview, self.client_id)
        return hook

    # -- execution ----------------------------------------------------------------

    def execute(self, prompt: dict[str, Any], prompt_id: str, extra_data: dict[str, Any] | None = None,
                execute_outputs: list[str] | None = None) -> None:
        extra_data = extra_data or {}
        ctx = self.registry.context
        ctx.interrupted.clear()
        self.client_id = extra_data.get("client_id")
        compat.PROMPT_SERVER.client_id = self.client_id
        self.status_messages = []
        self.success = True
        ui_outputs: dict[str, dict[str, Any]] = {}
        meta: dict[str, dict[str, Any]] = {}
        executed: list[str] = []
        self.add_message("execution_start", {"prompt_id": prompt_id}, broadcast=False)
        progress = self._node_progress = ProgressState(
            prompt_id, lambda data: self._send("progress_state", data, self.client_id))
        with context.use(ctx):
            ctx.progress_hook = self._progress(prompt_id)
            try:
                outputs = execute_outputs if execute_outputs is not None else []
                declared = InputTypes()
                signatures = self._signatures(prompt, declared)
                cached = [node for node in prompt if signatures[node] in self.cache]
                self.add_message("execution_cached", {"nodes": cached, "prompt_id": prompt_id}, broadcast=False)
                # As ComfyUI: a cached node is visited only if it is a requested output; the
                # nodes downstream read its cached values.
                values = {node: self.cache[signatures[node]].outputs for node in cached}
                for node_id in execution_order(prompt, outputs, set(cached)):
                    context.throw_if_interrupted()
                    entry = self.cache.get(signatures[node_id])
                    if entry is None:
                        progress.start(node_id)
                        entry = self._run_node(prompt, prompt_id, node_id, values, extra_data, declared)
                        self.cache[signatures[node_id]] = entry
                        executed.append(node_id)
                    if self.client_id is not None and (entry.ui or node_id in cached):
                        self._send("executed", {"node": node_id, "display_node": node_id, "output": entry.ui,
                                                "prompt_id": prompt_id}, self.client_id)
                    progress.finish(node_id)
                    values[node_id] = entry.outputs
                    if entry.ui:
                        ui_outputs[node_id] = entry.ui
                        meta[node_id] = {"node_id": node_id, "display_node": node_id, "parent_node": None,
                                         "real_node_id": node_id}
                self.add_message("execution_success", {"prompt_id": prompt_id}, broadcast=False)
            except InterruptProcessingException:
                self.success = False
                interrupted_at = ctx.executing_node
                self.add_message("execution_interrupted", {
                    "prompt_id": prompt_id, "node_id": interrupted_at,
                    "node_type": _class_type(prompt, interrupted_at),
                    "executed": executed}, broadcast=True)
            except NodeFailed as failure:
                self.success = False
                cause = failure.cause
                log.error("!!! Exception during processing !!! %s\n%s", cause,
                          "".join(traceback.format_exception(cause)))
                self.add_message("execution_error", {
                    "prompt_id": prompt_id, "node_id": failure.node_id,
                    "node_type": _class_type(prompt, failure.node_id), "executed": executed,
                    "exception_message": str(cause), "exception_type": _full_type_name(type(cause)),
                    "traceback": traceback.format_tb(cause.__traceback__),
                    "current_inputs": {k: [_format_value(v) for v in vs] for k, vs in failure.inputs.items()},
                    "current_outputs": list(executed),
                }, broadcast=False)
            finally:
                ctx.progress_hook = None
                self._node_progress = None
                ctx.executing_node = None
                keep = set(signatures.values()) if "signatures" in locals() else set()
                self.cache = {k: v for k, v in self.cache.items() if k in keep}
                self._objects = {k: v for k, v in self._objects.items() if k[0] in prompt}
        self.history_result = {"outputs": ui_outputs, "meta": meta}

    def _run_node(self, prompt: dict[str, Any], prompt_id: str, node_id: str,
                  values: dict[str, list[list[Any]]], extra_data: dict[str, Any],
                  declared: InputTypes) -> CachedNode:
        ctx = self.registry.context
        ctx.executing_node = node_id
        if self.client_id is not None:  # ComfyUI tells only the prompt's own client
            self._send("executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id},
                       self.client_id)
        class_type = prompt[node_id]["class_type"]
        node_class = self.registry.node_classes[class_type]
        inputs = input_data(declared.of(node_class), prompt, node_id, values, extra_data)
        try:
            key = (node_id, class_type)
            if key not in self._objects:
                self._objects[key] = node_class()
            on_node = self.on_node
            if on_node is not None:
                on_node(True)
            try:
                results, uis = map_node_over_list(node_class, self._objects[key], inputs)
            finally:
                if on_node is not None:
                    on_node(False)
        except InterruptProcessingException:
            raise
        except Exception as exc:
            raise NodeFailed(node_id, exc, inputs) from exc
        return CachedNode(merge_outputs(node_class, results), merge_ui(uis))

    def _signatures(self, prompt: dict[str, Any], declared: InputTypes) -> dict[str, str]:
        """A key per node that changes when it or anything upstream would compute differently."""
        signatures: dict[str, str] = {}

        def signature(node_id: str) -> str:
            if node_id in signatures:
                return signatures[node_id]
            node = prompt[node_id]
            node_class = self.registry.node_classes[node["class_type"]]
            constants: dict[str, Any] = {}
            parts: list[Any] = [node["class_type"], _is_changed(node_class, node["inputs"])]
            for name in sorted(node["inputs"]):
                value = node["inputs"][name]
                if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt:
                    parts.append([name, "link", signature(str(value[0])), value[1]])
                else:
                    constants[name] = value
                    parts.append([name, value])
            hidden = declared.of(node_class).get("hidden", {})
            if getattr(node_class, "NOT_IDEMPOTENT", False) or "UNIQUE_ID" in hidden.values():
                parts.append(["unique_id", node_id])
            signatures[node_id] = json.dumps(parts, sort_keys=True, default=repr)
            return signatures[node_id]

        for node_id in prompt:
            signature(node_id)
        return signatures


class InputTypes:
    """``INPUT_TYPES()`` of each class, asked once per prompt: LoadImage's lists the input folder."""

    def __init__(self) -> None:
        self._seen: dict[type[NodeClass], dict[str, Any]] = {}

    def of(self, node_class: type[NodeClass]) -> dict[str, Any]:
        if node_class not in self._seen:
            self._seen[node_class] = node_class.INPUT_TYPES()
        return self._seen[node_class]


def execution_order(prompt: dict[str, Any], outputs: list[str], cached: set[str] | frozenset[str] = frozenset(),
                    ) -> list[str]:
    """The nodes the outputs need, each after its inputs (validation refused cycles); the outputs are
    always listed, a ``cached`` node that is only an input is not (nor what it needs)."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(node_id: str) -> None:
        if node_id in seen:
            return
        seen.add(node_id)
        for value in prompt[node_id]["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt and str(value[0]) not in cached:
                visit(str(value[0]))
        order.append(node_id)

    for output in outputs:
        visit(output)
    return order


def input_data(declared: dict[str, Any], prompt: dict[str, Any], node_id: str,
               values: dict[str, list[list[Any]]], extra_data: dict[str, Any]) -> dict[str, list[Any]]:
    """Every input as a list of values (a link gives the upstream slot's list); ``declared`` = INPUT_TYPES()."""
    valid_names = set(declared.get("required", {})) | set(declared.get("optional", {}))
    data: dict[str, list[Any]] = {}
    for name, value in prompt[node_id]["inputs"].items():
        if name not in valid_names:
            continue
        if isinstance(value, list) and len(value) == 2 and str(value[0]) in values:
            data[name] = values[str(value[0])][value[1]]
        else:
            data[name] = [value]
    hidden_values = {"PROMPT": prompt, "EXTRA_PNGINFO": extra_data.get("extra_pnginfo"), "UNIQUE_ID": node_id,
                     "DYNPROMPT": None, "AUTH_TOKEN_COMFY_ORG": extra_data.get("auth_token_comfy_org"),
                     "API_KEY_COMFY_ORG": extra_data.get("api_key_comfy_org")}
    for name, kind in declared.get("hidden", {}).items():
        if kind in hidden_values:
            data[name] = [hidden_values[kind]]
    return data


def map_node_over_list(node_class: type[NodeClass], obj: Any,
                       inputs: dict[str, list[Any]]) -> tuple[list[Any], list[Any]]:
    """Call the node's FUNCTION once (INPUT_IS_LIST) or once per list element, as ComfyUI does."""
    function = getattr(obj, node_class.FUNCTION)
    calls: list[dict[str, Any]]
    if getattr(node_class, "INPUT_IS_LIST", False):
        calls = [inputs]
    else:
        length = max((len(v) for v in inputs.values()), default=1)
        if any(len(v) == 0 for v in inputs.values()):
            length = 0
        calls = [{k: v[i if i < len(v) else -1] for k, v in inputs.items()} for i in range(length)]
    results: list[Any] = []
    uis: list[Any] = []
    for arguments in calls:
        context.throw_if_interrupted()
        result = function(**arguments)
        if isinstance(result, dict):
            uis.append(result.get("ui"))
            result = result.get("result", ())
        results.append(tuple(result) if result is not None else ())
    return results, uis


def merge_outputs(node_class: type[NodeClass], results: list[tuple[Any, ...]]) -> list[list[Any]]:
    count = len(getattr(node_class, "RETURN_TYPES", ()))
    is_list = list(getattr(node_class, "OUTPUT_IS_LIST", [False] * count))
    merged: list[list[Any]] = [[] for _ in range(count)]
    for result in results:
        for slot in range(min(count, len(result))):
            if slot < len(is_list) and is_list[slot]:
                merged[slot].extend(result[slot])
            else:
                merged[slot].append(result[slot])
    return merged


def merge_ui(uis: list[Any]) -> dict[str, Any] | None:
    uis = [ui for ui in uis if ui]
    if not uis:
        return None
    merged: dict[str, Any] = {}
    for ui in uis:
        for key, value in ui.items():
            if isinstance(value, list):
                merged.setdefault(key, []).extend(value)
            else:
                merged[key] = value
    return merged


def _is_changed(node_class: type[NodeClass], inputs: dict[str, Any]) -> Any:
    function = getattr(node_class, "IS_CHANGED", None)
    if function is None:
        return None
    constants = {k: v for k, v in inputs.items() if not isinstance(v, list)}
    try:
        params = _is_changed_params(node_class, function)
        if params is not None:
            constants = {k: v for k, v in constants.items() if k in params}
        value = function(**constants)
    except Exception as exc:
        log.debug("IS_CHANGED of %s failed: %s", node_class.__name__, exc)
        return str(uuid.uuid4())  # unknown: run it
    if isinstance(value, float) and math.isnan(value):
        return str(uuid.uuid4())  # NaN never equals itself: always run
    return value


# node class -> the parameter names of its IS_CHANGED (None: it takes **kwargs). inspect.signature per node and
# prompt was a tenth of the time between two prompts; a /restart's re-imported classes are new keys.
_IS_CHANGED_PARAMS: weakref.WeakKeyDictionary[type, frozenset[str] | None] = weakref.WeakKeyDictionary()


def _is_changed_params(node_class: type[NodeClass], function: Callable[..., Any]) -> frozenset[str] | None:
    try:
        return _IS_CHANGED_PARAMS[node_class]
    except KeyError:
        pass
    params = inspect.signature(function).parameters
    names = None if any(p.kind == p.VAR_KEYWORD for p in params.values()) else frozenset(params)
    _IS_CHANGED_PARAMS[node_class] = names
    return names


def _class_type(prompt: dict[str, Any], node_id: str | None) -> str | None:
    return prompt[node_id]["class_type"] if node_id in prompt else None


def _full_type_name(kind: type) -> str:
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _format_value(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, bool, str)):
        return value
    return str(value) if not hasattr(value, "shape") else f"array{tuple(value.shape)}"
