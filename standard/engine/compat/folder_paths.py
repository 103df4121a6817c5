"""ComfyUI's ``folder_paths`` module for plugins and built-in nodes, over the data dir.

Plugins written for ComfyUI ``import folder_paths`` to find models, the input
and output folders and the next free output name; this module answers with the
folders of the instance whose prompt is running (see ``..context``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ... import model_folders
from ...datadir import MODEL_FOLDERS
from ...paths import resolve_inside
from ...storage import hooks as storage_hooks
from ...storage.errors import DownloadCancelled
from ...storage.names import IMAGE_EXTENSIONS, is_image_name
from .. import context, save_names

if TYPE_CHECKING:  # pragma: no cover
    from ...storage.storage import ObjectStorage

supported_pt_extensions: set[str] = set(model_folders.SUPPORTED_PT_EXTENSIONS)
TYPES = ("input", "output", "temp")


def __getattr__(name: str) -> Any:  # module attributes that depend on the running instance
    data_dir = context.current().data_dir
    if name == "base_path":
        return str(data_dir.root)
    if name == "models_dir":
        return str(data_dir.models)
    if name == "folder_names_and_paths":
        return {folder: ([str(data_dir.models / folder)], supported_pt_extensions) for folder in MODEL_FOLDERS}
    if name in ("output_directory", "input_directory", "temp_directory", "user_directory"):
        return str(getattr(context.current().workdirs, name.removesuffix("_directory")))
    raise AttributeError(name)


def get_input_directory() -> str:
    return str(context.current().workdirs.input)


def get_output_directory() -> str:
    return str(context.current().workdirs.output)


def get_temp_directory() -> str:
    return str(context.current().workdirs.temp)


def get_user_directory() -> str:
    return str(context.current().workdirs.user)


def get_directory_by_type(type_name: str) -> str | None:
    if type_name not in TYPES:
        return None
    return str(context.current().workdirs.by_type(type_name))


def annotated_filepath(name: str) -> tuple[str, str | None]:
    """``"a.png [output]"`` -> (``"a.png"``, output dir); no annotation -> (name, None)."""
    for kind in TYPES:
        suffix = f" [{kind}]"
        if name.endswith(suffix):
            return name[: -len(suffix)], get_directory_by_type(kind)
    return name, None


def _annotated_path(name: str, default_dir: str | None = None) -> tuple[Path, str]:
    name, base_dir = annotated_filepath(name)
    if base_dir is None:
        base_dir = default_dir if default_dir is not None else get_input_directory()
    return resolve_inside(base_dir, name), base_dir


def get_annotated_filepath(name: str, default_dir: str | None = None) -> str:
    """The file a LoadImage-style value names, confined to its folder (an oss:// data dir's
    input is fetched from the bucket on first use)."""
    path, base_dir = _annotated_path(name, default_dir)
    storage = storage_hooks.bucket_inputs(context.current().data_dir, base_dir)
    if storage is not None:
        storage_hooks.engine_input_path(storage, path)
    return str(path)


def exists_annotated_filepath(name: str) -> bool:
    try:
        path, base_dir = _annotated_path(name)
    except ValueError:
        return False
    if path.exists():
        return True
    storage = storage_hooks.bucket_inputs(context.current().data_dir, base_dir)
    return storage is not None and storage.has_input(path)


def get_folder_paths(folder_name: str) -> list[str]:
    path = model_folders.folder_path(context.current().data_dir, folder_name)
    return [] if path is None else [str(path)]


def get_filename_list(folder_name: str) -> list[str]:
    return model_folders.list_folder(context.current().data_dir, folder_name) or []


def get_full_path(folder_name: str, filename: str) -> str | None:
    data_dir = context.current().data_dir
    root = model_folders.folder_path(data_dir, folder_name)
    if root is None:
        return None
    storage = storage_hooks.remote_models(data_dir)
    if storage is not None and root.parent == data_dir.models:  # oss:// data dir: fetch on first use
        return _fetch_model(storage, root.name, filename)
    try:
        path = resolve_inside(root, filename)
    except ValueError:
        return None
    return str(path) if path.is_file() else None


def _fetch_model(storage: ObjectStorage, folder: str, filename: str) -> str | None:
    """``folder_paths.get_full_path`` inside a prompt: the download shows as the node's progress
    bar, and interrupting the prompt stops it (what arrived is kept for the next try)."""
    ctx = context.current()
    node_id = ctx.executing_node
    last = [-1]

    def progress(done: int, total: int) -> None:
        if ctx.interrupted.is_set():
            raise DownloadCancelled(f"download of {folder}/{filename} interrupted")
        hook = ctx.progress_hook
        percent = done * 100 // max(total, 1)
        if hook is not None and percent != last[0]:
            last[0] = percent
            hook(percent, 100, node_id, None)

    try:
        return storage.model_path(folder, filename, progress=progress)
    except DownloadCancelled:
        raise context.InterruptProcessingException() from None


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    path = get_full_path(folder_name, filename)
    if path is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return path


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    """Accepted for compatibility; the data dir's layout is fixed (``standard.datadir``)."""


