"""The instances the proxy schedules onto: health checks, spawning, cached info.

An instance is ``up`` while ``/readyz`` answers 200; the health loop moves it
between ``up`` and ``down`` (an instance that comes back rejoins by itself).
A task holds an instance from dispatch to its end (``task_id``); the runner
takes an instance out (``mark_down``) when it dies under a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from standard.client import ClientTimeouts, Connected, Disconnected, InstanceClient
from standard.errors import InstanceError
from standard.ports import free_port
from standard.private import TOKEN_ENV, child_environment

log = logging.getLogger("comfyserve.cluster.pool")
UP, DOWN, STARTING = "up", "down", "starting"


class InstanceEvents:
    """One long-lived event socket per instance; its events go to the task running there (``sink``).

    Opening a socket per task would put a WebSocket handshake between every
    two tasks on an instance; this one stays open (and reopens) while the
    instance is in the pool. An exception in the sink means the socket gave up.
    """

    def __init__(self, client: InstanceClient) -> None:
        self.client = client
        self.client_id = f"cluster-pool-{secrets.token_hex(8)}"
        self.connected = asyncio.Event()
        self.sink: asyncio.Queue[Any] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._pump(), name=f"comfyserve-events-{self.client.base_url}")

    async def _pump(self) -> None:
        while True:
            try:
                async for item in self.client.events(self.client_id, markers=True):
                    if isinstance(item, Connected):
                        self.connected.set()
                    elif isinstance(item, Disconnected):
                        self.connected.clear()
                    if self.sink is not None:
                        self.sink.put_nowait(item)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # down for too long: tell the running task, keep trying
                self.connected.clear()
                if self.sink is not None:
                    self.sink.put_nowait(exc)
                await asyncio.sleep(0.5)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


@dataclass
class Instance:
    url: str
    client: InstanceClient
    events: InstanceEvents | None = None
    state: str = STARTING
    task_id: str | None = None
    models: set[str] = field(default_factory=set)
    last_used_s: float = 0.0
    tasks_run: int = 0
    busy_elsewhere_until_s: float = 0.0  # another proxy holds its lease

    @property
    def free(self) -> bool:
        return self.state == UP and self.task_id is None and time.monotonic() >= self.busy_elsewhere_until_s


class Pool:
    """Instances by URL; ``on_change`` is called when one may have become free."""

    def __init__(self, *, health_interval_s: float, lost_after_s: float, info_cache_s: float,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.instances: dict[str, Instance] = {}
        self._health_interval_s = health_interval_s
        self._timeouts = ClientTimeouts(connect_s=2.0, request_s=30.0, disconnected_s=lost_after_s,
                                        reconnect_max_s=0.5, get_retries=0, idle_check_s=1.0)
        self._info_cache_s = info_cache_s
        self._cache: dict[str, tuple[float, Any]] = {}
        self.on_change = on_change  # the scheduler's wake-up, wired by the app
        self._task: asyncio.Task[None] | None = None

    # -- membership ---------------------------------------------------------------

    def add(self, url: str, token: str | None = None) -> Instance:
        url = url.rstrip("/")
        if url in self.instances:
            return self.instances[url]
        client = InstanceClient(url, token, timeouts=self._timeouts)
        instance = Instance(url, client, InstanceEvents(client))
        self.instances[url] = instance
        instance.events.start()
        log.info("instance %s joined the pool", url)
        return instance

    def free(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.free]

    def up(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.state == UP]

    def reserve(self, instance: Instance, task_id: str) -> None:
        instance.task_id = task_id

    def release(self, instance: Instance, models: list[str] | None = None) -> None:
        instance.task_id = None
        instance.last_used_s = time.monotonic()
        instance.tasks_run += 1
        if models:
            instance.models = set(models)  # what it has loaded now
        self.on_change()

    def mark_down(self, instance: Instance, reason: str) -> None:
        if instance.state != DOWN:
            log.warning("instance %s left the pool: %s", instance.url, reason)
        instance.state = DOWN
        instance.task_id = None

    def status(self, *, with_urls: bool = True) -> list[dict[str, Any]]:
        """Each instance's state; ``with_urls=False`` (for non-admins) names them by number instead."""
        return [{**({"url": i.url} if with_urls else {"name": f"instance {n}"}),
                 "state": i.state, "running": i.task_id is not None, "tasks_run": i.tasks_run}
                for n, i in enumerate(self.instances.values(), start=1)]

    # -- health -------------------------------------------------------------------

    async def start(self) -> None:
        await self.check_all()
        self._task = asyncio.create_task(self._health_loop(), name="comfyserve-cluster-health")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for instance in self.instances.values():
            if instance.events is not None:
                await instance.events.aclose()
            await instance.client.aclose()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self._health_interval_s)
            try:
                await self.check_all()
            except Exception:  # the loop must outlive any one bad check
                log.exception("health check failed")

    async def check_all(self) -> None:
        instances = list(self.instances.values())
        results = await asyncio.gather(*(i.client.ready() for i in instances), return_exceptions=True)
        changed = False
        for instance, ready in zip(instances, results, strict=True):
            ok = ready is True
            if ok and instance.state != UP:
                if instance.state == DOWN:
                    log.info("instance %s is back", instance.url)
                instance.state, changed = UP, True
            elif not ok and instance.state == UP and instance.task_id is None:
                self.mark_down(instance, "health check failed")
        if changed:
            self._cache.clear()
            self.on_change()

    # -- info from the pool ---------------------------------------------------------

    async def cached_json(self, path: str) -> Any:
        """GET ``path`` from any up instance, cached; None when no instance answers."""
        hit = self._cache.get(path)
        now = time.monotonic()
        if hit is not None and now - hit[0] < self._info_cache_s:
            return hit[1]
        for instance in sorted(self.up(), key=lambda i: i.task_id is not None):
            try:
                data = await instance.client.get_json(path)
            except InstanceError as exc:
                log.info("GET %s from %s failed: %s", path, instance.url, exc)
                continue
            self._cache[path] = (now, data)
            return data
        return hit[1] if hit is not None else None


