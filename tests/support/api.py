"""The API edition for the tests: in this loop (``api``, ``instance_url``), as processes (``procs``), the SDK.

    live = await api(instances=[url])   # front + queue on one port, one worker per instance URL
    proc = procs.start("api", "api", "--port", ...)   # a real ``comfyserve`` child, killed at the end
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from api_edition.app import Running, running
from api_edition.settings import ApiSettings
from queue_service.client import DataFrame, QueueClient
from standard.ports import free_port
from standard.server.app import create_embedded_app
from standard.settings import StandardSettings
from support.metrics import scrape
from support.processes import TESTS_DIR, VENV_BIN, wait_for_port
from support.wait import until

SDK_PYTHON = TESTS_DIR.parent / ".venv-sdk" / "bin" / "python"
SDK_SCRIPT = TESTS_DIR / "sdk_api_watch.py"
TOKEN = "api-test-token"
SERVICE = "svc"

requires_sdk = pytest.mark.skipif(not SDK_PYTHON.exists(),
                                  reason="the SDK env .venv-sdk is missing (scripts/setup-sdk-env.sh)")


@dataclass
class LiveApi:
    live: Running
    port: int
    settings: ApiSettings

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def sink(self, **kwargs: Any) -> QueueClient:
        return QueueClient(self.endpoint, f"{SERVICE}/sink", token=TOKEN, **kwargs)

    def input(self, **kwargs: Any) -> QueueClient:
        return QueueClient(self.endpoint, SERVICE, token=TOKEN, **kwargs)

    async def metrics(self) -> dict[str, Any]:
        """The all-in-one's ``GET /metrics``, parsed."""
        return await scrape(self.url + "/metrics", TOKEN)

    async def submit(self, graph: Any, *, token: str = TOKEN, path: str = "/api_prompt",
                     **params: str) -> httpx.Response:
        body = graph if isinstance(graph, bytes) else json.dumps(graph).encode()
        async with httpx.AsyncClient(base_url=self.url, trust_env=False) as http:
            return await http.post(path, params=params, content=body, headers={"Authorization": token})


ApiFactory = Callable[..., Awaitable[LiveApi]]


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[ApiFactory]:
    """Start the all-in-one in this loop: ``await api(instance_urls=(url,), max_length=5)``."""
    stack = contextlib.AsyncExitStack()

    async def factory(**overrides: Any) -> LiveApi:
        port = free_port()
        base: dict[str, Any] = dict(port=port, token=TOKEN, service=SERVICE, instances=0,
                                    sqlite_path=tmp_path / f"queue-{port}.sqlite3", pending_timeout_s=1.0,
                                    instance_down_s=1.0, max_payload_bytes=64 * 1024)
        if overrides.get("redis_url"):
            base["sqlite_path"] = None
        base.update(overrides)
        settings = ApiSettings(**base)
        live = await stack.enter_async_context(running(settings))
        return LiveApi(live, port, settings)

    async with stack:
        yield factory


@pytest.fixture
async def instance_url(aiohttp_server: Any, data_dir: Path) -> Callable[..., Awaitable[str]]:
    """A real embedded instance on a loopback port (same token): ``url = await instance_url()``."""

    async def factory(**settings: Any) -> str:
        settings.setdefault("token", TOKEN)
        server = await aiohttp_server(create_embedded_app(StandardSettings(data_dir=data_dir, **settings)))
        return f"http://127.0.0.1:{server.port}"

    return factory


async def read_results(sink: QueueClient, count: int, timeout_s: float = 30.0) -> list[DataFrame]:
    """``count`` sink frames via watch, committing each."""
    got: list[DataFrame] = []
    async with asyncio.timeout(timeout_s):
        async with sink.watch(window=5) as frames:
            async for frame in frames:
                got.append(frame)
                await sink.commit(frame.index)
                if len(got) == count:
                    break
    return got


async def no_more(sink: QueueClient, wait_s: float = 0.5) -> list[DataFrame]:
    """Whatever else lands on the sink within ``wait_s`` (expected: nothing)."""
    return await sink.get(0, 10, timeout_s=wait_s)


