"""/view, /upload/image and /upload/mask over the input/output/temp folders.

Every filename, subfolder and type from a request is resolved with
``standard.paths.resolve_inside``; the statuses follow ComfyUI's: a bad
filename or type is 400, a subfolder that leaves its root 403, a missing file
404. Disk and image work runs in a thread. What ``/view`` serves carries the
headers of ``file_headers`` (only media inline; no stored XSS).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from ..datadir import WorkDirs
from ..errors import PathOutsideRoot
from ..http_util import json_error, parse_json, read_form
from ..paths import check_name_lengths, resolve_inside
from . import storage_web
from .context import instance_context
from .file_headers import file_headers

routes = web.RouteTableDef()
TYPES = ("input", "output", "temp")


def _bad(status: int, message: str) -> web.HTTPException:
    kinds = {400: "invalid_request", 403: "forbidden", 404: "not_found"}
    return json_error(status, kinds[status], message)


def annotated_filepath(name: str) -> tuple[str, str | None]:
    """ComfyUI's ``name.png [output]`` form: (name, type) with the annotation stripped."""
    for kind in TYPES:
        suffix = f" [{kind}]"
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    return name, None


def _type_dir(workdirs: WorkDirs, kind: str | None, default: str) -> tuple[Path, str]:
    kind = default if kind is None or kind == "" else kind
    if kind not in TYPES:
        raise _bad(400, f"unknown type {kind!r}: use input, output or temp")
    return workdirs.by_type(kind), kind


def _escapes(path: str) -> bool:
    """'..' or absolute, also once percent-decoded (a later hop might decode it)."""
    for candidate in (path, unquote(path)):
        candidate = candidate.replace("\\", "/")
        if candidate.startswith("/") or ".." in candidate.split("/"):
            return True
    return False


def _check_filename(filename: str) -> None:
    """A bare file name: no folders, no '..', not absolute (400 otherwise)."""
    if not filename or filename == ".":
        raise _bad(400, "filename is empty")
    if _escapes(filename):
        raise _bad(400, f"filename must not leave its folder: {filename!r}")
    if "\x00" in filename:
        raise _bad(400, "filename contains a NUL byte")
    check_name_lengths(filename)


def _subfolder_dir(root: Path, subfolder: str, status: int) -> Path:
    if _escapes(subfolder):
        raise _bad(status, f"subfolder leaves its root: {subfolder!r}")
    try:
        return resolve_inside(root, subfolder)
    except PathOutsideRoot as exc:
        raise _bad(status, f"subfolder leaves its root: {exc}") from None


def _view_file(request: web.Request) -> tuple[Path, str]:
    return view_path(instance_context(request).workdirs, request.query)


def view_path(workdirs: WorkDirs, query: Mapping[str, str]) -> tuple[Path, str]:
    """(local path, file name) of what ``/view?filename=&subfolder=&type=`` asks for; HTTP errors for a
    name that is missing, unknown or leaves its folder. Also the front of real ComfyUI's (``standard.backend``)."""
    if "filename" not in query:
        raise _bad(404, "filename is required")
    filename, kind = annotated_filepath(query["filename"])
    _check_filename(filename)
    root, _ = _type_dir(workdirs, kind or query.get("type"), "output")
    folder = _subfolder_dir(root, query.get("subfolder", ""), 403)
    filename = os.path.basename(filename.replace("\\", "/"))
    try:
        return resolve_inside(folder, filename), filename
    except PathOutsideRoot as exc:
        raise _bad(403, f"file leaves its root: {exc}") from None


