"""The worker's side of task inputs: fetch the URL inputs before the run, remove the folder after it.

Fetched under the webhooks' address policy (``WebhookPolicy`` with ``--input-url-allow``): the URL is
checked, every address its host resolves to is checked at connect time (``CheckingResolver``: the
connection goes to those addresses), redirects are followed by hand (at most ``MAX_REDIRECTS``) and each
target checked again; the body is capped at ``--max-input-file`` bytes and the whole fetch at
``--input-fetch-timeout``. A fetch that fails is the task's error result (``input_fetch_failed``), never
a crash, and it is not retried: the next worker would fail the same way.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin

import aiohttp
from aiohttp.abc import AbstractResolver

from standard.errors import WorkerError
from standard.storage.errors import StorageError

from .inputs import InputLimits, InputRefused, check_name, envelope_of, folder_of, write_new
from .webhook import AddressRefused, CheckingResolver, WebhookPolicy, WebhookRefused

if TYPE_CHECKING:  # pragma: no cover
    from .input_bucket import InputBucket

log = logging.getLogger("comfyserve.api.inputs")

MAX_REDIRECTS = 5
CHUNK_BYTES = 256 * 1024
FETCH_FAILED = "input_fetch_failed"


class FetchFailed(WorkerError):
    """A task's URL input could not be fetched: the task's error result says why."""

    kind = FETCH_FAILED


class InputFetcher:
    """One per worker: one HTTP session whose resolver enforces the input policy."""

    def __init__(self, data_dir: Path | None, *, allow: tuple[str, ...] = (), limits: InputLimits | None = None,
                 timeout_s: float = 60.0, resolver: AbstractResolver | None = None,
                 bucket: InputBucket | None = None) -> None:
        self.data_dir = data_dir
        self.bucket = bucket  # oss:// data dir: fetched files go up to it; a reported task's objects go
        self.policy = WebhookPolicy(allow, what="input URL", flag="--input-url-allow")
        self.limits = limits or InputLimits()
        self.timeout_s = timeout_s
        self._resolver = resolver
        self._http: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            connector = aiohttp.TCPConnector(resolver=CheckingResolver(self.policy, self._resolver))
            self._http = aiohttp.ClientSession(connector=connector)
        return self._http

    async def prepare(self, data: bytes) -> None:
        """Fetch the URL inputs of a queued item into its folder; ``FetchFailed`` if one cannot be."""
        extra = envelope_of(data)
        if not extra or not extra.get("fetch"):
            return
        fetch = extra["fetch"]
        folder = folder_of(self.data_dir, extra.get("inputs_dir")) if self.data_dir is not None else None
        if folder is None:
            raise FetchFailed("this worker has no --data-dir to fetch URL inputs into" if self.data_dir is None
                              else "the task's inputs_dir is not a task input folder")
        if not isinstance(fetch, list):
            raise FetchFailed("the task's fetch list is not a list")
        names: list[str] = []
        for entry in fetch:
            if not isinstance(entry, dict):
                raise FetchFailed("the task's fetch list holds a non-object")
            try:
                name = check_name(entry.get("name"))
            except InputRefused as exc:
                raise FetchFailed(exc.message) from None
            body = await self._get(name, entry.get("url"))
            await asyncio.to_thread(write_new, folder, name, body)
            names.append(name)
        if self.bucket is not None:  # the instance may be on another machine: it reads the bucket
            try:
                await self.bucket.upload(folder, extra["inputs_dir"], names)
            except (StorageError, OSError) as exc:
                raise FetchFailed(f"the fetched inputs could not be put in the bucket: {exc}") from None

    async def _get(self, name: str, url: Any) -> bytes:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._follow(name, url)
        except TimeoutError:
            raise FetchFailed(f"input {name!r}: no answer within {self.timeout_s}s") from None
        except aiohttp.ClientConnectorError as exc:
            reason = exc.os_error if isinstance(exc.os_error, AddressRefused) else exc
            raise FetchFailed(f"input {name!r}: {reason}") from None
        except aiohttp.ClientError as exc:
            raise FetchFailed(f"input {name!r}: {exc!r}") from None

    async def _follow(self, name: str, url: Any) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            if not isinstance(url, str):
                raise FetchFailed(f"input {name!r}: the URL is not a string")
            try:
                self.policy.check(url)
            except WebhookRefused as exc:
                raise FetchFailed(f"input {name!r}: {exc}") from None
            async with self._session().get(url, allow_redirects=False) as response:
                if response.status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                    url = urljoin(url, response.headers["Location"])
                    continue
                if response.status != 200:
                    raise FetchFailed(f"input {name!r}: {url} answered HTTP {response.status}")
                cap = self.limits.max_file_bytes
                if response.content_length is not None and response.content_length > cap:
                    raise FetchFailed(f"input {name!r}: {response.content_length} bytes, over {cap} "
                                      "(--max-input-file)")
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                    size += len(chunk)
                    if size > cap:
                        raise FetchFailed(f"input {name!r}: more than {cap} bytes (--max-input-file)")
                    chunks.append(chunk)
                return b"".join(chunks)
        raise FetchFailed(f"input {name!r}: more than {MAX_REDIRECTS} redirects")

    async def release(self, data: bytes) -> None:
        """The task is reported: its input folder goes (no-op for a task without inputs)."""
        extra = envelope_of(data)
        if not extra:
            return
        if self.data_dir is not None:
            folder = folder_of(self.data_dir, extra.get("inputs_dir"))
            if folder is not None:
                await asyncio.to_thread(shutil.rmtree, folder, True)
        if self.bucket is not None and folder_of(Path(), extra.get("inputs_dir")) is not None:
            try:
                await self.bucket.remove(extra["inputs_dir"])
            except StorageError as exc:  # the front's --input-retention sweep gets them
                log.warning("removing task inputs %s from the bucket: %s", extra["inputs_dir"], exc)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