def filter_files_extensions(files: list[str], extensions: set[str] | frozenset[str]) -> list[str]:
    return sorted(f for f in files if not extensions or os.path.splitext(f)[1].lower() in extensions)


def filter_files_content_types(files: list[str], content_types: list[str]) -> list[str]:
    """Keep the files whose extension is an image (the only content type the engine reads)."""
    if "image" not in content_types:
        return []
    return [f for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]


def list_input_images() -> list[str]:
    """What LoadImage offers: images in the input folder, subfolders as ``sub/name``."""
    root = Path(get_input_directory())
    found: list[str] = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(directory, name).relative_to(root).as_posix())
    storage = storage_hooks.bucket_inputs(context.current().data_dir, root)
    if storage is not None:  # oss:// data dir: the bucket's input/ too (fetched on use)
        found = list(set(found).union(
            name for name in storage.input_names() if is_image_name(name)))
    return sorted(found)


def _expand_variables(prefix: str, width: int, height: int) -> str:
    now = time.localtime()
    values = {
        "width": str(width), "height": str(height), "year": str(now.tm_year),
        "month": f"{now.tm_mon:02}", "day": f"{now.tm_mday:02}", "hour": f"{now.tm_hour:02}",
        "minute": f"{now.tm_min:02}", "second": f"{now.tm_sec:02}",
    }
    for key, value in values.items():
        prefix = prefix.replace(f"%{key}%", value)
    return prefix


def save_location(filename_prefix: str, output_dir: str, image_width: int = 0,
                  image_height: int = 0) -> tuple[str, str, str, str]:
    """(folder, file stem, subfolder, prefix) of a save; the folder is made if missing.

    The prefix's folder part becomes the subfolder; it must stay inside ``output_dir``.
    """
    if "%" in filename_prefix:
        filename_prefix = _expand_variables(filename_prefix, image_width, image_height)
    normalized = os.path.normpath(filename_prefix.replace("\\", "/"))
    subfolder, filename = os.path.split(normalized)
    try:
        folder = resolve_inside(output_dir, subfolder) if subfolder else Path(output_dir).resolve()
    except ValueError as exc:
        raise ValueError("Saving image outside the output folder is not allowed: "
                         f"filename_prefix {filename_prefix!r}") from exc
    if not filename or filename in (".", ".."):
        raise ValueError(f"filename_prefix {filename_prefix!r} names no file")
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder), filename, Path(subfolder).as_posix() if subfolder else "", filename_prefix


def get_save_image_path(
    filename_prefix: str, output_dir: str, image_width: int = 0, image_height: int = 0
) -> tuple[str, str, int, str, str]:
    """(folder, file stem, next counter, subfolder, prefix) for ``{stem}_{counter:05}_.png`` names.

    For plugins, which write the file themselves: the counter continues after
    the highest one on disk, listed on every call as ComfyUI does (the built-in
    SaveImage remembers its counters instead, see ``..save_names``).
    """
    folder, filename, subfolder, prefix = save_location(filename_prefix, output_dir, image_width, image_height)
    return folder, filename, save_names.listed_next(folder, filename), subfolder, prefix
