"""The instances the proxy schedules onto: health checks, spawning, cached info.

An instance is ``up`` while ``/readyz`` answers 200; the health loop moves it
between ``up`` and ``down`` (an instance that comes back rejoins by itself).
A task holds an instance from dispatch to its end (``task_id``); with
``--prefetch`` the next ones wait in the instance's own queue behind it
(``ahead``), and the first of them holds the instance when the running one
ends (``release``). The runner takes an instance out (``mark_down``) when it
dies under a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yarl import URL

from standard.client import ClientTimeouts, Connected, Disconnected, InstanceClient
from standard.errors import InstanceError
from standard.supervised import StandardChild
from standard.tasks import cancel_and_wait

log = logging.getLogger("comfyserve.cluster.pool")
UP, DOWN, STARTING = "up", "down", "starting"
MAX_URL_LENGTH = 2048
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")  # no spaces, no control characters, no non-ASCII look-alikes
_HOST = re.compile(r"^[A-Za-z0-9.:-]+$")  # a name, IPv4, or IPv6 (yarl drops the brackets)
URL_HINT = "An instance URL is http(s)://host:port, nothing else (no user, path or query)."


def instance_url(text: str) -> str:
    """``text`` as an instance URL (``http(s)://host[:port]``, no trailing slash); ``ValueError`` with a short
    message otherwise. Admin forms pass what anyone typed: nothing odd may reach the HTTP client (it raised
    on a bad IPv6 bracket or a NUL, a 500) or come back whole in a message."""
    if len(text) > MAX_URL_LENGTH or not _PRINTABLE.match(text):
        raise ValueError(URL_HINT)
    try:
        url = URL(text)
        port = url.port
    except ValueError:
        raise ValueError(URL_HINT) from None
    if (url.scheme not in ("http", "https") or not url.host or not _HOST.match(url.host) or url.user is not None
            or url.password is not None or url.path not in ("", "/") or url.query_string or url.fragment
            or not port or "#" in text or "?" in text):
        raise ValueError(URL_HINT)
    return text.rstrip("/")


def shown(url: str, limit: int = 120) -> str:
    """A URL for a message: cut short, so a page or log line never repeats a huge input."""
    return url if len(url) <= limit else url[:limit] + "…"
MAX_CACHED_FILES = 256  # templates and their thumbnails kept from the pool (a few MB at most)


class InstanceEvents:
    """One long-lived event socket per instance; each event goes to the run of its prompt (``attach``).

    Opening a socket per task would put a WebSocket handshake between every
    two tasks on an instance; this one stays open (and reopens) while the
    instance is in the pool. Several runs share it when tasks are queued ahead
    on the instance: an event naming a prompt goes to that prompt's run, one
    naming none (a preview frame) to the run of the prompt that started last;
    connection changes go to every run. An exception in a sink means the
    socket gave up.
    """

    def __init__(self, client: InstanceClient) -> None:
        self.client = client
        self.client_id = f"cluster-pool-{secrets.token_hex(8)}"
        self.connected = asyncio.Event()
        self.sinks: dict[str, asyncio.Queue[Any]] = {}
        self.current: str | None = None  # the prompt the instance runs now (its last execution_start)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._pump(), name=f"comfyserve-events-{self.client.base_url}")

    def attach(self, prompt_id: str) -> asyncio.Queue[Any]:
        """The queue the events of ``prompt_id`` arrive on, from now until ``detach``."""
        sink: asyncio.Queue[Any] = asyncio.Queue()
        self.sinks[prompt_id] = sink
        return sink

    def detach(self, prompt_id: str, sink: asyncio.Queue[Any]) -> None:
        if self.sinks.get(prompt_id) is sink:
            del self.sinks[prompt_id]

    def _route(self, item: Any) -> None:
        if isinstance(item, (Connected, Disconnected, BaseException)):
            for sink in self.sinks.values():
                sink.put_nowait(item)
            return
        prompt_id = None
        if isinstance(item, dict) and isinstance(item.get("data"), dict):
            prompt_id = item["data"].get("prompt_id")
            if item.get("type") == "execution_start" and isinstance(prompt_id, str):
                self.current = prompt_id
        target = self.sinks.get(prompt_id if isinstance(prompt_id, str) else self.current or "")
        if target is not None:
            target.put_nowait(item)

    async def _pump(self) -> None:
        while True:
            try:
                async for item in self.client.events(self.client_id, markers=True):
                    if isinstance(item, Connected):
                        self.connected.set()
                    elif isinstance(item, Disconnected):
                        self.connected.clear()
                    self._route(item)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # down for too long: tell the runs, keep trying
                self.connected.clear()
                self._route(exc)
                await asyncio.sleep(0.5)

    async def aclose(self) -> None:
        if self._task is not None:
            with contextlib.suppress(Exception):
                await cancel_and_wait(self._task)


@dataclass
class Instance:
    url: str
    client: InstanceClient
    events: InstanceEvents | None = None
    state: str = STARTING
    task_id: str | None = None
    ahead: list[str] = field(default_factory=list)  # tasks queued on it behind ``task_id`` (--prefetch)
    last_step_of: str | None = None  # the last task of ours that reported its last sampler step here
    models: set[str] = field(default_factory=set)  # of the last task it ran, or will have run once its queue ends
    last_used_s: float = 0.0
    tasks_run: int = 0
    busy_elsewhere_until_s: float = 0.0  # another proxy holds its lease
    ours: Callable[[], bool] | None = None  # a spawned instance: is its own child the one answering?
    retiring: bool = False  # an admin drains or removes it: it takes no new task
    # Done once the last run handed out here has submitted its prompt (or given up): see ``submit_turn``.
    last_submit: asyncio.Future[None] | None = field(default=None, repr=False)

    @property
    def free(self) -> bool:
        return (self.state == UP and self.task_id is None and not self.retiring
                and time.monotonic() >= self.busy_elsewhere_until_s)

    @property
    def finishing(self) -> bool:
        """Its running task reported its last sampler step: it is about to be free (one reported by a task
        that ran here before, or by one still queued, says nothing about the running one)."""
        return self.task_id is not None and self.last_step_of == self.task_id

    def submit_turn(self) -> tuple[asyncio.Future[None] | None, asyncio.Future[None]]:
        """The run's place in the line of submissions here: (the previous run's, done once it submitted; its
        own, to set once it did). ComfyUI runs its queue in the order prompts arrive, and each run stages its
        graph in a thread first: without the line a task queued ahead could overtake the one handed out before
        it (another user's turn, or its own user's earlier task)."""
        previous, mine = self.last_submit, asyncio.get_running_loop().create_future()
        self.last_submit = mine
        return previous, mine

    def takes_ahead(self, prefetch: int) -> bool:
        """Busy with a task of ours, room in its queue for one more behind it."""
        return (self.state == UP and self.task_id is not None and not self.retiring
                and len(self.ahead) < prefetch)


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

    def add(self, url: str, token: str | None = None, *, ours: Callable[[], bool] | None = None) -> Instance:
        """Put the instance at ``url`` in the pool; ``ours`` gates a spawned one (see ``check_all``)."""
        url = url.rstrip("/")
        if url in self.instances:
            return self.instances[url]
        client = InstanceClient(url, token, timeouts=self._timeouts)
        events = InstanceEvents(client)
        instance = Instance(url, client, events, ours=ours)
        self.instances[url] = instance
        events.start()
        log.info("instance %s joined the pool", url)
        return instance

    def forget_cached(self) -> None:
        """Drop the cached answers (node list, templates): an instance reloaded its plugins."""
        self._cache.clear()

    async def remove(self, url: str) -> bool:
        """Take ``url`` out of the pool and close its connections; False if it was not in it."""
        instance = self.instances.pop(url.rstrip("/"), None)
        if instance is None:
            return False
        if instance.events is not None:
            await instance.events.aclose()
        await instance.client.aclose()
        self._cache.clear()
        log.info("instance %s left the pool: removed by an admin", instance.url)
        return True

    def free(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.free]

    def up(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.state == UP]

    def reserve(self, instance: Instance, task_id: str, models: list[str] | None = None,
                ahead: bool = False) -> None:
        """``task_id`` runs on ``instance`` now, or (``ahead``) next, from the instance's own queue."""
        if ahead:
            instance.ahead.append(task_id)
        else:
            instance.task_id = task_id
        if models:
            instance.models = set(models)  # what it will hold once its queue gets there

    def release(self, instance: Instance, task_id: str, models: list[str] | None = None) -> str | None:
        """``task_id`` is done with ``instance``: the task queued behind it holds it now (returned), if any."""
        instance.last_used_s = time.monotonic()
        instance.tasks_run += 1
        following = None
        if task_id in instance.ahead:  # ended before the run ahead of it was through with its bookkeeping
            instance.ahead.remove(task_id)
        elif instance.task_id in (task_id, None):  # else taken out and given to another task meanwhile
            instance.task_id = following = instance.ahead.pop(0) if instance.ahead else None
            if models and instance.task_id is None:
                instance.models = set(models)  # what it has loaded now
        self.on_change()
        return following

    def withdraw(self, instance: Instance, task_id: str) -> str | None:
        """A task queued ahead on ``instance`` was taken back from its queue; the task that holds the instance
        now instead, if the withdrawn one held it (returned; see below).

        The task running there may end while the withdrawal is under way, passing the instance to the
        withdrawn task (``release``), or it was queued behind a run that ended before its claim did
        (``Scheduler.dispatch``): it must not hold it any longer, or the instance stays busy forever.
        """
        following = None
        if task_id in instance.ahead:
            instance.ahead.remove(task_id)
        elif instance.task_id == task_id:
            instance.task_id = following = instance.ahead.pop(0) if instance.ahead else None
        else:
            return None
        self.on_change()
        return following

    def mark_down(self, instance: Instance, reason: str) -> None:
        if instance.state != DOWN:
            log.warning("instance %s left the pool: %s", instance.url, reason)
        instance.state = DOWN
        instance.task_id = None
        instance.ahead.clear()

    def display_name(self, instance: Instance) -> str:
        """``instance N``, as non-admins see it on the dashboard."""
        number = next((n for n, i in enumerate(self.instances.values(), start=1) if i is instance), 0)
        return f"instance {number}"

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
            await cancel_and_wait(self._task)
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
        results = await asyncio.gather(*(self._ready(i) for i in instances), return_exceptions=True)
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

    @staticmethod
    async def _ready(instance: Instance) -> bool:
        """``/readyz`` answers 200 and, for a spawned instance, from its own child (not a squatter on its port)."""
        if instance.ours is not None and not instance.ours():
            return False
        return await instance.client.ready()

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

    async def cached_file(self, path: str) -> tuple[bytes, str] | None:
        """A static file (a workflow template, its thumbnail) from any up instance, cached like ``cached_json``.

        The pool's runtime decides what exists: None when the instance asked says 404 (or none is up).
        """
        key = "file:" + path
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and now - hit[0] < self._info_cache_s:
            return hit[1]
        for instance in sorted(self.up(), key=lambda i: i.task_id is not None):
            try:
                found = await instance.client.get_file(path)
            except InstanceError as exc:
                log.info("GET %s from %s failed: %s", path, instance.url, exc)
                continue
            if sum(k.startswith("file:") for k in self._cache) >= MAX_CACHED_FILES:
                for stale in [k for k in self._cache if k.startswith("file:")]:
                    del self._cache[stale]
            self._cache[key] = (now, found)
            return found
        return None


