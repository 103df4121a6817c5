"""Where the proxy's state lives: every user's tasks (queued, running, finished).

A task is one ``POST /prompt`` of one user. Its record carries what the
scheduler and the routes need; the store only moves it between states
atomically (``pending -> running -> done``, or back to ``pending`` for a
retry), so a proxy restart — or a second proxy on the same Redis — finds the
same queues, running tasks and history. Two implementations with one
interface: :class:`SqliteStateStore` (default, ``DIR/.comfyserve/cluster_state.sqlite``)
and :class:`~cluster_proxy.store_redis.RedisStateStore` (``--redis-url``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from redis.exceptions import RedisError

from standard.errors import ClusterError
from standard.private import private_dir, private_file

PENDING, RUNNING, DONE = "pending", "running", "done"
ATTEMPT_NAMESPACE = uuid.UUID("6f1d7a52-3c1e-4b8e-9a57-0d2c5e8f4b31")  # of Task.attempt_key


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Task:
    """One user's prompt, from submission to history."""

    id: str  # internal, unguessable; the instance sees it (plus the attempt) as its prompt_id
    user: str
    prompt_id: str  # the user's own id
    number: float  # ComfyUI's queue number: an int unless the client sent its own
    seq: int
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs_to_execute: list[str]
    client_id: str | None = None
    sensitive: dict[str, Any] = field(default_factory=dict)
    models: list[str] = field(default_factory=list)
    state: str = PENDING
    instance: str | None = None
    attempts: int = 0
    created_ms: int = field(default_factory=now_ms)
    started_ms: int | None = None
    ended_ms: int | None = None
    history: dict[str, Any] | None = None  # {"outputs", "status", "meta"} once done
    notes: list[str] = field(default_factory=list)  # what happened (retries), shown to the user
    proxy: str | None = None  # the proxy following it while it runs
    earlier_attempts_ms: int = 0  # instance time of attempts that ended in a retry or a hand-back (usage)
    # Claimed and queued on its instance behind the task running there (``--prefetch``), not started yet:
    # users see it as pending; ``mark_started`` clears it when the instance starts it.
    queued_ahead: bool = False
    # Its user deleted it through a proxy that does not follow it while it was queued ahead: the proxy that
    # follows it takes it out of its instance's queue and drops it (``request_withdraw``). Cleared when it
    # starts there all the same (it then runs as any running task) or goes back to the store's queue.
    withdraw_requested: bool = False

    def attempt_key(self) -> str:
        """The instance's ``prompt_id`` for this attempt: a UUID (as ComfyUI requires of a client's own id)
        derived from the task and the attempt, so a proxy that restarts finds the same run again."""
        return str(uuid.uuid5(ATTEMPT_NAMESPACE, f"{self.id}-{self.attempts}"))

    @property
    def shown_state(self) -> str:
        """The state users see: a task queued ahead on an instance is still waiting (pending)."""
        return PENDING if self.state == RUNNING and self.queued_ahead else self.state

    def public(self) -> list[Any]:
        """ComfyUI's queue tuple ``[number, prompt_id, prompt, extra_data, outputs_to_execute]``."""
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs_to_execute]

    def history_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"prompt": self.public(), "outputs": {}, "status": {}, "meta": {}}
        entry.update(self.history or {})
        return entry

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Task:
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class Usage:
    """One finished task's use of the pool, kept apart from the history (which users may delete)."""

    task_id: str
    user: str
    ended_ms: int
    instance_ms: int  # its time on instances: every attempt, the ones handed back or lost too
    status: str

    @classmethod
    def of(cls, task: Task) -> Usage:
        ended = task.ended_ms or now_ms()
        status = ((task.history or {}).get("status") or {}).get("status_str") or "done"
        last = max(0, ended - (task.started_ms or ended))
        return cls(task.id, task.user, ended, task.earlier_attempts_ms + last, str(status))


