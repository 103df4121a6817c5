"""A backend instance and the proxy in front of it (fixtures ``backend``, ``front``).

The backend is a second comfyserve instance (same protocol as ComfyUI) on its
own loopback port; the front is ``create_backend_app`` pointed at it.
``Backend.seen`` records what the backend received, so tests can check that
our token never reaches it and that paths arrive still encoded.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from standard.backend.app import create_backend_app
from standard.backend.fastpath import FastProxySite
from standard.datadir import init_data_dir
from standard.guard import AccessPolicy
from standard.server.app import create_embedded_app
from standard.settings import StandardSettings

TOKEN = "front-token"


@dataclass
class Seen:
    """What one backend request looked like on arrival."""

    method: str
    raw_path: str
    headers: dict[str, str]


@dataclass
class Backend:
    server: TestServer
    data_dir: Path
    seen: list[Seen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def app(self) -> web.Application:
        return self.server.app


def recording_middleware(seen: list[Seen]) -> Any:
    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append(Seen(request.method, request.raw_path, dict(request.headers)))
        return await handler(request)

    return record


async def start_backend(data_dir: Path, port: int | None = None, *, middlewares: Sequence[Any] = (),
                        **settings: Any) -> Backend:
    """A comfyserve embedded instance on a loopback port, recording its requests (then ``middlewares``)."""
    seen: list[Seen] = []
    # It stands in for ComfyUI, which takes any Host: the front keeps the browser's one.
    settings.setdefault("access", AccessPolicy.build(allowed_hosts=["*"]))
    app = create_embedded_app(StandardSettings(data_dir=data_dir, **settings))
    app.middlewares[0:0] = [recording_middleware(seen), *middlewares]
    server = TestServer(app, host="127.0.0.1", port=port)
    await server.start_server()
    return Backend(server, data_dir, seen)


class FastFront:
    """The front as ``comfyserve standard`` serves it: an AppRunner with the ``FastProxySite``."""

    def __init__(self, app: web.Application, port: int | None) -> None:
        self.app = app
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        self._port = port or 0
        self.site: FastProxySite | None = None

    async def start_server(self) -> None:
        await self.runner.setup()
        self.site = FastProxySite(self.runner, "127.0.0.1", self._port)
        await self.site.start()

    @property
    def port(self) -> int:
        assert self.site is not None
        return self.site.port

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_front(backend_url: str, data_dir: Path, port: int | None = None, *, fast: bool = True,
                      **settings: Any) -> TestServer | FastFront:
    """The proxy app on a loopback port: on the fast-path site (default) or a plain aiohttp one."""
    app = create_backend_app(StandardSettings(data_dir=data_dir, backend_url=backend_url, **settings))
    server: TestServer | FastFront = FastFront(app, port) if fast else TestServer(app, host="127.0.0.1", port=port)
    await server.start_server()
    return server


@pytest.fixture
async def backend(tmp_path: Path) -> Any:
    started = await start_backend(init_data_dir(tmp_path / "backend").root)
    yield started
    await started.server.close()


FrontFactory = Callable[..., Awaitable[TestServer]]


@pytest.fixture(params=["fast", "aiohttp"])
async def front(request: pytest.FixtureRequest, tmp_path: Path, backend: Backend) -> Any:
    """``server = await front(token=TOKEN)``: a proxy in front of ``backend``, on both sites."""
    servers: list[TestServer | FastFront] = []

    async def factory(backend_url: str | None = None, port: int | None = None, **settings: Any) -> Any:
        server = await start_front(backend_url or backend.url, init_data_dir(tmp_path / "front").root,
                                   port=port, fast=request.param == "fast", **settings)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await server.close()
