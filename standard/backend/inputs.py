"""An ``oss://`` data dir in front of real ComfyUI: a prompt's input files are on local disk before ComfyUI sees it.

The embedded engine asks the bucket about an input name its (cached) listing lacks while it validates a
prompt (``ObjectStorage.probe_inputs``: an API task's files, put in the bucket a moment ago) and fetches it
when ``LoadImage`` opens it. Real ComfyUI reads only its local ``input/`` folder, and validates the prompt
inside ``POST /prompt``. So the front does both before it forwards ``POST /prompt``: each input name the
prompt refers to that the local disk lacks is looked up (one HEAD, bounded) and downloaded into the local
``input/`` (``ObjectStorage.fetch_inputs``); ComfyUI then validates and runs it as any local file. (The
front is the one place that can: it shares ComfyUI's disk, which a worker on another machine does not.)

Copies found by such a look-up go again once ComfyUI is done with every prompt that needed them, as the
embedded engine drops them after its task: while it holds some, the front looks at ComfyUI's ``/queue``
every ``POLL_S``, and the inputs of prompts that left it are removed (their objects stay in the bucket).

Models likewise: the embedded engine fetches a model from the bucket when a loader opens it; real ComfyUI
validates a loader's file name against its local ``models/`` folders, so the model files a prompt names
(``ObjectStorage.fetch_models``) are downloaded into the model cache (``DIR/models/<folder>``, which ComfyUI
reads) before it is forwarded, and kept out of the cache's eviction until the prompt left ComfyUI's queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from ..errors import ConfigError
from ..http_util import BadJSON, parse_json
from ..storage.errors import StorageError
from ..tasks import cancel_and_wait
from .outputs import OUTPUTS
from .runtime import Backend
from .watcher import watch_comfyui

log = logging.getLogger("comfyserve.backend")

POLL_S = 0.5  # how often ComfyUI's queue is looked at while inputs fetched for its prompts are held
REQUEST_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Fetched:
    """What the front fetched for one prompt: looked-up input names, and model files (``folder/name``)."""

    inputs: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)


class PromptInputs:
    """The front's side of an oss:// data dir: inputs fetched before ``POST /prompt``, dropped after the run."""

    def __init__(self, storage: Any, backend: Backend) -> None:
        self.storage = storage  # standard.storage.ObjectStorage (oss2 is loaded only for a bucket)
        self.backend = backend
        self.held: dict[str, Fetched] = {}  # prompt id -> looked-up inputs and models it needs
        self.session: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()

    async def prepare(self) -> None:
        """Before ComfyUI starts, and before ``/restart`` starts it again (as the embedded engine does before
        it imports plugins): the bucket's ``custom_nodes/`` synced into ``DIR/custom_nodes`` (ComfyUI's), its
        models and inputs listed (``--prefetch-models``: the models fetched too)."""
        try:
            await asyncio.to_thread(self.storage.prepare)
        except StorageError as exc:
            raise ConfigError(f"cannot use the bucket {self.storage.location}: {exc}") from exc

    async def fetch(self, raw: bytes) -> Fetched:
        """The inputs and models ``POST /prompt`` with body ``raw`` refers to, fetched from the bucket when
        not on local disk (to ``hold``). A body that is not a prompt: nothing (ComfyUI answers it)."""
        try:
            body = parse_json(raw) if raw.strip() else None
        except BadJSON:
            return Fetched()
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(prompt, dict):
            return Fetched()
        return await asyncio.to_thread(self._fetch, prompt)

    def _fetch(self, prompt: dict[str, Any]) -> Fetched:
        return Fetched(self.storage.fetch_inputs(prompt), self.storage.fetch_models(prompt))

    async def hold(self, response: web.StreamResponse, fetched: Fetched) -> None:
        """ComfyUI answered ``POST /prompt``: the looked-up inputs and the models stay until the prompt it
        accepted left its queue (they go at once if it refused it)."""
        if not fetched.inputs and not fetched.models:
            return
        prompt_id = accepted_prompt_id(response)
        if prompt_id is None:
            await self._release(fetched)
            return
        self.held[prompt_id] = fetched
        self._wake.set()

    async def _release(self, fetched: Fetched) -> None:
        """Drop the input copies that no held prompt needs (a prompt may share another's); the models
        may be evicted again."""
        needed = {rel for others in self.held.values() for rel in others.inputs}
        unneeded = [rel for rel in fetched.inputs if rel not in needed]
        if unneeded:
            await asyncio.to_thread(self.storage.drop_inputs, unneeded)
        if fetched.models:
            self.storage.release_models(fetched.models)

    async def watch(self) -> None:
        """While inputs are held: drop those of the prompts that left ComfyUI's queue."""
        await watch_comfyui(self.backend, self._wake, name="inputs", busy=lambda: bool(self.held), look=self._look,
                            interval_s=lambda: POLL_S)

    async def _look(self) -> None:
        base_url = self.backend.base_url
        if base_url is None:
            return
        assert self.session is not None
        ids = list(self.held)  # before asking: a prompt accepted later is not judged on this answer
        async with self.session.get(base_url + "/queue",
                                    timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as resp:
            resp.raise_for_status()
            queue = await resp.json(content_type=None)
        if not isinstance(queue, dict):
            raise ValueError(f"/queue answered {type(queue).__name__}, not an object")
        queued = {item[1] for key in ("queue_running", "queue_pending") for item in queue.get(key) or []
                  if isinstance(item, list) and len(item) > 1}
        for prompt_id in ids:
            if prompt_id not in queued:
                await self._release(self.held.pop(prompt_id))


def object_info_node(method: str, path: str) -> str | None:
    """``GET /object_info`` (``""``) or ``/object_info/<node>`` (``<node>``), with or without ``/api``; else None."""
    if method != "GET":
        return None
    path = path.removeprefix("/api")
    if path == "/object_info":
        return ""
    node = path.removeprefix("/object_info/")
    return node if node != path and node and "/" not in node else None


def with_bucket_images(info: Any, names: list[str]) -> Any:
    """ComfyUI's ``/object_info`` with the bucket's input images in every image-upload list (``LoadImage``'s),
    as the embedded engine lists them: a browser user picks one, and ``POST /prompt`` fetches it. Changed in
    place; both forms of a list (``[names, {"image_upload": true}]``, ``["COMBO", {"options": names, ...}]``)."""
    if not names or not isinstance(info, dict):
        return info
    for node in info.values():
        inputs = node.get("input") if isinstance(node, dict) else None
        for group in (inputs.get(key) for key in ("required", "optional")) if isinstance(inputs, dict) else ():
            for spec in group.values() if isinstance(group, dict) else ():
                if not (isinstance(spec, list) and len(spec) > 1 and isinstance(spec[1], dict)
                        and spec[1].get("image_upload")):
                    continue
                if isinstance(spec[0], list):
                    spec[0] = sorted(set(spec[0]).union(names))
                elif isinstance(spec[1].get("options"), list):
                    spec[1]["options"] = sorted(set(spec[1]["options"]).union(names))
    return info


def accepted_prompt_id(response: web.StreamResponse) -> str | None:
    """The ``prompt_id`` of ComfyUI's 200 answer to ``POST /prompt`` (read whole: it is small)."""
    if response.status != 200 or not isinstance(response, web.Response) or not isinstance(response.body, bytes):
        return None
    try:
        answer = parse_json(response.body)
    except BadJSON:
        return None
    prompt_id = answer.get("prompt_id") if isinstance(answer, dict) else None
    return prompt_id if isinstance(prompt_id, str) else None


async def forward_prompt(request: web.Request, forward: Callable[[bytes], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
    """``POST /prompt`` on an oss:// data dir: its inputs fetched, then ``forward(body)`` to ComfyUI."""
    inputs = request.app[PROMPT_INPUTS]
    raw = await request.read()
    fetched = await inputs.fetch(raw)
    try:
        response = await forward(raw)
    except BaseException:
        await inputs.hold(web.Response(status=502), fetched)  # not accepted: the copies go now
        raise
    await inputs.hold(response, fetched)
    return response


def inputs_context(session_key: web.AppKey[aiohttp.ClientSession]
                   ) -> Callable[[web.Application], AsyncIterator[None]]:
    """The cleanup context that runs the watcher (after the backend context made the session)."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        inputs = app[PROMPT_INPUTS]
        inputs.session = app[session_key]
        task = asyncio.create_task(inputs.watch(), name="comfyserve-backend-inputs")
        yield
        await cancel_and_wait(task)
        if OUTPUTS in app:
            await app[OUTPUTS].stop()  # uploads under way finish: the files would go with the machine
        inputs.storage.close()

    return context


PROMPT_INPUTS: web.AppKey[PromptInputs] = web.AppKey("backend_prompt_inputs", PromptInputs)