class StateStore(Protocol):
    """The interface both stores implement (tests run the same suite on each)."""

    async def next_seq(self) -> int: ...
    async def add(self, task: Task) -> bool: ...
    async def get(self, user: str, prompt_id: str) -> Task | None: ...
    async def get_by_id(self, task_id: str) -> Task | None: ...
    async def user_tasks(self, user: str, state: str) -> list[Task]: ...
    async def pending(self) -> list[Task]: ...
    async def running(self) -> list[Task]: ...
    async def claim(self, task_id: str, instance: str, proxy: str = "", ahead: bool = False) -> Task | None: ...
    async def mark_started(self, task_id: str) -> Task | None: ...
    async def request_withdraw(self, task_id: str) -> Task | None: ...
    async def adopt(self, task_id: str, old_proxy: str | None, new_proxy: str) -> Task | None: ...
    async def heartbeat(self, proxy: str, ttl_s: float) -> None: ...
    async def alive_proxies(self) -> set[str]: ...
    async def requeue(self, task_id: str, note: str) -> Task | None: ...
    async def finish(self, task_id: str, history: dict[str, Any]) -> Task | None: ...
    async def delete(self, user: str, prompt_ids: list[str] | None, state: str) -> list[str]: ...
    async def add_instance_url(self, url: str) -> None: ...
    async def remove_instance_url(self, url: str) -> None: ...
    async def record_usage(self, usage: Usage) -> None: ...
    async def usage(self, since_ms: int, until_ms: int) -> list[Usage]: ...
    async def instance_urls(self) -> list[str]: ...
    # An instance runs one task at a time, whichever proxy dispatched it: a lease per instance.
    async def lease_instance(self, url: str, holder: str, ttl_s: float) -> bool: ...
    async def renew_instance(self, url: str, holder: str, ttl_s: float) -> bool: ...
    async def release_instance(self, url: str, holder: str) -> None: ...
    shared: bool  # True when other proxies may change the state (poll it)
    async def aclose(self) -> None: ...


class TransitionRefused(ClusterError):
    """A change function found the task not as expected; the transition does not happen."""


class StateUnavailable(ClusterError):
    """The cluster's state (tasks, accounts, sessions) could not be read or written: SQLite or Redis failed."""


_Cls = TypeVar("_Cls", bound=type)


REDIS_CALL_TIMEOUT_S = 5.0  # the longest one call on Redis may take (one that hangs keeps the socket open)
# The cluster's Redis clients have no socket_timeout (redis-py 8 defaults it to 5 s): with one, redis-py
# sends each command under asyncio.wait_for, which on Python 3.11 returns normally when a cancel lands as
# the send completes, so a cancelled task went on as if never cancelled. redis_call bounds calls instead.
REDIS_CLIENT_OPTIONS: dict[str, Any] = {"socket_connect_timeout": 2, "socket_timeout": None}