class LocalInstances:
    """``--instances N``: ``python -m standard`` children on loopback ports, restarted when they die.

    Their ports avoid the proxy's own (``avoid_ports``) and each other's; an
    instance is only ever up in the pool while its own child answers there
    (``StandardChild.answering``), never because something else took its port.
    """

    def __init__(self, count: int, data_dir: Path, token: str, extra_args: tuple[str, ...] = (),
                 avoid_ports: tuple[int, ...] = ()) -> None:
        self.token = token
        log_dir = data_dir / ".comfyserve" / "instances"
        taken = set(avoid_ports)
        self.children: list[StandardChild] = []
        for index in range(count):
            child = StandardChild(f"local instance {index}", data_dir, token=token, extra_args=extra_args,
                                  avoid_ports=taken, log_file=log_dir / f"instance-{index}.log", stop_timeout_s=10.0)
            taken.add(child.port)
            self.children.append(child)

    @property
    def urls(self) -> list[str]:
        return [child.url for child in self.children]

    async def start(self, pool: Pool) -> None:
        """Start the children and put each in ``pool``, gated on its own child answering."""
        for child in self.children:
            child.start()
            pool.add(child.url, self.token, ours=child.answering)

    async def aclose(self) -> None:
        await asyncio.gather(*(child.stop() for child in self.children))