class LocalInstances:
    """``--instances N``: embedded-engine instances on loopback ports, restarted when they die."""

    def __init__(self, count: int, data_dir: Path, token: str, extra_args: tuple[str, ...] = ()) -> None:
        self.count = count
        self.data_dir = data_dir
        self.token = token
        self.extra_args = extra_args
        self.ports = [free_port() for _ in range(count)]
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    async def start(self) -> None:
        for index, port in enumerate(self.ports):
            self._tasks.append(asyncio.create_task(self._supervise(index, port), name=f"comfyserve-instance-{index}"))

    async def _spawn(self, index: int, port: int) -> asyncio.subprocess.Process:
        log_dir = self.data_dir / ".comfyserve" / "instances"
        log_dir.mkdir(parents=True, exist_ok=True)
        env = child_environment({TOKEN_ENV: self.token})  # not on the command line: ps shows that
        with open(log_dir / f"instance-{index}.log", "ab") as log_file:
            return await asyncio.create_subprocess_exec(
                sys.executable, "-m", "standard", "--port", str(port), "--data-dir", str(self.data_dir),
                *self.extra_args, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                preexec_fn=_die_with_parent,
            )

    async def _supervise(self, index: int, port: int) -> None:
        while not self._stopping:
            process = await self._spawn(index, port)
            self._processes[index] = process
            code = await process.wait()
            if self._stopping:
                return
            log.warning("local instance %d (port %d) exited with %s; restarting", index, port, code)
            await asyncio.sleep(1.0)

    def process(self, index: int) -> asyncio.subprocess.Process | None:
        return self._processes.get(index)

    async def aclose(self) -> None:
        self._stopping = True
        for process in self._processes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
        for process in self._processes.values():
            try:
                await asyncio.wait_for(process.wait(), 10.0)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _load_prctl() -> Any:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()  # loaded here: the forked child must not import anything


def _die_with_parent() -> None:
    """Linux: the instance gets SIGTERM when the proxy dies, even by SIGKILL (no orphans holding ports)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


