"""Running the standard edition's route handlers for one user.

The standard handlers (``/view``, ``/upload/*``, ``/userdata``, ``/settings``,
``/jobs``, ``GET /queue`` / ``/history`` ...) read their folders and queue
from ``request.app``. Each user gets a small, never-served application holding
their own ``WorkDirs`` (``DIR/users/<name>``), userdata root and a read-only
view of their tasks; :func:`scoped` runs a handler with ``request.app``
pointing at it. So the cluster serves exactly the standard edition's
behaviour, confined to the user's folders, without a copy of those handlers.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from standard.server import keys
from standard.server.userdata import setup_userdata

from .login import USER
from .store import DONE, PENDING, RUNNING, StateStore, Task

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class UserQueueView:
    """A user's tasks with the read methods of ``standard.server.prompt_queue.PromptQueue``."""

    def __init__(self, running: list[Task], pending: list[Task], done: list[Task]) -> None:
        self._running, self._pending = running, pending
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

    def times_ms(self, prompt_id: str) -> tuple[int, int] | None:
        task = self._history.get(prompt_id)
        if task is None or task.started_ms is None or task.ended_ms is None:
            return None
        return task.started_ms, task.ended_ms


class ScopeServer:
    """Stands in for the standard ``PromptServer`` in the reused handlers."""

    def __init__(self, queue: UserQueueView | None = None) -> None:
        self.upload_lock = asyncio.Lock()
        self.registry = None
        self.queue = queue
        self.sockets: dict[str, Any] = {}

    def queue_info(self) -> dict[str, Any]:
        remaining = self.queue.tasks_remaining() if self.queue is not None else 0
        return {"exec_info": {"queue_remaining": remaining}}


class Scopes:
    """One scope app per user (created on first use), plus the public one (``DIR/input`` reads)."""

    def __init__(self, main_app: web.Application, store: StateStore,
                 workdirs_of: Callable[[str], Any]) -> None:
        self._main = main_app
        self._store = store
        self._workdirs_of = workdirs_of
        self._apps: dict[str, web.Application] = {}
        self.public = self._new_app(main_app[keys.WORKDIRS], userdata=False)

    def _new_app(self, workdirs: Any, *, userdata: bool = True) -> web.Application:
        app = web.Application()
        app[keys.SETTINGS] = self._main[keys.SETTINGS]
        app[keys.DATA_DIR] = self._main[keys.DATA_DIR]
        app[keys.WORKDIRS] = workdirs
        app[keys.PROMPT_SERVER] = ScopeServer()
        if userdata:
            setup_userdata(app)  # sets the userdata root and settings store (its routes stay unused)
        return app

    def app_for(self, user: str) -> web.Application:
        app, workdirs = self._apps.get(user), self._workdirs_of(user)
        if app is None or app[keys.WORKDIRS] is not workdirs:  # new, or the name's files were moved aside
            app = self._apps[user] = self._new_app(workdirs)
        return app

    async def queue_app_for(self, user: str) -> web.Application:
        """A throw-away scope whose ``PROMPT_SERVER.queue`` is a snapshot of the user's tasks."""
        base = self.app_for(user)
        app = web.Application()
        for key in (keys.SETTINGS, keys.DATA_DIR, keys.WORKDIRS):
            app[key] = base[key]
        app[keys.PROMPT_SERVER] = ScopeServer(await UserQueueView.load(self._store, user))
        return app


async def call_in(app: web.Application, handler: Handler, request: web.Request) -> web.StreamResponse:
    """Run ``handler`` with ``request.app`` being ``app``."""
    match_info = request.match_info
    previous = match_info.current_app
    match_info.current_app = app
    try:
        return await handler(request)
    finally:
        match_info.current_app = previous


def scoped(scopes: Scopes, handler: Handler, *, with_queue: bool = False) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        user = request[USER].name
        app = await scopes.queue_app_for(user) if with_queue else scopes.app_for(user)
        return await call_in(app, handler, request)

    wrapped.__name__ = getattr(handler, "__name__", "scoped")
    wrapped.__doc__ = handler.__doc__
    return wrapped
