"""Fixtures and helpers shared by the test_cluster_* modules (no tests here).

``cluster = await start_cluster(instances=2, users=("alice", "bob"))`` starts
real embedded-engine instance apps and the cluster proxy on loopback ports,
with accounts made through the real ``Accounts``; ``cluster.user("alice")``
is an ``InstanceClient`` that talks to the proxy with alice's API token.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image

from cluster_proxy.accounts import Accounts
from cluster_proxy.app import create_cluster_app
from cluster_proxy.keys import CORE, POOL
from cluster_proxy.settings import ClusterSettings
from standard.client import InstanceClient
from standard.datadir import DataDir
from standard.ports import free_port
from standard.server.app import create_embedded_app
from standard.settings import StandardSettings
from support.processes import TESTS_DIR, start_listening
from support.server import gate_inputs
from support.wait import until

INSTANCE_TOKEN = "instance-secret-token"
PASSWORD = "correct horse"

SLEEP_NODE = TESTS_DIR / "custom_nodes" / "sleep_node.py"  # TestSleep, the one sleep node (bench/cluster.py copies it)


def write_sleep_plugin(data_dir: Path) -> None:
    (data_dir / "custom_nodes").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SLEEP_NODE, data_dir / "custom_nodes" / "cluster_sleep_node.py")


def graph(prefix: str = "out", color: int = 0, seconds: float = 0.0, size: int = 8, *,
          gate: str | None = None, interruptible: bool = False) -> dict[str, Any]:
    """EmptyImage -> (TestSleep, or TestGate) -> SaveImage; ``color`` makes it unique (no cache hits).

    ``gate``: node "2" holds the task until the test opens it (``support.server.open_gate``; the data dir needs
    ``install_gate_plugin``): a task that runs until the test has seen what it needs, however slow the machine.
    """
    nodes: dict[str, Any] = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 1, "color": color}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }
    if gate is not None:
        nodes["2"] = {"class_type": "TestGate", "inputs": gate_inputs(gate, ["1", 0], interruptible=interruptible)}
    elif seconds:
        nodes["2"] = {"class_type": "TestSleep", "inputs": {"image": ["1", 0], "seconds": seconds}}
    if "2" in nodes:
        nodes["3"]["inputs"]["images"] = ["2", 0]
    return nodes


def png_bytes(size: tuple[int, int] = (8, 6), color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


async def make_users(data_dir: Path, names: tuple[str, ...], admin: str | None = None,
                     redis_url: str | None = None) -> dict[str, str]:
    accounts = await Accounts.open(DataDir(data_dir), redis_url)
    try:
        return {name: await accounts.add(name, PASSWORD, admin=name == admin) for name in names}
    finally:
        await accounts.aclose()


@dataclass
class Cluster:
    data_dir: Path
    server: TestServer
    tokens: dict[str, str]
    instances: list[TestServer]
    clients: list[InstanceClient] = field(default_factory=list)
    sessions: list[aiohttp.ClientSession] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def app(self) -> web.Application:
        return self.server.app

    @property
    def core(self) -> Any:
        return self.app[CORE]

    @property
    def pool(self) -> Any:
        return self.app[POOL]

    def user(self, name: str) -> InstanceClient:
        client = InstanceClient(self.url, f"Bearer {self.tokens[name]}")
        self.clients.append(client)
        return client

    def http(self, name: str | None) -> aiohttp.ClientSession:
        headers = {"Authorization": f"Bearer {self.tokens[name]}"} if name else {}
        session = aiohttp.ClientSession(base_url=self.url, headers=headers)
        self.sessions.append(session)
        return session

    def user_dir(self, name: str) -> Path:
        return self.data_dir / "users" / name

    def run_of(self, prompt_id: str) -> Any:
        """The proxy's run of the task ``prompt_id`` (on an instance or queued ahead there), or None."""
        return next((run for run in self.core.runs.values() if run.task.prompt_id == prompt_id), None)

    async def waiting_on_instance(self, prompt_id: str) -> bool:
        """The task is in its instance's own queue, behind the one running there."""
        run = self.run_of(prompt_id)
        if run is None:
            return False
        queue = await run.instance.client.queue()
        return run.key in {item[1] for item in queue["queue_pending"]}

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()
        for session in self.sessions:
            await session.close()


ClusterFactory = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def start_cluster(aiohttp_server: Any, data_dir: Path) -> Any:
    started: list[Cluster] = []

    async def factory(instances: int = 2, users: tuple[str, ...] = ("alice", "bob"), *,
                      instance_urls: tuple[str, ...] = (), admin: str | None = None,
                      **settings: Any) -> Cluster:
        write_sleep_plugin(data_dir)
        servers = [await aiohttp_server(create_embedded_app(StandardSettings(data_dir=data_dir, token=INSTANCE_TOKEN)))
                   for _ in range(instances)]
        urls = tuple(str(s.make_url("")).rstrip("/") for s in servers) + instance_urls
        tokens = await make_users(data_dir, users, admin, settings.get("redis_url"))
        options = {"health_interval_s": 0.2, "instance_lost_s": 1.0, **settings}
        app = await create_cluster_app(ClusterSettings(data_dir=data_dir, instance_urls=urls,
                                                       instance_token=INSTANCE_TOKEN, **options))
        server = await aiohttp_server(app)
        cluster = Cluster(data_dir, server, tokens, servers)
        started.append(cluster)
        if urls:
            await until(lambda: len(cluster.pool.up()) == len(urls))
        return cluster

    yield factory
    for cluster in started:
        await cluster.aclose()


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != ".keep")


class InstanceProcess:
    """``python -m standard`` on a fixed loopback port, killable and restartable."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = start_listening(
            [sys.executable, "-m", "standard", "--port", str(self.port), "--data-dir", str(self.data_dir)],
            self.port, env={**os.environ, "COMFYSERVE_TOKEN": INSTANCE_TOKEN})

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def instance_processes(data_dir: Path) -> Iterator[list[InstanceProcess]]:
    """Two instance processes on ``data_dir`` (the sleep plugin installed; install others before)."""
    write_sleep_plugin(data_dir)
    processes = [InstanceProcess(data_dir) for _ in range(2)]
    for process in processes:
        process.start()
    yield processes
    for process in processes:
        process.kill()