async def results_final(endpoint: str, count: int, *, queued: int = 0) -> None:
    """``count`` results were ever put on the service's sink, and none is still to come: waits until the input
    queue holds only the ``queued`` tasks no worker will take (0: every task committed). A worker puts a task's
    result before it commits the task, so by then every run's result is on the sink: what waiting a while for
    nothing more would only hope, seen at once."""
    async with QueueClient(endpoint, SERVICE, token=TOKEN) as inputs, \
            QueueClient(endpoint, f"{SERVICE}/sink", token=TOKEN) as sink:
        async def settled() -> bool:
            return int((await inputs.attributes())["stream.length"]) == queued

        await until(settled, what=f"the input queue down to {queued} (every other task committed)")
        assert int((await sink.attributes())["stream.lastEntry"]) == count, "results put on the sink"


async def run_sdk(endpoint: str, args: dict[str, Any], timeout_s: float = 60.0) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    proc = await asyncio.create_subprocess_exec(
        str(SDK_PYTHON), str(SDK_SCRIPT), endpoint, f"{SERVICE}/sink", TOKEN, json.dumps(args),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(f"SDK timed out; stdout={out.decode()!r} stderr={err.decode()[-2000:]}") from None
    assert proc.returncode == 0, f"SDK failed: {err.decode()[-3000:]}"
    return json.loads(out.decode().strip().splitlines()[-1])


class Procs:
    """Child processes of one test, killed at the end whatever happens."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([str(VENV_BIN / "comfyserve"), *args], env=self.env, stdout=log,
                                stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        return proc

    def instances(self, count: int, data_dir: Path) -> list[tuple[subprocess.Popen[bytes], str]]:
        """``count`` instances on one data dir, started together."""
        started = []
        for i in range(count):
            port = free_port()
            proc = self.start(f"instance{i}", "standard", "--port", str(port), "--data-dir", str(data_dir),
                              "--token", TOKEN)
            started.append((proc, port))
        for proc, port in started:
            wait_for_port(port, timeout_s=30, proc=proc)
        return [(proc, f"http://127.0.0.1:{port}") for proc, port in started]

    def split(self, data_dir: Path, instances: int,
              *extra: str) -> tuple[str, list[tuple[subprocess.Popen[bytes], str]]]:
        """The API edition split up: ``comfyserve api`` as front and queue only (no workers of its own,
        ``--pending-timeout 1``; ``extra`` flags added) and ``instances`` instances on ``data_dir``, started
        together. Returns the queue's URL and the instances; the test starts the workers (``worker``)."""
        port = free_port()
        api = self.start("api", "api", "--data-dir", str(data_dir), "--port", str(port), "--token", TOKEN,
                         "--service", SERVICE, "--instances", "0", "--pending-timeout", "1", *extra)
        started = self.instances(instances, data_dir)
        wait_for_port(port, timeout_s=30, proc=api)
        return f"http://127.0.0.1:{port}", started

    def worker(self, name: str, queue_url: str, instance_url: str, *extra: str) -> subprocess.Popen[bytes]:
        return self.start(name, "worker", "--queue-url", queue_url, "--service", SERVICE, "--instance-url",
                          instance_url, "--token", TOKEN, "--instance-down-timeout", "1", *extra)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def kill_all(self) -> None:
        """SIGTERM first, so an all-in-one stops its own instances; then SIGKILL what is left."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def procs(cli_env: dict[str, str], tmp_path: Path) -> Iterator[Procs]:
    logs = tmp_path / "logs"
    logs.mkdir()
    p = Procs(cli_env, logs)
    yield p
    p.kill_all()


async def submit(base_url: str, graph: dict, task_id: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base_url, trust_env=False) as http:
        resp = await http.post("/api_prompt", params={"task_id": task_id}, json=graph,
                               headers={"Authorization": TOKEN})
    assert resp.status_code == 200, resp.text
    return resp


async def running_prompts(instance_url: str) -> int:
    async with httpx.AsyncClient(trust_env=False) as http:
        resp = await http.get(f"{instance_url}/queue", headers={"Authorization": TOKEN})
    return len(resp.json()["queue_running"])


async def wait_running(instance_url: str, timeout_s: float = 15.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await running_prompts(instance_url):
            await asyncio.sleep(0.05)
