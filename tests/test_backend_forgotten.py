"""What the front of ComfyUI takes for forgotten: only what a restart of ComfyUI may have lost.

ComfyUI's history is bounded: a prompt that finished and had its entry trimmed before the front's journal
looked is gone from both its queue and its history, as a prompt lost in a restart is. The first ran and is
never run again; the second is queued again (or reported failed if it was running). The journal tells them
apart by its WebSocket to ComfyUI, which a restart closes. The backend here is an embedded instance on a
loopback port (``support.backend``), whose ``QueueHold`` holds the journal's looks at its queue so that what
happens between two looks is the test's choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

from standard.datadir import init_data_dir
from standard.server import keys
from support.backend import TOKEN, Backend, start_backend, start_front
from support.metrics import scrape, value
from support.server import drain_gate_graph, install_gate_plugin, open_gate, prompt_uuid, runs_of
from support.wait import until

DIRECT = "X-Test-Direct"  # the test's own requests to the backend: never held
BURST = 40
HISTORY_MAX_ITEMS = 3


class QueueHold:
    """Counts the front's looks at the backend's queue (``GET /queue``); ``hold_next`` holds every look
    from the next one on until ``release``."""

    def __init__(self) -> None:
        self.looks = 0
        self.held = 0
        self._hold_from: int | None = None
        self._released = asyncio.Event()

    def hold_next(self) -> None:
        self._hold_from = self.looks + 1
        self._released.clear()

    def release(self) -> None:
        self._hold_from = None
        self._released.set()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "GET" and request.path == "/queue" and DIRECT not in request.headers:
            self.looks += 1
            if self._hold_from is not None and self.looks >= self._hold_from:
                self.held += 1
                await self._released.wait()
        return await handler(request)


def gated_root(tmp_path: Path) -> Path:
    root = init_data_dir(tmp_path / "backend").root
    install_gate_plugin(root)
    return root


async def queue_prompt(http: httpx.AsyncClient, prompt_id: str, gate: str) -> None:
    resp = await http.post("/prompt", json={"prompt": drain_gate_graph(gate, prompt_id), "prompt_id": prompt_id})
    assert resp.status_code == 200, resp.text


async def backend_idle(backend: Backend) -> bool:
    async with httpx.AsyncClient(trust_env=False) as http:
        queue = (await http.get(backend.url + "/queue", headers={DIRECT: "1"})).json()
    return not queue["queue_running"] and not queue["queue_pending"]


def followed(state_file: Path) -> dict[str, bool]:
    """The prompts the front's journal still follows, on disk: {prompt_id: seen running}."""
    with contextlib.closing(sqlite3.connect(f"file:{state_file}?mode=ro", uri=True)) as db:
        return {row[0]: bool(row[1]) for row in db.execute("SELECT prompt_id, running FROM prompts")}


async def journal(http: httpx.AsyncClient, name: str) -> float:
    """One of the front's ``comfyserve_backend_journal_*`` samples."""
    return value(await scrape(f"{http.base_url}metrics", TOKEN), f"comfyserve_backend_journal_{name}")


@contextlib.asynccontextmanager
async def front_client(port: int) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the front, once its journal's socket to ComfyUI is open (prompts are anchored from then)."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/", headers={"Authorization": TOKEN},
                                 trust_env=False, timeout=30) as http:
        await until(lambda: _equals(journal(http, "socket_up"), 1), what="the journal's socket to ComfyUI open")
        yield http


