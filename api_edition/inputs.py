"""Input files sent with a task: names, the task's folder, the graph's references, the queued envelope.

A task's files live in ``DIR/input/api/<id>/`` (``id``: 32 random hex digits
the front picks, never the client's task id), so a graph refers to them as
``api/<id>/<name>`` — what ``LoadImage`` and friends resolve under the input
folder. The front writes the inline files (``input_request``); the worker
fetches the URL ones there before the run and removes the folder once the
result is on the sink (``input_fetch``); what is left behind (a task never
run, a worker that died) goes after ``--input-retention`` (``sweep``). With ``--data-dir oss://`` the folder is
mirrored at ``PREFIX/input/api/<id>/`` in the bucket, where an instance on any
machine finds it (``input_bucket``), and removed from there at the same moments.

The queued item of such a task is the envelope
``{"prompt": GRAPH, "comfyserve": {"inputs_dir": "api/<id>", "fetch": [{"name", "url"}]}}``:
``parse_graph`` unwraps it like any ``{"prompt": ...}`` body, so a worker that
knows nothing of inputs still runs the graph. A task without inputs is queued
exactly as before (the bare graph).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from standard.errors import RequestError
from standard.http_util import parse_json
from standard.storage.errors import StorageError

if TYPE_CHECKING:  # pragma: no cover
    from .input_bucket import InputBucket

log = logging.getLogger("comfyserve.api.inputs")

INPUT_FOLDER = "api"
ENVELOPE_KEY = "comfyserve"
DEFAULT_MAX_INPUT_FILE_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_INPUT_TOTAL_BYTES = 64 * 1024 * 1024
DEFAULT_INPUT_RETENTION_S = 24 * 3600.0
DEFAULT_INPUT_FETCH_TIMEOUT_S = 60.0
MAX_INPUT_FILES = 64
MAX_NAME_BYTES = 200
_FOLDER_ID = re.compile(r"[0-9a-f]{32}")
_ANNOTATION = " [input]"


class InputRefused(RequestError):
    """A task's inputs that cannot be taken: answered with ``status`` (400 or 413) and ``kind``."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class InputLimits:
    """Per file and per request caps on the bytes of a task's inputs (413 past them)."""

    max_file_bytes: int = DEFAULT_MAX_INPUT_FILE_BYTES
    max_total_bytes: int = DEFAULT_MAX_INPUT_TOTAL_BYTES
    max_files: int = MAX_INPUT_FILES


def check_name(name: Any) -> str:
    """An input's name: one plain file name, never a path (it becomes ``api/<id>/<name>``)."""
    if not isinstance(name, str) or not name:
        raise InputRefused(400, "bad_input", "each input needs a non-empty string 'name'")
    if "/" in name or "\\" in name:
        raise InputRefused(400, "bad_input", f"input name {name!r} must be a file name, not a path")
    if name.startswith(".") or any(ord(c) < 32 or ord(c) == 127 for c in name) or name.endswith(_ANNOTATION):
        raise InputRefused(400, "bad_input", f"input name {name!r} must not start with '.' or hold control "
                                             "characters")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise InputRefused(400, "bad_input", f"input name {name[:40]!r}... is longer than {MAX_NAME_BYTES} bytes")
    return name


def folder_id_of(text: str) -> str | None:
    """``text`` if it is a task folder's id (32 lowercase hex digits), else None."""
    return text if _FOLDER_ID.fullmatch(text) else None


def inputs_root(data_dir: Path) -> Path:
    return data_dir / "input" / INPUT_FOLDER


def folder_of(data_dir: Path, relative: Any) -> Path | None:
    """The folder an envelope's ``inputs_dir`` names, or None unless it is exactly ``api/<32 hex>``
    (items can be put on the queue directly: no other path is ever touched)."""
    if not isinstance(relative, str):
        return None
    prefix, _, folder_id = relative.partition("/")
    if prefix != INPUT_FOLDER or not _FOLDER_ID.fullmatch(folder_id):
        return None
    return inputs_root(data_dir) / folder_id


