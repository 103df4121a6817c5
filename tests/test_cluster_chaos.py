"""Chaos on the cluster edition: two ``comfyserve cluster`` processes on one Redis, one killed (SIGKILL)
at a chosen point of a task's end. Real processes and signals; the instance runs in the test, so a gate
in front of its API can hold the doomed proxy exactly where the test wants it."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from cluster_proxy.store import ATTEMPT_NAMESPACE
from cluster_proxy.store_redis import PREFIX
from standard.client import InstanceClient
from standard.datadir import init_data_dir
from standard.ports import free_port
from standard.server.app import create_embedded_app
from standard.settings import StandardSettings
from support.cluster import make_users
from support.processes import VENV_BIN, wait_for_port
from support.server import drain_gate_graph, install_gate_plugin, prompt_uuid, runs_of
from support.wait import until

INSTANCE_TOKEN = "chaos-instance-token-0123456789"


class HistoryGate:
    """Holds the first ``GET /history/<id>`` of a task the instance has finished and its proxy has freed.

    That request is the proxy fetching the history to record the finish: it comes after the proxy
    released the instance at the end-of-prompt marker, before the store knows the task is done.
    Earlier polls (the lease still held) pass, so where the proxy stands when it is held is certain.
    """

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.instance_url = ""
        self.armed = False
        self.holding = asyncio.Event()

    async def _freed_by_its_proxy(self, key: str) -> bool:
        client = aioredis.Redis.from_url(self.redis_url)
        try:
            holder = await client.get(f"{PREFIX}lease:{self.instance_url}")
        finally:
            await client.aclose()
        if holder is None:
            return True
        # The instance's prompt_id of a task's attempt is derived from the task id the lease names.
        return all(str(uuid.uuid5(ATTEMPT_NAMESPACE, f"{holder.decode()}-{n}")) != key for n in range(8))

    @web.middleware
    async def middleware(self, request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
        key = request.match_info.get("prompt_id", "")
        if self.armed and request.path.startswith("/history/") and key:
            response = await handler(request)
            if b'"status"' in response.body and await self._freed_by_its_proxy(key):
                self.armed = False
                self.holding.set()
                await asyncio.Event().wait()  # until the proxy dies and the connection goes
            return response
        return await handler(request)


class Proxies:
    """``comfyserve cluster`` processes on one Redis and data dir, each on its own port; none outlive the test."""

    def __init__(self, data_dir: Path, redis_url: str, instance_url: str, env: dict[str, str], logs: Path) -> None:
        self.data_dir, self.redis_url, self.instance_url, self.env, self.logs = (
            data_dir, redis_url, instance_url, env, logs)
        self.procs: dict[str, tuple[subprocess.Popen, str]] = {}

    async def start(self, name: str) -> str:
        port = free_port()
        with (self.logs / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen([str(VENV_BIN / "comfyserve"), "cluster", "--data-dir", str(self.data_dir),
                                     "--port", str(port), "--instance-url", self.instance_url,
                                     "--redis-url", self.redis_url],
                                    env={**self.env, "COMFYSERVE_INSTANCE_TOKEN": INSTANCE_TOKEN},
                                    stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        self.procs[name] = (proc, url)
        await asyncio.to_thread(wait_for_port, port, 30, proc)
        return url

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@dataclass
class Chaos:
    data_dir: Path
    gate: HistoryGate
    proxies: Proxies
    token: str


@pytest.fixture
async def chaos(aiohttp_server: Any, redis_url: str, tmp_path: Path, cli_env: dict[str, str]) -> AsyncIterator[Chaos]:
    """One instance (in the test, behind a ``HistoryGate``), the user ann, no proxy yet."""
    data_dir = init_data_dir(tmp_path / "data").root
    install_gate_plugin(data_dir)
    gate = HistoryGate(redis_url)
    app = create_embedded_app(StandardSettings(data_dir=data_dir, token=INSTANCE_TOKEN))
    app.middlewares.append(gate.middleware)
    instance = await aiohttp_server(app)
    gate.instance_url = str(instance.make_url("")).rstrip("/")
    token = (await make_users(data_dir, ("ann",), redis_url=redis_url))["ann"]
    logs = tmp_path / "logs"
    logs.mkdir()
    proxies = Proxies(data_dir, redis_url, gate.instance_url, cli_env, logs)
    try:
        yield Chaos(data_dir, gate, proxies, token)
    finally:
        proxies.stop_all()


def user_outputs(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / "users" / "ann" / "output").glob("*.png"))


async def test_a_proxy_killed_between_the_end_of_prompt_and_the_finish_record_runs_nothing_twice(
        chaos: Chaos) -> None:
    data_dir, gate, proxies, token = chaos.data_dir, chaos.gate, chaos.proxies, chaos.token
    doomed_url = await proxies.start("doomed")  # alone: it is the one that takes the first task
    async with InstanceClient(doomed_url, token) as ann:
        await ann.submit(drain_gate_graph("g1", "first"), prompt_id=prompt_uuid("first"))
    await until(lambda: runs_of(data_dir, "g1") == 1, what="the first task running")
    survivor_url = await proxies.start("survivor")
    gate.armed = True
    (data_dir / "input" / "g1").write_text("open")
    await until(gate.holding.wait, what="the doomed proxy fetching the history of a task it freed")
    doomed = proxies.procs["doomed"][0]
    doomed.kill()
    await asyncio.to_thread(doomed.wait, 10)

    async with InstanceClient(survivor_url, token) as ann:
        # The freed instance takes the next task at once (held by its gate until the test opens it), so
        # the survivor cannot just follow the orphan to its end on an idle instance.
        await ann.submit(drain_gate_graph("g2", "second"), prompt_id=prompt_uuid("second"))
        await until(lambda: runs_of(data_dir, "g2") == 1, what="the second task running")

        async def first_settled() -> bool:  # finished from the instance's history, or (wrongly) queued again
            queue = await ann.queue()
            pending = [item[1] for item in queue.get("queue_pending", [])]
            return prompt_uuid("first") in pending or await ann.history_entry(prompt_uuid("first")) is not None

        await until(first_settled, timeout_s=40, what="the survivor taking over the first task")
        (data_dir / "input" / "g2").write_text("open")

        async def both_done() -> bool:
            return all([await ann.history_entry(prompt_uuid(name)) for name in ("first", "second")])

        await until(both_done, timeout_s=40, what="both tasks in the history")
        first = await ann.history_entry(prompt_uuid("first"))
        second = await ann.history_entry(prompt_uuid("second"))
    assert runs_of(data_dir, "g1") == 1, proxies.log("survivor")  # not run again
    assert runs_of(data_dir, "g2") == 1
    assert first["status"]["status_str"] == "success" and second["status"]["status_str"] == "success"
    shown = [image for node in first["outputs"].values() for image in node.get("images", [])]
    assert [image["filename"] for image in shown] == ["first_00001_.png"]
    assert user_outputs(data_dir) == ["first_00001_.png", "second_00001_.png"]
    assert "not run again" in proxies.log("survivor")


async def test_a_proxy_killed_while_its_task_runs_leaves_it_to_the_survivor(chaos: Chaos) -> None:
    """Still running when its proxy dies: the survivor follows it on the instance to its end, once."""
    data_dir, proxies, token = chaos.data_dir, chaos.proxies, chaos.token
    doomed_url = await proxies.start("doomed")
    async with InstanceClient(doomed_url, token) as ann:
        await ann.submit(drain_gate_graph("g1", "first"), prompt_id=prompt_uuid("first"))
    await until(lambda: runs_of(data_dir, "g1") == 1, what="the task running")
    survivor_url = await proxies.start("survivor")
    doomed = proxies.procs["doomed"][0]
    doomed.kill()
    await asyncio.to_thread(doomed.wait, 10)
    (data_dir / "input" / "g1").write_text("open")
    async with InstanceClient(survivor_url, token) as ann:
        await until(lambda: ann.history_entry(prompt_uuid("first")), timeout_s=40, what="the task in the history")
        first = await ann.history_entry(prompt_uuid("first"))
    assert first["status"]["status_str"] == "success"
    messages = first["status"]["messages"]
    assert all(m[1].get("prompt_id") in (None, prompt_uuid("first")) for m in messages)  # the user's id
    assert runs_of(data_dir, "g1") == 1, proxies.log("survivor")
    assert user_outputs(data_dir) == ["first_00001_.png"]
