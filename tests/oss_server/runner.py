"""Run the OSS test server on its own event loop in a thread (oss2 is blocking, so tests call it
from any thread while the server keeps answering), or as a process: ``python -m tests.oss_server``."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from aiohttp import web

from .server import OssTestServer


@dataclass
class RunningOssServer:
    server: OssTestServer
    port: int
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    runner: web.AppRunner

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        future = asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop)
        future.result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def start_in_thread(server: OssTestServer | None = None, port: int = 0) -> RunningOssServer:
    """Start ``server`` on 127.0.0.1 (a free port unless given) and return once it listens."""
    server = server or OssTestServer()
    loop = asyncio.new_event_loop()
    ready: dict[str, object] = {}
    started = threading.Event()

    async def setup() -> None:
        runner = web.AppRunner(server.app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        ready["runner"] = runner
        ready["port"] = runner.addresses[0][1]

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(setup())
        except BaseException as exc:  # report start-up failures to the caller
            ready["error"] = exc
            started.set()
            return
        started.set()
        loop.run_forever()
        loop.close()

    thread = threading.Thread(target=main, name="oss-test-server", daemon=True)
    thread.start()
    started.wait(timeout=10)
    if "error" in ready:
        raise RuntimeError(f"OSS test server failed to start: {ready['error']!r}")
    return RunningOssServer(server, int(ready["port"]), loop, thread, ready["runner"])  # type: ignore[arg-type]