@dataclass
class TaskFolder:
    """``DIR/input/api/<id>/`` of one task; created on the first write."""

    data_dir: Path
    folder_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    written: list[str] = field(default_factory=list)

    @property
    def relative(self) -> str:
        return f"{INPUT_FOLDER}/{self.folder_id}"

    @property
    def path(self) -> Path:
        return inputs_root(self.data_dir) / self.folder_id

    def reference(self, name: str) -> str:
        return f"{self.relative}/{name}"

    async def write(self, name: str, data: bytes) -> None:
        await asyncio.to_thread(self.write_now, name, data)

    def write_now(self, name: str, data: bytes) -> None:
        """``write`` from a thread (or for a small file): blocking."""
        write_new(self.path, name, data)
        self.written.append(name)

    async def remove(self) -> None:
        await asyncio.to_thread(shutil.rmtree, self.path, True)


def write_new(folder: Path, name: str, data: bytes) -> None:
    """Write ``folder/name`` (a checked plain name) through a temporary file, so a reader never sees half."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{uuid.uuid4().hex}.part"
    partial.write_bytes(data)
    partial.replace(folder / name)


def rewrite(graph: dict[str, Any], names: list[str], folder: TaskFolder) -> None:
    """Point every node input whose value is one of ``names`` (or ``name [input]``) at the task's folder."""
    wanted = set(names)
    for node in graph.values():
        node_inputs = node.get("inputs")
        if not isinstance(node_inputs, dict):
            continue
        for key, value in node_inputs.items():
            if not isinstance(value, str):
                continue
            if value in wanted:
                node_inputs[key] = folder.reference(value)
            elif value.endswith(_ANNOTATION) and value[: -len(_ANNOTATION)] in wanted:
                node_inputs[key] = folder.reference(value[: -len(_ANNOTATION)]) + _ANNOTATION


def envelope(graph: dict[str, Any], folder: TaskFolder, fetch: list[dict[str, str]]) -> dict[str, Any]:
    return {"prompt": graph, ENVELOPE_KEY: {"inputs_dir": folder.relative, "fetch": fetch}}


def envelope_of(data: bytes) -> dict[str, Any] | None:
    """The ``comfyserve`` part of a queued item, if it has one (the bare graph of most tasks has not)."""
    if b'"' + ENVELOPE_KEY.encode() + b'"' not in data:
        return None
    try:
        value = parse_json(data)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("prompt"), dict):
        return None
    extra = value.get(ENVELOPE_KEY)
    return extra if isinstance(extra, dict) else None


def sweep(data_dir: Path, older_than_s: float, now: float | None = None) -> int:
    """Remove task folders last changed more than ``older_than_s`` ago; how many went."""
    root = inputs_root(data_dir)
    cutoff = (time.time() if now is None else now) - older_than_s
    removed = 0
    try:
        entries = list(root.iterdir())
    except FileNotFoundError:
        return 0
    for entry in entries:
        if not _FOLDER_ID.fullmatch(entry.name):
            continue
        with contextlib.suppress(FileNotFoundError):
            if entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
    return removed


async def sweep_forever(data_dir: Path, retention_s: float, bucket: InputBucket | None = None) -> None:
    """The front's janitor: every so often, the folders older than the retention go (from the bucket too,
    for an oss:// data dir)."""
    interval_s = min(max(retention_s / 4, 0.05), 600.0)
    while True:
        try:
            removed = await asyncio.to_thread(sweep, data_dir, retention_s)
            if removed:
                log.info("removed %d task input folder(s) older than %.0fs", removed, retention_s)
        except OSError as exc:
            log.warning("sweeping %s: %s", inputs_root(data_dir), exc)
        if bucket is not None:
            try:
                removed = await asyncio.to_thread(bucket.sweep, retention_s)
                if removed:
                    log.info("removed %d task input folder(s) older than %.0fs from the bucket", removed,
                             retention_s)
            except StorageError as exc:
                log.warning("sweeping oss://%s/%s: %s", bucket.location.bucket, bucket.root, exc)
        await asyncio.sleep(interval_s)
