"""Shared pieces of the queue-service tests: a live service on either store, the real SDK as a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from queue_service.client import QueueClient
from queue_service.fastput import FastPutSite
from queue_service.redis_store import RedisStore
from queue_service.server import STORE_KEY, create_app
from queue_service.settings import QueueSettings
from support.processes import TESTS_DIR

SDK_PYTHON = TESTS_DIR.parent / ".venv-sdk" / "bin" / "python"
SDK_SCRIPT = TESTS_DIR / "sdk_queue.py"
TOKEN = "queue-test-token"
PENDING_TIMEOUT_S = 1.0

requires_sdk = pytest.mark.skipif(not SDK_PYTHON.exists(),
                                  reason="the SDK env .venv-sdk is missing (scripts/setup-sdk-env.sh)")


def settings_for(store: str, tmp_path: Path, redis_url: str | None, **overrides: Any) -> QueueSettings:
    base: dict[str, Any] = {"token": TOKEN, "pending_timeout_s": PENDING_TIMEOUT_S, "max_length": 200,
                            "max_payload_bytes": 64 * 1024}
    if store == "redis":
        base["redis_url"] = redis_url
    else:
        base["sqlite_path"] = tmp_path / "queue.sqlite3"
    base.update(overrides)
    return QueueSettings(**base)


@dataclass
class LiveQueue:
    """A queue service on a loopback port, plus clients for it."""

    app: web.Application
    port: int
    backend: str
    site: FastPutSite | None = None
    runner: web.AppRunner | None = None
    clients: list[QueueClient] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, queue: str = "svc/sink", **kwargs: Any) -> QueueClient:
        kwargs.setdefault("token", TOKEN)
        queue_client = QueueClient(self.endpoint, queue, **kwargs)
        self.clients.append(queue_client)
        return queue_client

    async def sdk(self, scenario: str, queue: str = "svc/sink", args: dict[str, Any] | None = None,
                  timeout_s: float = 30.0, token: str = TOKEN) -> dict[str, Any]:
        return await run_sdk(self.endpoint, queue, scenario, args, timeout_s=timeout_s, token=token)


def record_long_polls(live: LiveQueue) -> list[str]:
    """From now on, the queues on which ``live`` parks a long-poll get (each ``store.arm``, in order).

    Once a get has armed its queue the server looks once more and then waits for a change, so a put
    made after the queue shows up here is the one that wakes it: tests wait for this, not a sleep.
    """
    store = live.app[STORE_KEY]
    armed: list[str] = []
    arm = store.arm

    async def recording(queue: str) -> None:
        await arm(queue)
        armed.append(queue)

    store.arm = recording  # type: ignore[method-assign]
    return armed


async def run_sdk(endpoint: str, queue: str, scenario: str, args: dict[str, Any] | None = None, *,
                  timeout_s: float = 30.0, token: str = TOKEN) -> dict[str, Any]:
    proc = await start_sdk(endpoint, queue, scenario, args, token=token)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(f"SDK {scenario} timed out; stdout={out.decode()!r} stderr={err.decode()[-2000:]}")
    assert proc.returncode == 0, f"SDK {scenario} failed: {err.decode()[-3000:]}"
    return json.loads(out.decode().strip().splitlines()[-1])


async def start_sdk(endpoint: str, queue: str, scenario: str, args: dict[str, Any] | None = None, *,
                    token: str = TOKEN) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return await asyncio.create_subprocess_exec(
        str(SDK_PYTHON), str(SDK_SCRIPT), endpoint, queue, token, scenario, json.dumps(args or {}),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


@pytest.fixture(params=["sqlite", "redis"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def make_live_queue(store_kind: str, request: pytest.FixtureRequest,
                          tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[LiveQueue]]]:
    """Start services on the store under test (SQLite in tmp_path; a flushed real Redis), served as
    ``comfyserve queue`` serves them: plain puts on the byte-level path (``FastPutSite``), the rest by aiohttp."""
    redis_url = request.getfixturevalue("redis_url") if store_kind == "redis" else None
    started: list[tuple[LiveQueue, web.AppRunner]] = []

    async def make(**overrides: Any) -> LiveQueue:
        app = create_app(settings_for(store_kind, tmp_path, redis_url, **overrides))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = FastPutSite(runner, "127.0.0.1", 0)
        await site.start()
        live = LiveQueue(app=app, port=site.port, backend=store_kind, site=site, runner=runner)
        started.append((live, runner))
        return live

    yield make
    for live, runner in started:
        for queue_client in live.clients:
            await queue_client.aclose()
        await runner.cleanup()


@pytest.fixture
async def live_queue(make_live_queue: Callable[..., Awaitable[LiveQueue]]) -> LiveQueue:
    return await make_live_queue()


def service_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "queue_service", *args]


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[RedisStore]:
    """The queue service's Redis store, opened on the test's redis-server."""
    store = RedisStore(redis_url)
    await store.open()
    yield store
    await store.close()
