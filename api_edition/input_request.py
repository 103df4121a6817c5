"""The front's side of task inputs: read ``POST /api_prompt`` as JSON or multipart, stage the files.

JSON: ``{"prompt": GRAPH, "inputs": [{"name": "face.png", "data": "<base64>"} | {"name": ..., "url": ...}]}``
(``data`` may be a ``data:...;base64,`` URL). Multipart: a ``prompt`` part holding that same JSON (or the
bare graph), optionally a ``params`` part (JSON, for ``?workflow=``), and one part per file, named by its
file name. Inline files are written to the task's folder here; URL inputs are checked against the input
policy (``WebhookPolicy`` with ``--input-url-allow``) and left for the worker to fetch. Any refusal is an
``InputRefused`` (400/413) and removes what was written: nothing is queued, nothing written elsewhere.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pybase64
from aiohttp import BodyPartReader, web

from standard.http_util import parse_json, read_body_within
from standard.storage.errors import StorageError

from .inputs import InputLimits, InputRefused, TaskFolder, check_name
from .webhook import WebhookPolicy, WebhookRefused

if TYPE_CHECKING:  # pragma: no cover
    from .input_bucket import InputBucket

log = logging.getLogger("comfyserve.api.inputs")

# A request's parse + decode + write: about 1.5 ms per MB on the event loop. Larger bodies go to a thread in
# one hop, which alone cost more than that on a loaded 2-core machine (bench/api_clients.py).
THREAD_PARSE_BYTES = 4 * 1024 * 1024
CHUNK_BYTES = 256 * 1024
T = TypeVar("T")
_DATA_URL = re.compile(r"data:[^,;]*(?:;[^,;]*)*;base64,", re.IGNORECASE)


@dataclass
class Submission:
    """The request's JSON document (None: empty body) and its staged inputs."""

    document: Any
    folder: TaskFolder | None = None
    names: list[str] = field(default_factory=list)
    fetch: list[dict[str, str]] = field(default_factory=list)
    uploaded_to: InputBucket | None = None

    async def publish(self, bucket: InputBucket | None, *, keep_local: bool) -> None:
        """oss:// data dir: the inline files go to the bucket, where any instance finds them. The local
        copy stays only for instances sharing this machine's mirror (``keep_local``): elsewhere it is
        just staging."""
        if bucket is None or self.folder is None or not self.folder.written:
            return
        self.uploaded_to = bucket
        await bucket.upload(self.folder.path, self.folder.relative, self.folder.written)
        if not keep_local:
            await self.folder.remove()

    async def discard(self) -> None:
        """The task is not queued after all: its files go (from the bucket too)."""
        if self.folder is not None and self.folder.written:
            await self.folder.remove()
        if self.folder is not None and self.uploaded_to is not None:
            try:
                await self.uploaded_to.remove(self.folder.relative)
            except StorageError as exc:  # the janitor's --input-retention sweep gets them
                log.warning("removing the inputs of an unqueued task from the bucket: %s", exc)


def body_limit(max_json_bytes: int, limits: InputLimits) -> int:
    """Largest JSON body: the workflow plus the inline inputs, base64-encoded."""
    return max_json_bytes + (limits.max_total_bytes * 4) // 3 + 4 * limits.max_files + 65536


def parse_document(raw: bytes) -> Any:
    try:
        return parse_json(raw)
    except ValueError as exc:
        raise InputRefused(400, "invalid_json", f"the body is not JSON: {exc}") from None