async def test_prompts_whose_entries_comfyui_trimmed_are_not_run_again(tmp_path: Path) -> None:
    hold = QueueHold()
    backend = await start_backend(gated_root(tmp_path), history_max_items=HISTORY_MAX_ITEMS,
                                  middlewares=[hold.middleware])
    state_file = tmp_path / "front.sqlite3"
    front = await start_front(backend.url, init_data_dir(tmp_path / "front").root, token=TOKEN,
                              state_file=state_file)
    ids = [prompt_uuid(f"burst-{index}") for index in range(BURST)]
    gates = [f"g{index}" for index in range(BURST)]
    try:
        async with front_client(front.port) as http:
            hold.hold_next()  # the whole burst finishes between two looks of the journal
            for prompt_id, gate in zip(ids, gates, strict=True):
                await queue_prompt(http, prompt_id, gate)
            for gate in gates:
                open_gate(backend.data_dir, gate)
            await until(lambda: backend_idle(backend), what="the backend ran the burst")
            hold.release()
            await until(lambda: not followed(state_file) or any(runs_of(backend.data_dir, g) > 1 for g in gates),
                        what="the front done with the burst")
            assert [runs_of(backend.data_dir, gate) for gate in gates] == [1] * BURST
            assert [s.raw_path for s in backend.seen if s.method == "POST"] == ["/prompt"] * BURST
            # ComfyUI kept the last three entries; the front stored what it found, let the rest go
            assert set((await http.get("/history")).json()) == set(ids[-HISTORY_MAX_ITEMS:])
            assert await journal(http, "trimmed_total") == BURST - HISTORY_MAX_ITEMS
            assert await journal(http, "requeued_total") == 0
            assert await journal(http, "epochs_total") == 0
    finally:
        await front.close()
        await backend.server.close()


async def test_a_backend_url_restarted_between_two_looks_gets_its_forgotten_prompts_again(tmp_path: Path) -> None:
    hold = QueueHold()
    root = gated_root(tmp_path)
    backend = await start_backend(root, middlewares=[hold.middleware])
    state_file = tmp_path / "front.sqlite3"
    front = await start_front(backend.url, init_data_dir(tmp_path / "front").root, token=TOKEN,
                              state_file=state_file)
    cut, pending = prompt_uuid("cut"), prompt_uuid("pending")
    try:
        async with front_client(front.port) as http:
            await queue_prompt(http, cut, "ga")
            await queue_prompt(http, pending, "gb")
            await until(lambda: followed(state_file) == {cut: True, pending: False}, what="the journal saw it run")
            hold.hold_next()
            await until(lambda: hold.held == 1, what="a look held")
            port = backend.server.port
            stopping = asyncio.create_task(backend.server.close())  # it closes its sockets, then waits for the look
            await until(lambda: _equals(journal(http, "epochs_total"), 1), what="the journal lost sight of it")
            hold.release()  # the held look is answered by the stopping backend, which still has both
            await stopping
            backend = await start_backend(root, port=port, middlewares=[hold.middleware])
            open_gate(root, "gb")
            await until(lambda: not followed(state_file), what="the front done with both prompts")
            entries = (await http.get("/history")).json()
            assert entries[pending]["status"]["status_str"] == "success"
            assert entries[cut]["status"]["messages"][-1][1]["exception_type"] == "ServerRestarted"
            assert (runs_of(root, "ga"), runs_of(root, "gb")) == (1, 1)
            assert await journal(http, "requeued_total") == 1
            assert await journal(http, "trimmed_total") == 0
    finally:
        await front.close()
        await backend.server.close()


async def test_the_journals_socket_asks_the_backend_for_no_broadcasts(tmp_path: Path) -> None:
    """It only watches the socket stay open: the instance sends it none of its ``status`` messages."""
    backend = await start_backend(init_data_dir(tmp_path / "backend").root)
    front = await start_front(backend.url, init_data_dir(tmp_path / "front").root, token=TOKEN,
                              state_file=tmp_path / "front.sqlite3")
    try:
        async with front_client(front.port):
            server = backend.app[keys.PROMPT_SERVER]
            assert len(server.sockets) == 1
            assert set(server.sockets) == server.quiet_sids
            assert [s.raw_path for s in backend.seen if s.raw_path.startswith("/ws")] == ["/ws?quiet=1"]
    finally:
        await front.close()
        await backend.server.close()


async def _equals(value: Any, expected: Any) -> bool:
    return await value == expected
