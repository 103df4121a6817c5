"""Outputs a client can use: a ``url`` on each file item of a result, the bytes inline when asked.

A file item is any ``{"filename", "subfolder", "type"}`` object in a list under any key of a node's output:
``images`` of SaveImage, and whatever key a video/audio plugin reports (``gifs``, ``videos``, ``audio``).
Each gets ``url``: kept when the instance already set one (an ``oss://`` data dir signs its uploaded
outputs), else ``/api_output?filename=...&subfolder=...&type=...``, relative to the API front, which serves
the data dir's output/temp files there with the API token (``serve_output``).

A task queued with ``?return=base64`` (a tag like any other) also gets ``data`` (base64) on the items of
the final ``outputs`` map, read from the instance's ``/view``, while their sum stays under
``--max-inline-output``; past it an item gets ``data_skipped`` instead (its ``url`` still works).
"""

from __future__ import annotations

import asyncio
import base64
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from standard.client import InstanceClient
from standard.errors import InstanceError, PathOutsideRoot
from standard.http_util import json_error
from standard.paths import resolve_inside

OUTPUT_PATH = "/api_output"
RETURN_TAG = "return"
DEFAULT_MAX_INLINE_OUTPUT_BYTES = 4 * 1024 * 1024
SERVED_TYPES = ("output", "temp")


def file_items(node_outputs: Any) -> Iterator[dict[str, Any]]:
    """Every file item of an ``outputs`` map (node -> output), whatever key holds it."""
    if not isinstance(node_outputs, dict):
        return
    for output in node_outputs.values():
        if not isinstance(output, dict):
            continue
        for items in output.values():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and isinstance(item.get("filename"), str):
                    yield item


def _identity(item: dict[str, Any]) -> tuple[str, str, str]:
    return item["filename"], str(item.get("subfolder") or ""), str(item.get("type") or "output")


def output_url(item: dict[str, Any]) -> str:
    query = {"filename": item["filename"], "subfolder": str(item.get("subfolder") or ""),
             "type": str(item.get("type") or "output")}
    return f"{OUTPUT_PATH}?{urlencode(query)}"


class OutputLinks:
    """The worker's side: adds the urls (and inline bytes) to a successful result's events, in place."""

    def __init__(self, instance: InstanceClient, max_inline_bytes: int = DEFAULT_MAX_INLINE_OUTPUT_BYTES) -> None:
        self.instance = instance
        self.max_inline_bytes = max_inline_bytes

    async def annotate(self, events: list[Any], tags: dict[str, str]) -> None:
        if not events or not isinstance(events[-1], dict):
            return
        # A file the instance gave a url in its history (real ComfyUI behind a front on an oss:// data dir
        # signs it there, not in its executed events) has that url in the events too.
        known = {_identity(item): item["url"] for item in file_items(events[-1]) if isinstance(item.get("url"), str)}
        for event in events[:-1]:
            if isinstance(event, dict) and isinstance(event.get("data"), dict):
                output = event["data"].get("output")
                for item in file_items({"_": output}):
                    item.setdefault("url", known.get(_identity(item)) or output_url(item))
        # The final map gets its own copies: inline bytes go there once, not also into the executed events.
        events[-1] = outputs = copy.deepcopy(events[-1])
        for item in file_items(outputs):
            item.setdefault("url", output_url(item))
        if tags.get(RETURN_TAG) == "base64":
            await self._inline(outputs)

    async def _inline(self, outputs: dict[str, Any]) -> None:
        left = self.max_inline_bytes
        for item in file_items(outputs):
            try:
                data = await self.instance.view(item["filename"], str(item.get("subfolder") or ""),
                                                str(item.get("type") or "output"))
            except InstanceError as exc:
                item["data_skipped"] = f"not readable from the instance: {exc}"
                continue
            if len(data) > left:
                item["data_skipped"] = f"over the {self.max_inline_bytes}-byte inline cap (--max-inline-output)"
                continue
            left -= len(data)
            item["data"] = base64.b64encode(data).decode()


def output_path(data_dir: Path, query: Any) -> Path:
    """The file ``GET /api_output`` names, confined to the data dir's output or temp folder."""
    kind = query.get("type", "output")
    if kind not in SERVED_TYPES:
        raise json_error(400, "bad_request", f"type must be one of {', '.join(SERVED_TYPES)}")
    filename = query.get("filename", "")
    if not filename:
        raise json_error(400, "bad_request", "filename is required")
    try:
        return resolve_inside(data_dir / kind, query.get("subfolder", ""), filename)
    except (PathOutsideRoot, ValueError):
        raise json_error(400, "bad_request", "filename/subfolder must stay inside the folder") from None


def output_handler(data_dir: Path | None) -> Any:
    async def serve_output(request: web.Request) -> web.StreamResponse:
        """``GET /api_output?filename=&subfolder=&type=``: a task's output file (API token required)."""
        if data_dir is None:
            raise json_error(404, "not_found", "this front has no --data-dir to serve outputs from")
        path = output_path(data_dir, request.query)
        if not await asyncio.to_thread(path.is_file):
            raise json_error(404, "not_found", f"no output file {request.query.get('filename')!r}")
        return web.FileResponse(path, headers={"Cache-Control": "private, max-age=3600"})

    return serve_output