def _render_view(path: Path, filename: str, preview: str | None, channel: str) -> web.StreamResponse:
    """The image, converted as ``preview`` / ``channel`` ask (ComfyUI's /view rules)."""
    if not path.is_file():
        raise _bad(404, "file not found")
    try:
        if preview is not None:
            parts = preview.split(";")
            image_format = parts[0] if parts[0] in ("webp", "jpeg") and "a" not in channel else "webp"
            quality = int(parts[-1]) if parts[-1].isdigit() else 90
            with Image.open(path) as opened:
                img: Image.Image = opened
                if image_format == "jpeg" or channel == "rgb":
                    img = opened.convert("RGB")
                elif opened.mode not in ("RGB", "RGBA", "L", "LA"):
                    img = opened.convert("RGBA")
                buffer = io.BytesIO()
                img.save(buffer, format=image_format, quality=quality)
            return web.Response(body=buffer.getvalue(), headers=file_headers(
                filename.replace("png", image_format), f"image/{image_format}"))
        if channel == "rgb":  # "" or "rgba" (and anything else) serve the file as it is
            with Image.open(path) as img:
                buffer = io.BytesIO()
                img.convert("RGB").save(buffer, format="PNG")
            return web.Response(body=buffer.getvalue(), headers=file_headers(filename, "image/png"))
        if channel == "a":
            with Image.open(path) as img:
                alpha = img.getchannel("A") if img.mode == "RGBA" else Image.new("L", img.size, 255)
                alpha_img = Image.new("RGBA", img.size)
                alpha_img.putalpha(alpha)
                buffer = io.BytesIO()
                alpha_img.save(buffer, format="PNG")
            return web.Response(body=buffer.getvalue(), headers=file_headers(filename, "image/png"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise _bad(400, f"cannot convert {filename!r}: {exc}") from None
    return web.FileResponse(path, headers=file_headers(filename))


@routes.get("/view")
async def view_image(request: web.Request) -> web.StreamResponse:
    path, filename = _view_file(request)
    if not path.is_file() and (url := await storage_web.fetch_or_remote_url(request.app, path)):
        raise web.HTTPFound(url)
    channel = request.query.get("channel", "")
    return await asyncio.to_thread(_render_view, path, filename, request.query.get("preview"), channel)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _free_name(folder: Path, filename: str, data: bytes, overwrite: bool) -> tuple[str, bool]:
    """(name to store under, True if an identical file already has that name)."""
    if overwrite:
        return filename, False
    stem, ext = os.path.splitext(filename)
    digest = hashlib.sha256(data).hexdigest()
    candidate, counter = filename, 1
    while (folder / candidate).exists():
        if (folder / candidate).is_file() and _sha256_file(folder / candidate) == digest:
            return candidate, True
        candidate = f"{stem} ({counter}){ext}"
        counter += 1
    return candidate, False


def _store_upload(folder: Path, filename: str, data: bytes, overwrite: bool,
                  compose: Any = None) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    name, duplicate = _free_name(folder, filename, data, overwrite)
    if not duplicate:
        target = folder / name
        if compose is not None:
            compose(data, target)
        else:
            tmp = target.with_name(f".{name}.upload")
            tmp.write_bytes(data)
            os.replace(tmp, target)
    return name


async def _parse_upload(request: web.Request) -> tuple[Any, bytes, str, Path, str, str, bool]:
    if not request.content_type.startswith("multipart/"):
        raise _bad(400, "expected multipart/form-data with an 'image' file field")
    post = await read_form(request)
    image = post.get("image")
    if not isinstance(image, web.FileField) or not image.filename:
        raise _bad(400, "the 'image' field must be a file with a filename")
    filename = image.filename
    _check_filename(filename)
    if "/" in filename or "\\" in filename:
        raise _bad(400, f"filename must not contain folders: {filename!r}")
    raw_type = post.get("type")
    workdirs = instance_context(request).workdirs
    root, kind = _type_dir(workdirs, raw_type if isinstance(raw_type, str) else None, "input")
    subfolder = post.get("subfolder", "")
    subfolder = subfolder if isinstance(subfolder, str) else ""
    folder = _subfolder_dir(root, subfolder, 400)
    overwrite = str(post.get("overwrite", "")).lower() in ("true", "1")
    data = await asyncio.to_thread(image.file.read)
    return post, data, filename, folder, subfolder, kind, overwrite


@routes.post("/upload/image")
async def upload_image(request: web.Request) -> web.Response:
    _post, data, filename, folder, subfolder, kind, overwrite = await _parse_upload(request)
    async with instance_context(request).server.upload_lock:
        name = await asyncio.to_thread(_store_upload, folder, filename, data, overwrite)
    await storage_web.after_upload(request.app, folder / name)
    return web.json_response({"name": name, "subfolder": subfolder, "type": kind})


def _original_of_mask(request: web.Request, post: Any) -> Path:
    """The image a mask belongs to, from the ``original_ref`` JSON field."""
    try:
        ref = parse_json(str(post.get("original_ref", "")))
    except ValueError:
        raise _bad(400, "original_ref must be JSON: {filename, subfolder, type}") from None
    if not isinstance(ref, dict) or not isinstance(ref.get("filename"), str):
        raise _bad(400, "original_ref must be a JSON object with a filename")
    filename, kind = annotated_filepath(ref["filename"])
    _check_filename(filename)
    ref_type = ref.get("type")
    workdirs = instance_context(request).workdirs
    root, _ = _type_dir(workdirs, kind or (ref_type if isinstance(ref_type, str) else None), "output")
    subfolder = ref.get("subfolder") or ""
    folder = _subfolder_dir(root, subfolder if isinstance(subfolder, str) else "", 403)
    try:
        original = resolve_inside(folder, filename)
    except PathOutsideRoot as exc:
        raise _bad(403, f"original leaves its root: {exc}") from None
    if not original.is_file():
        raise _bad(404, f"original image not found: {ref['filename']!r}")
    return original


def _mask_composer(original: Path) -> Any:
    """Store the original with the mask's alpha as its alpha, keeping its PNG text."""

    def compose(mask_bytes: bytes, target: Path) -> None:
        with Image.open(original) as original_img:
            metadata = PngInfo()
            for key, value in getattr(original_img, "text", {}).items():
                metadata.add_text(key, value)
            rgba = original_img.convert("RGBA")
        with Image.open(io.BytesIO(mask_bytes)) as mask_img:
            alpha = mask_img.convert("RGBA").getchannel("A")
        if alpha.size != rgba.size:
            raise ValueError(f"mask is {alpha.size[0]}x{alpha.size[1]}, image is {rgba.size[0]}x{rgba.size[1]}")
        rgba.putalpha(alpha)
        tmp = target.with_name(f".{target.name}.upload")
        rgba.save(tmp, format="PNG", compress_level=4, pnginfo=metadata)
        os.replace(tmp, target)

    return compose


@routes.post("/upload/mask")
async def upload_mask(request: web.Request) -> web.Response:
    post, data, filename, folder, subfolder, kind, overwrite = await _parse_upload(request)
    original = _original_of_mask(request, post)
    async with instance_context(request).server.upload_lock:
        try:
            name = await asyncio.to_thread(
                _store_upload, folder, filename, data, overwrite, _mask_composer(original)
            )
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise _bad(400, f"cannot apply the mask: {exc}") from None
    return web.json_response({"name": name, "subfolder": subfolder, "type": kind})
