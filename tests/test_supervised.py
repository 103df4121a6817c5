"""Local instances as ``standard.supervised`` runs them: restarted when killed, gone with their parent,
secrets only in their environment, never on the parent's port, never mistaken for whatever holds their port."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from aiohttp import web

import standard.ports
from cluster_proxy.app import LOCAL_INSTANCES, POOL, create_cluster_app
from cluster_proxy.pool import LocalInstances, Pool
from cluster_proxy.settings import ClusterSettings
from standard.client import InstanceClient
from standard.ports import free_port
from support.api import ApiFactory, read_results
from support.cluster import graph, make_users, write_sleep_plugin
from support.processes import children_of, environ, wait_for_port
from support.server import tiny_graph
from support.wait import until


def gone(pid: int) -> bool:
    """No such process, or only its zombie."""
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def kernel_picks(monkeypatch: pytest.MonkeyPatch, *ports: int) -> None:
    """``free_port`` gets ``ports`` from the kernel first, in this order (then real picks again).

    A port the kernel hands out is free only until someone binds it: this replays the
    picks that collide with a port promised to someone else, deterministically.
    """
    script = list(ports)

    class Probe:
        def __init__(self) -> None:
            self.real = socket.socket()
            self.port: int | None = None

        def __enter__(self) -> Probe:
            return self

        def __exit__(self, *exc: object) -> None:
            self.real.close()

        def bind(self, address: tuple[str, int]) -> None:
            if script:
                self.port = script.pop(0)
            else:
                self.real.bind(address)

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", self.port) if self.port is not None else self.real.getsockname()

    monkeypatch.setattr(standard.ports, "socket", SimpleNamespace(socket=Probe))


async def test_a_killed_api_instance_is_restarted_and_the_work_goes_on(api: ApiFactory, data_dir: Path) -> None:
    live = await api(instances=1, data_dir=data_dir)
    assert live.live.pool is not None
    [instance] = live.live.pool.instances
    async with live.sink() as sink:
        assert (await live.submit(tiny_graph("before"), task_id="before")).status_code == 200
        [frame] = await read_results(sink, 1, timeout_s=45)
        assert frame.tags["status"] == "success"
        pid, url = instance.process.pid, instance.url
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert await instance.process.wait_ready(45, after_starts=1)
        assert instance.process.crashes == 1 and instance.process.last_exit == -signal.SIGKILL
        assert instance.process.pid not in (None, pid) and instance.url == url  # same port, a new child
        assert (await live.submit(tiny_graph("after"), task_id="after")).status_code == 200
        [frame] = await read_results(sink, 1, timeout_s=45)
        assert frame.tags["task_id"] == "after" and frame.tags["status"] == "success"


async def test_api_instances_never_get_the_apis_port_nor_each_others(api: ApiFactory, data_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    own = free_port()
    first = free_port(avoid={own})
    second = free_port(avoid={own, first})
    # the API's own port, then it again for the first instance; then one port twice for the two instances
    kernel_picks(monkeypatch, own, own, first, first, second)
    live = await api(instances=2, data_dir=data_dir)
    assert live.port == own and live.live.pool is not None
    assert [i.port for i in live.live.pool.instances] == [first, second]
    for instance in live.live.pool.instances:
        assert await instance.process.wait_ready(45)
        async with httpx.AsyncClient(trust_env=False) as http:
            assert (await http.get(instance.url + "/healthz")).json()["instance"] == instance.instance_id


async def test_cluster_instances_never_get_the_proxys_port(aiohttp_server: Any, data_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The proxy's port is picked but not bound yet when its instances are spawned: they must not take it."""
    write_sleep_plugin(data_dir)
    proxy_port = free_port()
    first = free_port(avoid={proxy_port})
    second = free_port(avoid={proxy_port, first})
    kernel_picks(monkeypatch, proxy_port, first, first, second)
    tokens = await make_users(data_dir, ("alice",))
    app = await create_cluster_app(ClusterSettings(data_dir=data_dir, port=proxy_port, instances=2,
                                                   health_interval_s=0.2))
    local = app[LOCAL_INSTANCES]
    assert local is not None
    assert local.urls == [f"http://127.0.0.1:{first}", f"http://127.0.0.1:{second}"]
    server = await aiohttp_server(app, port=proxy_port)
    pool: Pool = app[POOL]
    await until(lambda: len(pool.up()) == 2, timeout_s=45)
    assert sorted(i.url for i in pool.up()) == sorted(local.urls)
    for child in local.children:  # each up instance is the child spawned for it
        async with httpx.AsyncClient(trust_env=False) as http:
            assert (await http.get(child.url + "/healthz")).json()["instance"] == child.instance_id
    async with InstanceClient(str(server.make_url("")).rstrip("/"), f"Bearer {tokens['alice']}") as user:
        assert (await user.run(graph("alice"), timeout_s=45)).ok


