"""Shared fixtures: a real redis-server, fresh data dirs, the CLI's environment; the support plugins.

Test modules never import this file or a fixture: they name fixtures as parameters. The fixture
modules of the ``support`` package are registered here (``tests/`` is on ``sys.path`` because this
conftest sits in a directory without ``__init__.py``); their plain helpers are imported from them.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from support.processes import VENV_BIN, RedisServer

pytest_plugins = [
    "support.server",  # first: support.cluster imports its gate helpers (a plugin is registered before its importers)
    "support.api",
    "support.backend",
    "support.browser",
    "support.cluster",
    "support.queue",
    "support.ssl_context",
    "oss_server.fixtures",
]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """An initialised, empty data dir."""
    from standard.datadir import init_data_dir

    return init_data_dir(tmp_path / "data").root


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session; tests flush what they need."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A flushed database on the session's redis-server."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()
    return redis_server.url


@pytest.fixture
async def silent_redis() -> AsyncIterator[str]:
    """A "Redis" that takes connections and reads what is sent, but never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"redis://127.0.0.1:{port}/0"
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


@pytest.fixture
def cli_env() -> dict[str, str]:
    """Environment for running ``comfyserve`` subprocesses from this venv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYSERVE_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    if sys.flags.dev_mode:  # the suite runs under -X dev (scripts/test.sh): so do the roles it starts
        env["PYTHONDEVMODE"] = "1"
    return env