@contextlib.asynccontextmanager
async def redis_call(timeout_s: float) -> AsyncIterator[None]:
    """One call on Redis, bounded by ``timeout_s`` (asyncio.timeout: it never swallows a cancel); a Redis or
    socket error, or no answer in time, is a :class:`StateUnavailable`. A call cut off mid-way drops its
    connection (redis-py closes it on cancellation)."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except (RedisError, OSError) as exc:  # TimeoutError is an OSError
        raise StateUnavailable(f"redis: {str(exc) or f'no answer within {timeout_s:g} s'}") from exc


def redis_errors_translated(cls: _Cls) -> _Cls:
    """Class decorator: each public coroutine method is one :func:`redis_call`, bounded by the instance's
    ``call_timeout_s`` and raising :class:`StateUnavailable` for a Redis or socket error."""
    for name, method in list(vars(cls).items()):
        if name.startswith("_") or not inspect.iscoroutinefunction(method):
            continue

        def wrap(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            @functools.wraps(method)
            async def translated(self: Any, *args: Any, **kwargs: Any) -> Any:
                async with redis_call(self.call_timeout_s):
                    return await method(self, *args, **kwargs)

            return translated

        setattr(cls, name, wrap(method))
    return cls


def claim_change(instance: str, proxy: str, ahead: bool = False) -> Any:
    def change(task: Task) -> None:
        task.state, task.instance, task.started_ms, task.proxy = RUNNING, instance, now_ms(), proxy
        task.queued_ahead = ahead
        task.attempts += 1

    return change


def started_change(task: Task) -> None:
    """A task queued ahead has started on its instance: it runs from now (what usage counts)."""
    if not task.queued_ahead:
        raise TransitionRefused
    task.queued_ahead, task.started_ms, task.withdraw_requested = False, now_ms(), False


def withdraw_change(task: Task) -> None:
    """Its user deleted a task queued ahead through another proxy: the one following it is to withdraw it."""
    if not task.queued_ahead:
        raise TransitionRefused  # it started: a delete leaves a running task alone
    task.withdraw_requested = True


def adopt_change(old_proxy: str | None, new_proxy: str) -> Any:
    def change(task: Task) -> None:
        if task.proxy != old_proxy:
            raise TransitionRefused
        task.proxy = new_proxy

    return change


def requeue_change(note: str) -> Any:
    def change(task: Task) -> None:
        if task.started_ms is not None and not task.queued_ahead:  # it used its instance until now
            task.earlier_attempts_ms += max(0, now_ms() - task.started_ms)
        task.state, task.instance, task.queued_ahead, task.withdraw_requested = PENDING, None, False, False
        task.notes.append(note)

    return change


def finish_change(history: dict[str, Any]) -> Any:
    def change(task: Task) -> None:
        task.state, task.history, task.ended_ms = DONE, history, now_ms()

    return change


def _order(tasks: list[Task], state: str) -> list[Task]:
    if state == DONE:
        return sorted(tasks, key=lambda t: (t.ended_ms or 0, t.seq))
    return sorted(tasks, key=lambda t: (t.number, t.seq))


class SqliteStateStore:
    """One SQLite file; every call runs in a thread, serialised by a lock."""

    def __init__(self, path: Path, *, history_max_items: int = 10000) -> None:
        private_dir(path.parent)
        private_file(path)  # everyone's prompts: the owner's eyes only (-wal/-shm follow its mode)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS tasks (
                id TEXT PRIMARY KEY, user TEXT NOT NULL, prompt_id TEXT NOT NULL,
                state TEXT NOT NULL, ended_ms INTEGER, data TEXT NOT NULL);
            CREATE INDEX IF NOT EXISTS tasks_user_state ON tasks (user, state);
            CREATE INDEX IF NOT EXISTS tasks_state ON tasks (state);
            CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS instances (url TEXT PRIMARY KEY);
            CREATE TABLE IF NOT EXISTS usage (task_id TEXT PRIMARY KEY, user TEXT NOT NULL,
                ended_ms INTEGER NOT NULL, instance_ms INTEGER NOT NULL, status TEXT NOT NULL);
            CREATE INDEX IF NOT EXISTS usage_ended ON usage (ended_ms);
            """
        )
        self._lock = threading.Lock()
        self._history_max_items = history_max_items
        # One process per SQLite file: leases and liveness live in memory.
        self._leases: dict[str, tuple[str, float]] = {}
        self._alive: dict[str, float] = {}

    shared = False

    async def _run(self, fn: Any, *args: Any) -> Any:
        def locked() -> Any:
            with self._lock:
                return fn(*args)

        try:
            return await asyncio.to_thread(locked)
        except sqlite3.Error as exc:
            raise StateUnavailable(f"sqlite: {exc}") from exc

    # -- helpers (run on the thread, under the lock) --------------------------

    def _tasks(self, sql: str, args: tuple[Any, ...]) -> list[Task]:
        return [Task.from_json(row[0]) for row in self._db.execute(sql, args)]

    def _write(self, task: Task) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO tasks (id, user, prompt_id, state, ended_ms, data) VALUES (?,?,?,?,?,?)",
            (task.id, task.user, task.prompt_id, task.state, task.ended_ms, task.to_json()),
        )

    def _one(self, task_id: str) -> Task | None:
        found = self._tasks("SELECT data FROM tasks WHERE id = ?", (task_id,))
        return found[0] if found else None

    # -- interface --------------------------------------------------------------

    async def next_seq(self) -> int:
        def bump() -> int:
            self._db.execute(
                "INSERT INTO counters (name, value) VALUES ('seq', 1) "
                "ON CONFLICT(name) DO UPDATE SET value = value + 1"
            )
            return int(self._db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()[0])

        return await self._run(bump)

    async def add(self, task: Task) -> bool:
        def add() -> bool:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(
                    "SELECT state FROM tasks WHERE user = ? AND prompt_id = ?", (task.user, task.prompt_id)
                ).fetchall()
                if any(state != DONE for (state,) in rows):
                    self._db.execute("ROLLBACK")
                    return False
                self._db.execute("DELETE FROM tasks WHERE user = ? AND prompt_id = ?", (task.user, task.prompt_id))
                self._write(task)
                self._db.execute("COMMIT")
                return True
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

        return await self._run(add)

    async def get(self, user: str, prompt_id: str) -> Task | None:
        found = await self._run(self._tasks, "SELECT data FROM tasks WHERE user = ? AND prompt_id = ?",
                                (user, prompt_id))
        return found[0] if found else None

    async def get_by_id(self, task_id: str) -> Task | None:
        return await self._run(self._one, task_id)

    async def user_tasks(self, user: str, state: str) -> list[Task]:
        found = await self._run(self._tasks, "SELECT data FROM tasks WHERE user = ? AND state = ?", (user, state))
        return _order(found, state)

    async def pending(self) -> list[Task]:
        return _order(await self._run(self._tasks, "SELECT data FROM tasks WHERE state = ?", (PENDING,)), PENDING)

    async def running(self) -> list[Task]:
        return _order(await self._run(self._tasks, "SELECT data FROM tasks WHERE state = ?", (RUNNING,)), RUNNING)

    async def _transition(self, task_id: str, from_state: str, change: Any) -> Task | None:
        def transition() -> Task | None:
            task = self._one(task_id)
            if task is None or task.state != from_state:
                return None
            try:
                change(task)
            except TransitionRefused:
                return None
            self._write(task)
            return task

        return await self._run(transition)

    async def claim(self, task_id: str, instance: str, proxy: str = "", ahead: bool = False) -> Task | None:
        return await self._transition(task_id, PENDING, claim_change(instance, proxy, ahead))

    async def mark_started(self, task_id: str) -> Task | None:
        return await self._transition(task_id, RUNNING, started_change)

    async def request_withdraw(self, task_id: str) -> Task | None:
        """Mark a task queued ahead for withdrawal (``Task.withdraw_requested``); None if it is not queued ahead."""
        return await self._transition(task_id, RUNNING, withdraw_change)

    async def adopt(self, task_id: str, old_proxy: str | None, new_proxy: str) -> Task | None:
        """A running task whose proxy is gone: ``new_proxy`` follows it now (one taker only)."""
        return await self._transition(task_id, RUNNING, adopt_change(old_proxy, new_proxy))

    async def heartbeat(self, proxy: str, ttl_s: float) -> None:
        self._alive[proxy] = time.monotonic() + ttl_s

    async def alive_proxies(self) -> set[str]:
        now = time.monotonic()
        return {proxy for proxy, until in self._alive.items() if until > now}

    async def requeue(self, task_id: str, note: str) -> Task | None:
        return await self._transition(task_id, RUNNING, requeue_change(note))

    async def finish(self, task_id: str, history: dict[str, Any]) -> Task | None:
        """Done, and its usage recorded in the same transaction: no crash can keep one without the other."""
        def finish() -> Task | None:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                task = self._one(task_id)
                if task is None or task.state != RUNNING:
                    self._db.execute("ROLLBACK")
                    return None
                finish_change(history)(task)
                self._write(task)
                self._insert_usage(Usage.of(task))
                self._db.execute("COMMIT")
                return task
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

        task = await self._run(finish)
        if task is not None:
            await self._run(self._prune, task.user)
        return task

    def _prune(self, user: str) -> None:
        self._db.execute(
            "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE user = ? AND state = ? "
            "ORDER BY ended_ms DESC LIMIT -1 OFFSET ?)", (user, DONE, self._history_max_items),
        )

    async def delete(self, user: str, prompt_ids: list[str] | None, state: str) -> list[str]:
        """Drop the user's tasks in ``state`` (all of them when ``prompt_ids`` is None)."""
        def delete() -> list[str]:
            if prompt_ids is None:
                rows = self._db.execute("SELECT prompt_id FROM tasks WHERE user = ? AND state = ?", (user, state))
                found = [row[0] for row in rows]
            else:
                found = [pid for pid in prompt_ids if self._db.execute(
                    "SELECT 1 FROM tasks WHERE user = ? AND state = ? AND prompt_id = ?", (user, state, pid)
                ).fetchone()]
            for pid in found:
                self._db.execute("DELETE FROM tasks WHERE user = ? AND state = ? AND prompt_id = ?",
                                 (user, state, pid))
            return found

        return await self._run(delete)

    async def add_instance_url(self, url: str) -> None:
        await self._run(lambda: self._db.execute("INSERT OR IGNORE INTO instances (url) VALUES (?)", (url,)))

    async def remove_instance_url(self, url: str) -> None:
        await self._run(lambda: self._db.execute("DELETE FROM instances WHERE url = ?", (url,)))

    def _insert_usage(self, usage: Usage) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO usage (task_id, user, ended_ms, instance_ms, status) VALUES (?,?,?,?,?)",
            (usage.task_id, usage.user, usage.ended_ms, usage.instance_ms, usage.status))

    async def record_usage(self, usage: Usage) -> None:
        await self._run(self._insert_usage, usage)

    async def usage(self, since_ms: int, until_ms: int) -> list[Usage]:
        return await self._run(lambda: [Usage(*row) for row in self._db.execute(
            "SELECT task_id, user, ended_ms, instance_ms, status FROM usage WHERE ended_ms >= ? AND ended_ms < ?"
            " ORDER BY ended_ms", (since_ms, until_ms))])

    async def instance_urls(self) -> list[str]:
        return await self._run(lambda: [row[0] for row in self._db.execute("SELECT url FROM instances ORDER BY url")])

    async def lease_instance(self, url: str, holder: str, ttl_s: float) -> bool:
        current = self._leases.get(url)
        if current is not None and current[0] != holder and current[1] > time.monotonic():
            return False
        self._leases[url] = (holder, time.monotonic() + ttl_s)
        return True

    async def renew_instance(self, url: str, holder: str, ttl_s: float) -> bool:
        current = self._leases.get(url)
        if current is None or current[0] != holder:
            return False
        self._leases[url] = (holder, time.monotonic() + ttl_s)
        return True

    async def release_instance(self, url: str, holder: str) -> None:
        if self._leases.get(url, ("",))[0] == holder:
            del self._leases[url]

    async def aclose(self) -> None:
        await self._run(self._db.close)
