"""A user's graph on its way to an instance, and the instance's outputs on their way back.

Instances share ``DIR`` and know nothing of users, so each task runs with its
file references moved into a private staging area that only its own task
can name (``.cluster/<stage key>/``, an unguessable key per attempt):

* every ``filename_prefix`` (the input of every ComfyUI save node: images,
  video, audio, latents, ...) is prefixed with ``.cluster/<key>/``, so what
  the task writes under ``DIR/output`` is its own folder, which afterwards is
  moved, as a whole, into ``DIR/users/<name>/output``;
* every string input that names a file of the user (``x.png``,
  ``sub/x.png``, ``x.png [output]``) is copied into
  ``DIR/input/.cluster/<key>/<type>/`` and the value rewritten to point there.

The checks here run when the prompt is submitted, so a graph that names a
file outside the user's folders is refused before it is queued.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from standard.datadir import DataDir, WorkDirs
from standard.errors import PathOutsideRoot, RequestError, error_body
from standard.model_files import is_model_file
from standard.paths import resolve_inside

STAGE = ".cluster"  # hidden: input listings (LoadImage choices) skip it
FILE_TYPES = ("input", "output", "temp")
# Inputs whose string value is always a file name (other strings count when they name a user's file).
FILE_INPUTS = frozenset({"image", "mask", "video", "audio", "file", "upload", "model_file", "mesh"})


class GraphRefused(RequestError):
    """The graph cannot be queued; ``error`` is ComfyUI's error object."""

    def __init__(self, error_type: str, message: str, details: str = "", node_id: str | None = None) -> None:
        super().__init__(message)
        self.error = error_body(error_type, message, details)
        self.node_id = node_id


def annotated(value: str) -> tuple[str, str | None]:
    """ComfyUI's ``name [type]`` form."""
    for kind in FILE_TYPES:
        suffix = f" [{kind}]"
        if value.endswith(suffix):
            return value[: -len(suffix)], kind
    return value, None


def _parts(name: str) -> list[str]:
    return [part for part in name.replace("\\", "/").split("/") if part not in ("", ".")]


def _escapes(name: str) -> bool:
    normalised = name.replace("\\", "/")
    return normalised.startswith("/") or ".." in normalised.split("/") or "\x00" in name or (
        len(name) > 1 and name[1] == ":")


def _reserved(name: str) -> bool:
    parts = _parts(name)
    return bool(parts) and parts[0] == STAGE


def _user_file(workdirs: WorkDirs, kind: str, name: str) -> Path | None:
    try:
        path = resolve_inside(workdirs.by_type(kind), name)
    except (PathOutsideRoot, ValueError):
        return None
    return path if path.is_file() else None


def check_graph(prompt: dict[str, Any], object_info: dict[str, Any] | None, workdirs: WorkDirs,
                partial_targets: list[str] | None, public_input: Path) -> tuple[list[str], list[str]]:
    """(output node ids, model names) of a graph the proxy accepts; ``GraphRefused`` otherwise.

    Blocking (it looks at the user's files): call it in a thread.
    """
    outputs: list[str] = []
    models: set[str] = set()
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise GraphRefused("invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                               f"Node ID '#{node_id}'", str(node_id))
        class_type = node["class_type"]
        info = object_info.get(class_type) if object_info is not None else None
        if object_info is not None and info is None:
            raise GraphRefused("invalid_prompt", f"Cannot execute because node {class_type} does not exist.",
                               f"Node ID '#{node_id}'", str(node_id))
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            raise GraphRefused("invalid_prompt", "node inputs must be a JSON object", f"Node ID '#{node_id}'",
                               str(node_id))
        if info is None or info.get("output_node"):
            if partial_targets is None or str(node_id) in partial_targets:
                outputs.append(str(node_id))
        for key, value in inputs.items():
            if isinstance(value, str):
                _check_value(str(node_id), key, value, workdirs, public_input)
                if is_model_file(value):
                    models.add(value)
    if not outputs:
        raise GraphRefused("prompt_no_outputs", "Prompt has no outputs", "")
    return outputs, sorted(models)


def _check_value(node_id: str, key: str, value: str, workdirs: WorkDirs, public_input: Path) -> None:
    name, kind = annotated(value)
    is_file_ref = key == "filename_prefix" or key in FILE_INPUTS or kind is not None
    if not is_file_ref:
        return
    if _escapes(name):
        raise GraphRefused("invalid_prompt", f"{key} must stay inside your folders", f"{key}: {value!r}", node_id)
    if _reserved(name):
        raise GraphRefused("invalid_prompt", f"{key} names a folder reserved by the cluster", f"{key}: {value!r}",
                           node_id)
    if kind in ("output", "temp") and _user_file(workdirs, kind, name) is None:
        raise GraphRefused("invalid_prompt", f"{key}: no such file in your {kind} folder", f"{key}: {value!r}",
                           node_id)
    if key in FILE_INPUTS and kind in (None, "input") and _user_file(workdirs, "input", name) is None:
        try:
            public = resolve_inside(public_input, name).is_file()
        except (PathOutsideRoot, ValueError):
            public = False
        if not public:
            raise GraphRefused("invalid_prompt", f"{key}: no such file in your input folder",
                               f"{key}: {value!r}", node_id)


def stage_graph(prompt: dict[str, Any], key: str, workdirs: WorkDirs, data_dir: DataDir) -> dict[str, Any]:
    """The graph as the instance must see it; copies the user's input files it names.

    Blocking: call it in a thread.
    """
    staged: dict[str, Any] = {}
    for node_id, node in prompt.items():
        inputs = dict(node.get("inputs", {}))
        for name, value in inputs.items():
            if not isinstance(value, str):
                continue
            if name == "filename_prefix":
                inputs[name] = f"{STAGE}/{key}/{value.lstrip('/')}"
                continue
            inputs[name] = _stage_file(value, key, workdirs, data_dir)
        staged[node_id] = {**node, "inputs": inputs}
    return staged


def _stage_file(value: str, key: str, workdirs: WorkDirs, data_dir: DataDir) -> str:
    name, kind = annotated(value)
    if not name or _escapes(name) or _reserved(name):
        return value
    source = _user_file(workdirs, kind or "input", name)
    if source is None:
        return value  # a plain string, or a public DIR/input file
    relative = "/".join(_parts(name))
    target = data_dir.root / "input" / STAGE / key / (kind or "input") / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return f"{STAGE}/{key}/{kind or 'input'}/{relative}"


def remove_stage(key: str, data_dir: DataDir) -> None:
    """Drop the task's staged inputs and what is left of its output folder. Blocking."""
    for kind in ("input", "output"):
        shutil.rmtree(data_dir.root / kind / STAGE / key, ignore_errors=True)