async def test_an_instance_is_never_up_while_another_process_holds_its_port(aiohttp_server: Any,
                                                                             data_dir: Path) -> None:
    local = LocalInstances(1, data_dir, "instance-token")
    [child] = local.children

    async def ok(request: web.Request) -> web.Response:  # a stranger that looks healthy
        return web.json_response({"status": "ok", "ready": True})

    squatter_app = web.Application()
    squatter_app.router.add_get("/readyz", ok)
    squatter_app.router.add_get("/healthz", ok)
    squatter = await aiohttp_server(squatter_app, port=child.port)
    pool = Pool(health_interval_s=0.2, lost_after_s=1.0, info_cache_s=1.0)
    try:
        await local.start(pool)
        await until(lambda: child.process.crashes >= 1, timeout_s=45)  # "address in use"
        await pool.check_all()
        assert pool.up() == [] and not child.answering()
        await squatter.close()
        assert await child.process.wait_ready(45)
        await pool.check_all()
        assert [i.url for i in pool.up()] == [child.url]
    finally:
        await local.aclose()
        await pool.aclose()


async def test_an_api_worker_never_sends_work_to_another_process_on_its_instances_port(
        api: ApiFactory, data_dir: Path, aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    own = free_port()
    taken = free_port(avoid={own})
    seen: list[str] = []

    async def anything(request: web.Request) -> web.Response:  # a stranger that looks healthy
        seen.append(request.path)
        return web.json_response({"status": "ok", "ready": True})

    squatter_app = web.Application()
    squatter_app.router.add_route("*", "/{tail:.*}", anything)
    squatter = await aiohttp_server(squatter_app, port=taken)
    kernel_picks(monkeypatch, own, taken)  # the instance's port is taken before its child can bind it
    live = await api(instances=1, data_dir=data_dir)
    assert live.live.pool is not None
    [instance] = live.live.pool.instances
    assert instance.port == taken
    async with live.sink() as sink:
        assert (await live.submit(tiny_graph("held"), task_id="held")).status_code == 200
        await until(lambda: instance.process.crashes >= 1, timeout_s=45)  # "address in use"
        await squatter.close()
        [frame] = await read_results(sink, 1, timeout_s=45)
    assert frame.tags["task_id"] == "held" and frame.tags["status"] == "success"
    assert not [path for path in seen if path.endswith("/prompt")], seen


def test_a_killed_api_takes_its_instances_along_and_they_hold_no_secret_on_their_command_line(
        tmp_path: Path, cli_env: dict[str, str]) -> None:
    token = "api-token-not-on-argv-42"
    port = free_port()
    with (tmp_path / "api.log").open("wb") as log:
        proc = subprocess.Popen(["comfyserve", "api", "--data-dir", str(tmp_path / "data"), "--port", str(port),
                                 "--instances", "2"], env={**cli_env, "COMFYSERVE_TOKEN": token}, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout_s=30, proc=proc)
        deadline = time.monotonic() + 30
        while len(children := [c for c in children_of(proc.pid) if b"standard.cli" in cmdline(c)]) < 2:
            assert time.monotonic() < deadline, "the instances never started"
            time.sleep(0.05)
        for child in children:
            assert token.encode() not in cmdline(child)
            assert environ(child)["COMFYSERVE_TOKEN"] == token
        proc.kill()  # no chance to clean up
        proc.wait()
        deadline = time.monotonic() + 20
        while not all(gone(child) for child in children):
            assert time.monotonic() < deadline, "instances outlived the killed API"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_a_stopped_supervisor_cuts_the_backoff_short(tmp_path: Path) -> None:
    """A child that keeps failing waits out a growing backoff; stop() does not wait it out."""
    from standard.retry import RESTART
    from standard.supervised import SupervisedProcess

    async def never() -> tuple[bool, str]:
        return False, "never ready"

    process = SupervisedProcess("failing", lambda: ["/bin/sh", "-c", "exit 3"], ready=never,
                                restart_policy=RESTART.but(initial_s=600.0, max_s=600.0))
    process.start()
    await until(lambda: process.crashes == 1)
    assert process.last_exit == 3
    async with asyncio.timeout(10):
        await process.stop()
    assert process.starts == 1
