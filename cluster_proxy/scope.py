"""Serving the standard edition's route handlers to one user.

The standard handlers (``/view``, ``/upload/*``, ``/userdata``, ``/settings``,
``/jobs``, ``GET /queue`` / ``/history`` ...) read their folders and queue through
``standard.server.context.instance_context``. :func:`scope_middleware` puts the
logged-in user's :class:`UserScope` on the request: their own ``WorkDirs``
(``DIR/users/<name>``), userdata folder and settings file; the routes that read
the queue see a read-only view of the user's tasks (:func:`scoped`). So the cluster
serves exactly the standard edition's behaviour, confined to the user's folders,
without a copy of those handlers. The cluster app itself holds no instance state:
a request that reached a shared handler without a scope fails instead of reading
``DIR``.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from standard.datadir import DataDir, WorkDirs
from standard.server.context import SCOPE, InstanceContext, SettingsFile
from standard.server.userdata import open_userdata
from standard.settings import StandardSettings

from .login import USER
from .store import DONE, PENDING, RUNNING, StateStore, Task

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class UserQueueView:
    """A user's tasks with the read methods of ``standard.server.prompt_queue.PromptQueue``."""

    def __init__(self, running: list[Task], pending: list[Task], done: list[Task]) -> None:
        # A task queued ahead on an instance (--prefetch) waits: first of the pending ones.
        self._running = [t for t in running if not t.queued_ahead]
        self._pending = [t for t in running if t.queued_ahead] + pending
        self._history = {t.prompt_id: t for t in done}

    @classmethod
    async def load(cls, store: StateStore, user: str) -> UserQueueView:
        running, pending, done = await asyncio.gather(
            store.user_tasks(user, RUNNING), store.user_tasks(user, PENDING), store.user_tasks(user, DONE))
        return cls(running, pending, done)

    def current_queue(self) -> tuple[list[list[Any]], list[list[Any]]]:
        return ([copy.deepcopy(t.public()) for t in self._running], [copy.deepcopy(t.public()) for t in self._pending])

    def tasks_remaining(self) -> int:
        return len(self._running) + len(self._pending)

    def contains(self, prompt_id: str) -> bool:
        return any(t.prompt_id == prompt_id for t in [*self._running, *self._pending])

    def get_history(self, prompt_id: str | None = None, *, max_items: int | None = None,
                    offset: int = -1) -> dict[str, Any]:
        if prompt_id is not None:
            task = self._history.get(prompt_id)
            return {} if task is None else {prompt_id: task.history_entry()}
        ids = list(self._history)
        if offset < 0 and max_items is not None:
            offset = len(ids) - max_items
        ids = ids[max(offset, 0):]
        if max_items is not None:
            ids = ids[:max_items]
        return {pid: self._history[pid].history_entry() for pid in ids}

    def history_entries(self) -> dict[str, dict[str, Any]]:
        return {pid: task.history_entry() for pid, task in self._history.items()}

    def history_json(self, history: dict[str, Any]) -> str:
        return json.dumps(history)

    def times_ms(self, prompt_id: str) -> tuple[int, int] | None:
        task = self._history.get(prompt_id)
        if task is None or task.started_ms is None or task.ended_ms is None:
            return None
        return task.started_ms, task.ended_ms


@dataclass
class ScopeServer:
    """Stands in for the standard ``PromptServer`` in the shared handlers (``context.ServerView``)."""

    queue: UserQueueView = field(default_factory=lambda: UserQueueView([], [], []))  # see Scopes.with_queue
    upload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    registry: Any = None  # no engine here: /object_info and friends come from the pool

    def queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self.queue.tasks_remaining()}}


@dataclass(frozen=True)
class UserScope:
    """One user's :class:`~standard.server.context.InstanceContext`."""

    settings: StandardSettings
    data_dir: DataDir
    workdirs: WorkDirs
    server: ScopeServer
    user_root: Path
    user_settings: SettingsFile


class Scopes:
    """One scope per user, created on first use (and again when the user's files were moved aside)."""

    def __init__(self, settings: StandardSettings, data_dir: DataDir, store: StateStore,
                 workdirs_of: Callable[[str], WorkDirs]) -> None:
        self._settings, self._data_dir = settings, data_dir
        self._store = store
        self._workdirs_of = workdirs_of
        self._public = data_dir.workdirs()
        self._scopes: dict[str, UserScope] = {}

    def for_user(self, user: str) -> UserScope:
        scope, workdirs = self._scopes.get(user), self._workdirs_of(user)
        if scope is None or scope.workdirs is not workdirs:  # new, or the name's files were moved aside
            user_root, user_settings = open_userdata(workdirs)
            scope = self._scopes[user] = UserScope(self._settings, self._data_dir, workdirs, ScopeServer(),
                                                   user_root, user_settings)
        return scope

    async def with_queue(self, user: str) -> UserScope:
        """The user's scope whose ``server.queue`` is a snapshot of their tasks (for one request)."""
        scope, queue = self.for_user(user), await UserQueueView.load(self._store, user)
        return replace(scope, server=replace(scope.server, queue=queue))

    def public(self, user: str) -> UserScope:
        """The user's scope over the public ``DIR`` folders (``/view``'s read-only input fallback)."""
        return replace(self.for_user(user), workdirs=self._public)


def scope_middleware(scopes: Scopes) -> Middleware:
    """Every request of a logged-in user runs in their scope (installed after the login middleware)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        user = request.get(USER)
        if user is not None:
            request[SCOPE] = scopes.for_user(user.name)
        return await handler(request)

    return middleware


async def call_in(scope: InstanceContext, handler: Handler, request: web.Request) -> web.StreamResponse:
    """Run ``handler`` in ``scope`` instead of the request's own."""
    previous = request.get(SCOPE)
    request[SCOPE] = scope
    try:
        return await handler(request)
    finally:
        if previous is None:
            del request[SCOPE]
        else:
            request[SCOPE] = previous


def scoped(scopes: Scopes, handler: Handler, *, with_queue: bool = False) -> Handler:
    """``handler`` as the cluster serves it: in the user's scope, over a snapshot of their tasks if ``with_queue``."""
    if not with_queue:
        return handler  # scope_middleware has set the scope

    async def wrapped(request: web.Request) -> web.StreamResponse:
        return await call_in(await scopes.with_queue(request[USER].name), handler, request)

    wrapped.__name__ = getattr(handler, "__name__", "scoped")
    wrapped.__doc__ = handler.__doc__
    return wrapped
