"""The Python client of the API edition (async, httpx): submit, status, cancel, events, result.

    async with ApiClient("http://api:8000", token=TOKEN, service="svc") as api:
        task = await api.submit(workflow="portrait", params={"prompt": "a cat", "seed": 5},
                                inputs={"face.png": Path("face.png").read_bytes()}, return_base64=True)
        async for event in api.events(task.task_id):       # optional: live progress
            print(event.kind, event.data.get("data"))
        result = await api.result(task)                      # the sink item, taken with watch + commit
        for item in result.files():
            print(item["filename"], item["url"])

``inputs`` maps a file name to its bytes (sent as multipart parts), a ``Path`` (read), or an
``http(s)://`` URL (fetched by the worker). ``result`` reads the sink like the official SDK does
(watch, then commit): each result is delivered to one reader, so run one reader per task or per client.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from queue_service.client import QueueClient
from standard.errors import ComfyServeError

from .outputs import file_items
from .settings import DEFAULT_SERVICE, sink_of

InputValue = bytes | Path | str


class ApiClientError(ComfyServeError):
    """The front refused a call: ``status`` and the JSON error's ``kind`` and ``message``."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(f"HTTP {status} {kind}: {message}")
        self.status = status
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class Task:
    task_id: str
    request_id: str
    index: int


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event: ``status``, an instance event type (``executing``, ``progress``...) or ``result``."""

    kind: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Result:
    task_id: str
    request_id: str
    status: str  # "success" or "error"
    events: list[Any]
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "success"

    @property
    def outputs(self) -> dict[str, Any]:
        return self.events[-1] if self.ok and self.events and isinstance(self.events[-1], dict) else {}

    @property
    def error(self) -> dict[str, Any] | None:
        if self.ok or not self.events or not isinstance(self.events[0], dict):
            return None
        return self.events[0].get("data")

    def files(self) -> list[dict[str, Any]]:
        """Every file item of the outputs (images, videos, audio): ``filename``, ``url``, maybe ``data``."""
        return list(file_items(self.outputs))


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        error = resp.json()["error"]
        raise ApiClientError(resp.status_code, error.get("type", ""), error.get("message", ""))
    except (ValueError, KeyError, TypeError):
        raise ApiClientError(resp.status_code, "http_error", resp.text[:500]) from None


class ApiClient:
    def __init__(self, base_url: str, token: str | None = None, *, service: str = DEFAULT_SERVICE,
                 timeout_s: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.service = service
        headers = {"Authorization": token} if token else {}
        self.http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout_s, trust_env=False)

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    # -- submit ------------------------------------------------------------------------

    async def submit(self, graph: dict[str, Any] | None = None, *, workflow: str | None = None,
                     params: Mapping[str, Any] | None = None, inputs: Mapping[str, InputValue] | None = None,
                     task_id: str | None = None, webhook: str | None = None, return_base64: bool = False,
                     idempotency_key: str | None = None, tags: Mapping[str, str] | None = None) -> Task:
        """Queue a graph (API format) or a saved workflow with parameters; returns the task's ids."""
        if (graph is None) == (workflow is None):
            raise ValueError("give exactly one of graph and workflow")
        query: dict[str, str] = dict(tags or {})
        for key, value in (("task_id", task_id), ("workflow", workflow), ("webhook", webhook)):
            if value is not None:
                query[key] = value
        if return_base64:
            query["return"] = "base64"
        document: dict[str, Any] = {"prompt": graph} if graph is not None else {"params": dict(params or {})}
        files: list[tuple[str, tuple[str | None, bytes | str, str]]] = []
        urls = []
        for name, source in (inputs or {}).items():
            if isinstance(source, str):
                urls.append({"name": name, "url": source})
            else:
                data = await asyncio.to_thread(source.read_bytes) if isinstance(source, Path) else source
                files.append(("file", (name, data, "application/octet-stream")))
        if urls:
            document["inputs"] = urls
        headers = {"Accept": "application/json"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        if files:
            parts = [("prompt", (None, json.dumps(document), "application/json")), *files]
            resp = await self.http.post("/api_prompt", params=query, files=parts, headers=headers)
        else:
            resp = await self.http.post("/api_prompt", params=query, json=document, headers=headers)
        _raise_for(resp)
        body = resp.json()
        return Task(body["task_id"], body["request_id"], int(body["index"]))

    # -- where it is -------------------------------------------------------------------

    def _which(self, task: Task | str) -> dict[str, str]:
        return {"requestId": task.request_id} if isinstance(task, Task) else {"task_id": task}

    async def status(self, task: Task | str) -> dict[str, Any] | None:
        """``GET /api_task``: queued / running / succeeded / failed / cancelled, or None (unknown or taken)."""
        resp = await self.http.get("/api_task", params=self._which(task))
        if resp.status_code == 404:
            return None
        _raise_for(resp)
        return resp.json()

    async def cancel(self, task: Task | str) -> dict[str, Any]:
        resp = await self.http.post("/api_task/cancel", params=self._which(task))
        _raise_for(resp)
        return resp.json()

    async def workflows(self) -> list[dict[str, Any]]:
        resp = await self.http.get("/workflows")
        _raise_for(resp)
        return resp.json()["workflows"]

    async def events(self, *tasks: Task | str) -> AsyncIterator[Event]:
        """``GET /api_events``: the tasks' events until each has its ``result`` event."""
        query: list[tuple[str, str | int | float | bool | None]] = []
        for task in tasks:
            query.extend(self._which(task).items())
        async with self.http.stream("GET", "/api_events", params=query, timeout=None) as resp:
            if resp.status_code >= 400:
                await resp.aread()
                _raise_for(resp)
            kind, data = "", ""
            async for line in resp.aiter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    data += line[6:]
                elif line == "" and kind:
                    yield Event(kind, json.loads(data))
                    kind, data = "", ""

    # -- results -----------------------------------------------------------------------

    async def result(self, task: Task | str, *, timeout_s: float | None = None, commit: bool = True) -> Result:
        """The task's sink item, read with watch (only that task's) and committed (``commit=False``: left)."""
        tag = {"requestId": task.request_id} if isinstance(task, Task) else {"task_id": task}
        async with QueueClient(self.base_url, sink_of(self.service), token=self.token) as sink:
            async with asyncio.timeout(timeout_s), sink.watch(window=1, tags=tag) as frames:
                async for frame in frames:
                    if commit:
                        await sink.commit(frame.index)
                    return Result(frame.tags.get("task_id", ""), frame.tags.get("requestId", ""),
                                  frame.tags.get("status", "error"), json.loads(frame.data), dict(frame.tags))
        raise ApiClientError(0, "closed", "the sink watch ended without a result")

    async def output(self, item: Mapping[str, Any]) -> bytes:
        """The bytes of a result's file item: inline ``data``, else its ``url`` (the front's, with the token)."""
        if "data" in item:
            return base64.b64decode(item["data"])
        url = str(item["url"])
        if url.startswith("/"):
            resp = await self.http.get(url)
        else:  # a signed bucket URL: no token goes there
            async with httpx.AsyncClient(trust_env=False) as plain:
                resp = await plain.get(url)
        _raise_for(resp)
        return resp.content
