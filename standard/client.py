"""``InstanceClient``: the async client for any ComfyUI-protocol instance.

Used by the tests, the API edition's workers and the cluster edition's pool.
HTTP goes through one ``httpx.AsyncClient``; events come over ``/ws`` with
``websockets``. Connection problems are retried where that is safe (GETs,
the event socket) and surface as ``InstanceUnavailable``; a 400 from
``/prompt`` is ``PromptRejected`` carrying ComfyUI's ``error`` +
``node_errors`` body.

``run(graph)`` opens the event socket *before* it submits (so no event is
missed), follows the prompt to its end, and reads the outputs from
``/history``. When the socket breaks it reconnects with backoff and, while it
is down, polls ``/history`` instead: a prompt that finished meanwhile is still
reported, its ``executed`` events rebuilt from the history outputs.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import struct
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from .client_types import (
    DEFAULT_TIMEOUTS,
    TERMINAL_EVENTS,
    BinaryFrame,
    ClientTimeouts,
    Connected,
    Disconnected,
    RunResult,
    WsItem,
    in_last_step,
    queued_id,
    status_from_history,
)
from .errors import InstanceError, InstanceUnavailable, PromptLost, PromptRejected
from .retry import INSTANCE as RETRY_INSTANCE
from .tasks import cancel_and_wait

__all__ = [
    "BinaryFrame", "ClientTimeouts", "Connected", "Disconnected", "InstanceClient", "RunResult", "in_last_step",
    "InstanceError", "InstanceUnavailable", "PromptLost", "PromptRejected",
]

log = logging.getLogger("comfyserve.client")

class _ServerError(InstanceUnavailable):
    """A 5xx answer: retried, and after the last try its response goes back to the caller."""

    def __init__(self, message: str, response: httpx.Response) -> None:
        super().__init__(message)
        self.response = response


class _State(enum.Enum):
    OPEN = 1
    CLOSED = 2


class InstanceClient:
    """Async client for one instance; ``async with InstanceClient(url, token) as c: ...``.

    ``token`` is sent as ``Authorization: <token>`` (the cloud platform's raw
    form). A closed client cannot be reopened; closing twice is safe.
    """

    def __init__(self, base_url: str, token: str | None = None, *,
                 timeouts: ClientTimeouts = DEFAULT_TIMEOUTS,
                 headers: dict[str, str] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeouts = timeouts
        self._headers = dict(headers or {})
        if token is not None:
            self._headers["Authorization"] = token
        self._http = httpx.AsyncClient(
            base_url=self.base_url + "/",
            headers=self._headers,
            timeout=httpx.Timeout(timeouts.request_s, connect=timeouts.connect_s),
            trust_env=False,
        )
        self._state = _State.OPEN
        self._retry = RETRY_INSTANCE.but(initial_s=timeouts.reconnect_min_s, max_s=timeouts.reconnect_max_s,
                                         retry_on=(InstanceUnavailable,))

    async def __aenter__(self) -> InstanceClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        await self._http.aclose()

    # -- HTTP ----------------------------------------------------------------

    async def _request(self, method: str, path: str, *, retries: int = 0, **kwargs: Any) -> httpx.Response:
        """One request; ``retries`` more tries on a timeout, a dropped connection or a 5xx (GETs only).

        After the last try a 5xx response is returned (the caller reports it); no answer at all
        raises ``InstanceUnavailable``.
        """
        if self._state is _State.CLOSED:
            raise InstanceError("the client is closed")

        async def once() -> httpx.Response:
            try:
                response = await self._http.request(method, path.lstrip("/"), **kwargs)
            except httpx.TimeoutException as exc:
                raise InstanceUnavailable(f"{method} {path}: timed out ({exc!r})") from exc
            except httpx.TransportError as exc:
                raise InstanceUnavailable(f"{method} {path}: {exc!r}") from exc
            if response.status_code >= 500:
                raise _ServerError(f"{method} {path}: HTTP {response.status_code}", response)
            return response

        try:
            return await self._retry.but(attempts=retries + 1).call(once, what=f"{method} {path}", log=log)
        except _ServerError as exc:
            return exc.response

    async def get_json(self, path: str, **params: Any) -> Any:
        """GET any JSON route (``/models/checkpoints``, ``/embeddings``, ...), retried like the others."""
        query = {k: v for k, v in params.items() if v is not None}
        response = await self._request("GET", path, retries=self.timeouts.get_retries, params=query)
        return _json_or_raise(response, f"GET {path}")

    async def submit(self, graph: dict[str, Any], client_id: str | None = None,
                     extra_data: dict[str, Any] | None = None, front: bool = False,
                     prompt_id: str | None = None, number: float | None = None,
                     partial_execution_targets: list[str] | None = None) -> str:
        """Queue ``graph`` (API format); returns its prompt_id. 400 -> ``PromptRejected``.

        ``partial_execution_targets``: run only these output nodes (and what they need)."""
        body: dict[str, Any] = {"prompt": graph}
        if partial_execution_targets is not None:
            body["partial_execution_targets"] = partial_execution_targets
        if client_id is not None:
            body["client_id"] = client_id
        if extra_data is not None:
            body["extra_data"] = extra_data
        if front:
            body["front"] = True
        if prompt_id is not None:
            body["prompt_id"] = prompt_id
        if number is not None:
            body["number"] = number
        response = await self._request("POST", "/prompt", json=body)
        if response.status_code == 400:
            data = _json_body(response)
            error = data.get("error") if isinstance(data, dict) else None
            message = error.get("message") if isinstance(error, dict) else None
            raise PromptRejected(message or str(error or "prompt rejected"), data if isinstance(data, dict) else {})
        data = _json_or_raise(response, "POST /prompt")
        if not isinstance(data, dict) or "prompt_id" not in data:
            raise InstanceError(f"POST /prompt: unexpected reply {data!r:.200}")
        return str(data["prompt_id"])

    async def history(self, prompt_id: str | None = None, *, max_items: int | None = None) -> dict[str, Any]:
        """``/history`` or ``/history/{id}`` as ComfyUI answers: ``{id: entry}``, ``{}`` when unknown."""
        if prompt_id is None:
            return await self.get_json("/history", max_items=max_items)
        return await self.get_json(f"/history/{_quote(prompt_id)}")

    async def history_entry(self, prompt_id: str) -> dict[str, Any] | None:
        """The history entry of one prompt, or None while it has not finished."""
        return (await self.history(prompt_id)).get(prompt_id)

    async def queue(self) -> dict[str, Any]:
        return await self.get_json("/queue")

    async def delete_queued(self, prompt_ids: list[str]) -> None:
        await self._post_ok("/queue", {"delete": prompt_ids})

    async def interrupt(self, prompt_id: str | None = None) -> None:
        await self._post_ok("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    async def object_info(self, node_class: str | None = None) -> dict[str, Any]:
        if node_class is None:
            return await self.get_json("/object_info")
        return await self.get_json(f"/object_info/{_quote(node_class)}")

    async def system_stats(self) -> dict[str, Any]:
        return await self.get_json("/system_stats")

    async def get_file(self, path: str) -> tuple[bytes, str] | None:
        """A static file of the instance (``/templates/...``): its bytes and content type; None if absent."""
        response = await self._request("GET", path, retries=self.timeouts.get_retries)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise InstanceError(f"GET {path}: HTTP {response.status_code}")
        return response.content, response.headers.get("Content-Type", "application/octet-stream")

    async def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        """The bytes of an output/input/temp file (``/view``)."""
        response = await self._request(
            "GET", "/view", retries=self.timeouts.get_retries,
            params={"filename": filename, "subfolder": subfolder, "type": type},
        )
        if response.status_code != 200:
            raise InstanceError(f"GET /view {filename!r}: HTTP {response.status_code}")
        return response.content

    async def upload_image(self, data: bytes, filename: str, *, subfolder: str = "", type: str = "input",
                           overwrite: bool = False, content_type: str = "image/png",
                           mask_of: dict[str, str] | None = None) -> dict[str, Any]:
        """``/upload/image`` (or ``/upload/mask`` with ``mask_of`` = original_ref); returns name/subfolder/type."""
        form = {"subfolder": subfolder, "type": type}
        if overwrite:
            form["overwrite"] = "true"
        path = "/upload/image"
        if mask_of is not None:
            form["original_ref"] = json.dumps(mask_of)
            path = "/upload/mask"
        response = await self._request("POST", path, data=form,
                                       files={"image": (filename, data, content_type)})
        return _json_or_raise(response, f"POST {path}")

    async def health(self) -> bool:
        """The instance process answers (``/healthz``)."""
        try:
            response = await self._request("GET", "/healthz")
        except InstanceUnavailable:
            return False
        return response.status_code == 200

    async def ready(self) -> bool:
        """The instance can run prompts (``/readyz`` 200)."""
        try:
            response = await self._request("GET", "/readyz")
        except InstanceUnavailable:
            return False
        return response.status_code == 200

    async def restart(self, timeout_s: float = 180.0) -> dict[str, Any]:
        """``POST /restart``: the instance reloads its plugins (or restarts its ComfyUI child, which is
        slow: hence its own ``timeout_s``); its JSON answer."""
        timeout = httpx.Timeout(timeout_s, connect=self.timeouts.connect_s)
        response = await self._request("POST", "/restart", json={}, timeout=timeout)
        return _json_or_raise(response, "POST /restart")

    async def _post_ok(self, path: str, body: dict[str, Any]) -> None:
        response = await self._request("POST", path, json=body)
        if response.status_code != 200:
            raise InstanceError(f"POST {path}: HTTP {response.status_code}: {response.text[:200]}")

    # -- events --------------------------------------------------------------

    def _ws_url(self, client_id: str) -> str:
        base = self.base_url
        if base.startswith("https://"):
            base = "wss://" + base[len("https://"):]
        elif base.startswith("http://"):
            base = "ws://" + base[len("http://"):]
        return f"{base}/ws?clientId={_quote(client_id)}"

    async def _open_ws(self, client_id: str) -> ClientConnection:
        try:
            return await connect(
                self._ws_url(client_id), additional_headers=self._headers or None, proxy=None,
                open_timeout=self.timeouts.ws_open_s, max_size=None, compression=None,
                ping_interval=20, ping_timeout=20,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise InstanceError(f"/ws refused: HTTP {status}") from exc
            raise InstanceUnavailable(f"/ws: HTTP {status}") from exc
        except (TimeoutError, OSError, WebSocketException) as exc:
            raise InstanceUnavailable(f"/ws: {exc!r}") from exc

    async def events(self, client_id: str | None = None, *, reconnect: bool = True,
                     markers: bool = False) -> AsyncIterator[WsItem]:
        """Events of ``/ws?clientId=``: JSON frames as dicts, binary frames as ``BinaryFrame``.

        A broken socket is reopened with the same client id (backoff up to
        ``reconnect_max_s``; ``InstanceUnavailable`` once it has been down for
        ``disconnected_s``). With ``markers`` the iterator also yields
        ``Connected`` / ``Disconnected`` so a caller knows what it may have missed.
        """
        client_id = client_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        attempt = 0
        down_since: float | None = None
        failures = 0
        while True:
            try:
                ws = await self._open_ws(client_id)
            except InstanceUnavailable as exc:
                if not reconnect:
                    raise
                now = loop.time()
                if down_since is None:
                    down_since = now
                    if markers and attempt == 0:
                        yield Disconnected(f"cannot connect: {exc}")
                limit = self.timeouts.disconnected_s
                if limit is not None and now - down_since >= limit:
                    raise
                failures += 1
                await self._retry.wait(failures)
                continue
            down_since, failures = None, 0
            if markers:
                yield Connected(attempt)
            attempt += 1
            reason = "closed"
            try:
                async for message in ws:
                    if isinstance(message, bytes):
                        if len(message) >= 4:
                            yield BinaryFrame(struct.unpack(">I", message[:4])[0], message[4:])
                        continue
                    try:
                        event = json.loads(message)
                    except json.JSONDecodeError:
                        log.warning("ignoring a non-JSON text frame from %s", self.base_url)
                        continue
                    if isinstance(event, dict):
                        yield event
            except ConnectionClosed as exc:
                reason = f"connection closed ({exc.rcvd.code if exc.rcvd else 'no close frame'})"
            except (OSError, WebSocketException) as exc:
                reason = repr(exc)
            finally:
                with contextlib.suppress(Exception):
                    await ws.close()
            if not reconnect:
                return
            log.info("event socket to %s lost (%s); reconnecting", self.base_url, reason)
            down_since = loop.time()
            if markers:
                yield Disconnected(reason)

    # -- run -----------------------------------------------------------------

    async def run(self, graph: dict[str, Any], *, client_id: str | None = None,
                  extra_data: dict[str, Any] | None = None, front: bool = False,
                  prompt_id: str | None = None, timeout_s: float | None = None,
                  on_accepted: Callable[[str], None] | None = None) -> RunResult:
        """Submit ``graph`` and follow it to its end; ``InstanceError`` on timeout.

        Returns even when the prompt failed or was interrupted (see ``status``);
        raises ``PromptRejected`` when validation refuses it. ``on_accepted(prompt_id)`` is called once
        the instance has queued the prompt (a caller counting runs counts only those that reached it).
        """
        timeout_s = timeout_s if timeout_s is not None else self.timeouts.run_s
        client_id = client_id or uuid.uuid4().hex
        items: asyncio.Queue[WsItem | BaseException] = asyncio.Queue()
        pump = asyncio.create_task(self._pump(client_id, items), name="comfyserve-client-events")
        try:
            async with asyncio.timeout(timeout_s):
                return await self._follow(graph, client_id, extra_data, front, prompt_id, items, on_accepted)
        except TimeoutError:
            raise InstanceError(f"prompt did not finish within {timeout_s}s") from None
        finally:
            with contextlib.suppress(Exception):
                await cancel_and_wait(pump)

    async def _pump(self, client_id: str, items: asyncio.Queue[WsItem | BaseException]) -> None:
        try:
            async for item in self.events(client_id, markers=True):
                items.put_nowait(item)
        except Exception as exc:  # handed to _follow, which falls back to polling
            items.put_nowait(exc)

    async def _follow(self, graph: dict[str, Any], client_id: str, extra_data: dict[str, Any] | None,
                      front: bool, prompt_id: str | None, items: asyncio.Queue[WsItem | BaseException],
                      on_accepted: Callable[[str], None] | None = None) -> RunResult:
        socket_up = await self._wait_connected(items)
        prompt_id = await self.submit(graph, client_id=client_id, extra_data=extra_data,
                                      front=front, prompt_id=prompt_id)
        if on_accepted is not None:
            on_accepted(prompt_id)
        events: list[dict[str, Any]] = []
        executed: list[dict[str, Any]] = []
        status: str | None = None
        error: dict[str, Any] | None = None
        reconnects = 0
        loop = asyncio.get_running_loop()
        # /history is checked now and then even while events flow (a missed end must not hang us),
        # and often while the socket is down.
        next_check = loop.time() + (self.timeouts.idle_check_s if socket_up else self.timeouts.history_poll_s)
        while status is None:
            try:
                async with asyncio.timeout_at(next_check):  # not wait_for: on 3.11 it can swallow a cancel
                    item = await items.get()
            except TimeoutError:
                item = None
            if item is None or isinstance(item, Connected):
                if isinstance(item, Connected):
                    socket_up, reconnects = True, reconnects + 1
                entry = await self._check_progress(prompt_id)
                if entry is not None:
                    status, error = status_from_history(entry)
                next_check = loop.time() + (self.timeouts.idle_check_s if socket_up else self.timeouts.history_poll_s)
                continue
            if isinstance(item, (Disconnected, BaseException)):
                socket_up = False
                next_check = min(next_check, loop.time() + self.timeouts.history_poll_s)
                if isinstance(item, BaseException):  # the socket gave up for good: poll only
                    log.warning("event socket to %s gave up (%r); polling /history", self.base_url, item)
                continue
            if not isinstance(item, dict):
                continue
            data = item.get("data")
            if not isinstance(data, dict) or data.get("prompt_id") != prompt_id:
                continue
            events.append(item)
            kind = item.get("type")
            if kind == "executed":
                executed.append(item)
            elif kind in TERMINAL_EVENTS:
                status = {"execution_success": "success", "execution_error": "error"}.get(kind, "interrupted")
                error = data if kind == "execution_error" else None
            elif kind == "executing" and data.get("node") is None:
                status = "success"
        history = await self._wait_history(prompt_id)
        hist_status, hist_error = status_from_history(history)
        if hist_status != "success":
            status, error = hist_status, error or hist_error
        outputs = history.get("outputs") or {}
        seen = {e["data"].get("node") for e in executed}
        for node_id, output in outputs.items():
            if node_id not in seen:  # missed while the socket was down: rebuilt from history
                executed.append({"type": "executed", "data": {
                    "node": node_id, "display_node": node_id, "output": output, "prompt_id": prompt_id}})
        return RunResult(prompt_id, status or "success", executed, outputs, history, events, error, reconnects)

    async def _wait_connected(self, items: asyncio.Queue[WsItem | BaseException]) -> bool:
        """True once the socket is open (before submitting); False: follow by polling."""
        try:
            async with asyncio.timeout(self.timeouts.ws_open_s):
                while True:
                    item = await items.get()
                    if isinstance(item, Connected):
                        return True
                    if isinstance(item, Disconnected):
                        return False  # submit anyway; the pump keeps trying meanwhile
                    if isinstance(item, BaseException):
                        if isinstance(item, InstanceError) and not isinstance(item, InstanceUnavailable):
                            raise item
                        return False
        except TimeoutError:
            return False

    async def _history_or_none(self, prompt_id: str) -> dict[str, Any] | None:
        try:
            return await self.history_entry(prompt_id)
        except InstanceUnavailable:
            return None

    async def _check_progress(self, prompt_id: str) -> dict[str, Any] | None:
        """The history entry once finished; ``PromptLost`` if the instance forgot the prompt."""
        try:
            entry = await self.history_entry(prompt_id)
            if entry is not None:
                return entry
            queue = await self.queue()
            if any(queued_id(item) == prompt_id
                   for item in [*queue.get("queue_running", []), *queue.get("queue_pending", [])]):
                return None
            entry = await self.history_entry(prompt_id)  # it may have finished in between
        except InstanceUnavailable:
            return None
        if entry is None:
            raise PromptLost(f"prompt {prompt_id} is no longer known to {self.base_url} (restarted?)")
        return entry

    async def _wait_history(self, prompt_id: str) -> dict[str, Any]:
        """ComfyUI records history right after ``execution_success``: wait for it briefly."""
        while True:
            entry = await self._history_or_none(prompt_id)
            if entry is not None:
                return entry
            await asyncio.sleep(self.timeouts.history_poll_s / 5)


def _quote(value: str) -> str:
    return quote(value, safe="")


def _json_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _json_or_raise(response: httpx.Response, what: str) -> Any:
    if response.status_code >= 500:
        raise InstanceUnavailable(f"{what}: HTTP {response.status_code}: {response.text[:200]}")
    if response.status_code != 200:
        raise InstanceError(f"{what}: HTTP {response.status_code}: {response.text[:200]}")
    data = _json_body(response)
    if data is None and response.content.strip() not in (b"null",):
        raise InstanceError(f"{what}: reply is not JSON: {response.text[:200]}")
    return data