async def off_loop_if_large(size: int, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` on the event loop, or in one thread hop when ``size`` bytes make it long.

    A request's parse, base64 decode and file writes go in one call: a hop to a thread waits to be
    scheduled (milliseconds on a loaded machine), more than the work itself for a body of a few MB."""
    if size > THREAD_PARSE_BYTES:
        return await asyncio.to_thread(function, *args)
    return function(*args)


class Stager:
    """Counts and writes one request's files, under the limits."""

    def __init__(self, data_dir: Path | None, limits: InputLimits, policy: WebhookPolicy) -> None:
        self.data_dir = data_dir
        self.limits = limits
        self.policy = policy
        self.submission = Submission(None)
        self.total = 0

    def _folder(self) -> TaskFolder:
        if self.data_dir is None:
            raise InputRefused(400, "inputs_unavailable", "this front has no --data-dir: send tasks with input "
                                                          "files to a front that shares the instances' data dir")
        if self.submission.folder is None:
            self.submission.folder = TaskFolder(self.data_dir)
        return self.submission.folder

    def claim(self, name: Any) -> str:
        name = check_name(name)
        if name in self.submission.names:
            raise InputRefused(400, "bad_input", f"input {name!r} is given twice")
        if len(self.submission.names) >= self.limits.max_files:
            raise InputRefused(413, "payload_too_large", f"a task takes at most {self.limits.max_files} inputs")
        self._folder()
        self.submission.names.append(name)
        return name

    def count(self, name: str, size: int) -> None:
        if size > self.limits.max_file_bytes:
            raise InputRefused(413, "payload_too_large",
                               f"input {name!r} exceeds {self.limits.max_file_bytes} bytes (--max-input-file)")
        if self.total + size > self.limits.max_total_bytes:
            raise InputRefused(413, "payload_too_large",
                               f"the inputs exceed {self.limits.max_total_bytes} bytes (--max-input-total)")

    def take_json(self, raw: bytes) -> None:
        """A JSON body: its document, and its inline inputs decoded and written (blocking)."""
        self.submission.document = parse_document(raw) if raw.strip() else None
        self.listed(self.submission.document)

    async def store(self, name: str, data: bytes) -> None:
        self.count(name, len(data))
        self.total += len(data)
        await self._folder().write(name, data)

    def url(self, name: str, url: Any) -> None:
        if not isinstance(url, str):
            raise InputRefused(400, "bad_input", f"input {name!r}: 'url' must be a string")
        try:
            self.policy.check(url)
        except WebhookRefused as exc:
            raise InputRefused(400, "input_url_not_allowed", f"input {name!r}: {exc}") from None
        self.submission.fetch.append({"name": name, "url": url})

    def listed(self, document: Any) -> None:
        """The ``inputs`` list of a JSON document (a bare graph has none): URL inputs checked, inline
        ones decoded and written once all of them decoded (blocking)."""
        if not isinstance(document, dict) or "inputs" not in document:
            return
        entries = document["inputs"]
        if isinstance(entries, dict) and "class_type" in entries:
            return  # a bare graph with a node called "inputs"
        if not isinstance(entries, list):
            raise InputRefused(400, "bad_input", "'inputs' must be a list of {name, data} or {name, url}")
        decoded: list[tuple[str, bytes]] = []
        for entry in entries:
            if not isinstance(entry, dict):
                raise InputRefused(400, "bad_input", "each input must be an object {name, data} or {name, url}")
            name = self.claim(entry.get("name"))
            if ("data" in entry) == ("url" in entry):
                raise InputRefused(400, "bad_input", f"input {name!r} needs exactly one of 'data' and 'url'")
            if "url" in entry:
                self.url(name, entry["url"])
            else:
                data = self._decode(name, entry["data"])
                self.total += len(data)
                decoded.append((name, data))
        for name, data in decoded:
            self._folder().write_now(name, data)

    def _decode(self, name: str, text: Any) -> bytes:
        if not isinstance(text, str):
            raise InputRefused(400, "bad_input", f"input {name!r}: 'data' must be a base64 string")
        match = _DATA_URL.match(text)
        raw = text[match.end():] if match else text  # (a data: URL's payload is copied once, not the usual case)
        self.count(name, len(raw) * 3 // 4 - raw[-2:].count("="))
        try:  # validate: only the alphabet and correct padding (what binascii's strict mode takes), no copy
            try:
                return pybase64.b64decode(raw, validate=True)
            except binascii.Error:  # line breaks (MIME-style base64): without them it must be strict
                return pybase64.b64decode("".join(raw.split()), validate=True)
        except ValueError:  # binascii.Error, or a str that is not ASCII
            raise InputRefused(400, "bad_input", f"input {name!r}: 'data' is not valid base64") from None


async def read_submission(request: web.Request, *, max_json_bytes: int, limits: InputLimits,
                          data_dir: Path | None, policy: WebhookPolicy) -> Submission:
    """The request's document and its inputs, staged; ``InputRefused`` (files removed) if they cannot be."""
    stager = Stager(data_dir, limits, policy)
    try:
        if request.content_type == "multipart/form-data":
            await _multipart(request, stager, max_json_bytes)
        else:
            raw = await read_body_within(request, body_limit(max_json_bytes, limits))
            if raw is None:
                raise InputRefused(413, "payload_too_large", f"the body exceeds {body_limit(max_json_bytes, limits)} "
                                                             "bytes (--max-payload plus --max-input-total)")
            await off_loop_if_large(len(raw), stager.take_json, raw)
    except BaseException:
        await stager.submission.discard()
        raise
    return stager.submission


async def _multipart(request: web.Request, stager: Stager, max_json_bytes: int) -> None:
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError) as exc:  # aiohttp asserts on a missing boundary
        raise InputRefused(400, "bad_request", f"not a multipart body: {exc}") from None
    params: Any = None
    seen: set[str] = set()
    json_bytes = 0
    while True:
        part = await reader.next()
        if part is None:
            break
        if not isinstance(part, BodyPartReader):
            raise InputRefused(400, "bad_request", "nested multipart bodies are not taken")
        if part.filename is not None:
            name = stager.claim(part.filename)
            await stager.store(name, await _read_part(part, lambda size, n=name: stager.count(n, size)))
        elif part.name in ("prompt", "params"):
            if part.name in seen:
                raise InputRefused(400, "bad_request", f"the {part.name!r} part is given twice")
            seen.add(part.name)
            def too_big(size: int, what: str | None = part.name) -> None:
                if size > max_json_bytes:
                    raise InputRefused(413, "payload_too_large", f"the {what} part exceeds {max_json_bytes} bytes")
            raw = await _read_part(part, too_big)
            json_bytes += len(raw)
            value = await off_loop_if_large(len(raw), parse_document, raw)
            if part.name == "prompt":
                stager.submission.document = value
            else:
                params = value
        else:
            raise InputRefused(400, "bad_request", f"unexpected form field {part.name!r}: send 'prompt', 'params' "
                                                   "and files (parts with a filename)")
    if params is not None:
        document = stager.submission.document
        if document is None:
            stager.submission.document = {"params": params}
        elif isinstance(document, dict):
            document["params"] = params
        else:
            raise InputRefused(400, "bad_request", "the prompt part must be a JSON object")
    await off_loop_if_large(json_bytes, stager.listed, stager.submission.document)


async def _read_part(part: BodyPartReader, check: Any) -> bytes:
    """A part's bytes; ``check(size_so_far)`` raises past a cap before the rest is read."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk(CHUNK_BYTES):
        size += len(chunk)
        check(size)
        chunks.append(chunk)
    return b"".join(chunks)
