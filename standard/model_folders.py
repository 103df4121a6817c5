"""Listing model folders of the data dir the way ComfyUI's ``folder_paths`` does.

Read from disk on every call (cheap, and a /restart or a file dropped into a
mounted bucket shows up at once). Call it in a thread: it walks directories.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path
from typing import Any

from .datadir import MODEL_FOLDERS, DataDir
from .paths import resolve_inside
from .storage import hooks as storage_hooks

SUPPORTED_PT_EXTENSIONS: frozenset[str] = frozenset(
    {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
)
FOLDER_EXTENSIONS: dict[str, frozenset[str]] = {
    "configs": frozenset({".yaml"}),
    "custom_nodes": frozenset(),  # empty = every file
}
# Old names ComfyUI still answers to.
LEGACY_FOLDERS: dict[str, str] = {"clip": "text_encoders", "unet": "diffusion_models"}
EXCLUDED_DIR_NAMES = frozenset({".git"})


def folder_names() -> list[str]:
    """The keys of ComfyUI's ``folder_names_and_paths`` (GET /models)."""
    names = list(MODEL_FOLDERS)
    names.insert(names.index("upscale_models") + 1, "custom_nodes")
    return names


def folder_path(data_dir: DataDir, folder: str) -> Path | None:
    """The directory of a model folder name, or None when ComfyUI would answer 404."""
    folder = LEGACY_FOLDERS.get(folder, folder)
    if folder == "custom_nodes":
        return data_dir.custom_nodes
    if folder not in MODEL_FOLDERS:
        return None
    return data_dir.models / folder


def list_folder(data_dir: DataDir, folder: str) -> list[str] | None:
    """Sorted relative paths ('/'-separated) of the model files in ``folder``."""
    root = folder_path(data_dir, folder)
    if root is None:
        return None
    folder = LEGACY_FOLDERS.get(folder, folder)
    if folder == "diffusers":
        return _diffusers(root)
    extensions = FOLDER_EXTENSIONS.get(folder, SUPPORTED_PT_EXTENSIONS)
    if not root.is_dir():
        return []
    found = _local_files(root, folder, extensions)
    storage = storage_hooks.remote_models(data_dir)
    if storage is not None and root.parent == data_dir.models:  # oss:// data dir: the bucket's list
        found.extend(name for name in storage.model_names(folder)
                     if not extensions or os.path.splitext(name)[1].lower() in extensions)
        found = list(set(found))
    return sorted(found)


# (root, folder) -> (sorted names, (directory, mtime_ns) of every directory walked). Like ComfyUI's own
# folder_paths cache: a prompt's node lists its folder (INPUT_TYPES) each time it runs, and the walk cost a
# third of a millisecond of the GPU's idle time between two prompts; a stat per directory says it is unchanged.
_LISTINGS: dict[tuple[str, str], tuple[list[str], tuple[tuple[str, int], ...]]] = {}
SETTLED_NS = 2_000_000_000  # a directory changed more recently is walked again (coarse mtimes: 1-2 s on some)


def _local_files(root: Path, folder: str, extensions: set[str] | frozenset[str] | None) -> list[str]:
    key = (str(root), folder)
    cached = _LISTINGS.get(key)
    if cached is not None and _unchanged(cached[1]):
        return list(cached[0])
    found: list[str] = []
    stamps: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            stamps.append((dirpath, os.stat(dirpath).st_mtime_ns))
        except OSError:
            stamps.append((dirpath, -1))  # gone meanwhile: never unchanged
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIR_NAMES]
        for name in filenames:
            if name.startswith(".") or (extensions and os.path.splitext(name)[1].lower() not in extensions):
                continue
            found.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    found.sort()
    settled = time.time_ns() - SETTLED_NS
    if all(0 <= mtime < settled for _, mtime in stamps):  # else a change within the mtime's tick could hide
        _LISTINGS[key] = (list(found), tuple(stamps))
    else:
        _LISTINGS.pop(key, None)
    return found


def _unchanged(stamps: tuple[tuple[str, int], ...]) -> bool:
    for path, mtime in stamps:
        try:
            if os.stat(path).st_mtime_ns != mtime:
                return False
        except OSError:
            return False
    return True


def _diffusers(root: Path) -> list[str]:
    """Diffusers models are folders holding a ``model_index.json``."""
    if not root.is_dir():
        return []
    found = []
    for dirpath, _dirnames, filenames in os.walk(root, followlinks=True):
        if "model_index.json" in filenames:
            found.append(os.path.relpath(dirpath, root).replace(os.sep, "/"))
    return sorted(found)


def list_embeddings(data_dir: DataDir) -> list[str]:
    """GET /embeddings: embedding names without their extension."""
    return [os.path.splitext(name)[0] for name in list_folder(data_dir, "embeddings") or []]


MAX_SAFETENSORS_HEADER_BYTES = 1024 * 1024


def safetensors_metadata(data_dir: DataDir, folder: str, filename: str) -> dict[str, Any] | None:
    """The ``__metadata__`` of a .safetensors model (GET /view_metadata), None when absent.

    Raises PathOutsideRoot when ``filename`` leaves the folder.
    """
    root = folder_path(data_dir, folder)
    if root is None or not filename.endswith(".safetensors"):
        return None
    path = resolve_inside(root, filename)
    if not path.is_file():
        return None
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return None
        length = struct.unpack("<Q", prefix)[0]
        if length > MAX_SAFETENSORS_HEADER_BYTES:
            return None
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else None
