"""What the instance's route handlers read, and whose it is: :func:`instance_context`.

The handlers of files, userdata, ``/internal``, ``/jobs`` and the queue and history reads
take their settings, folders and prompt server from ``instance_context(request)``. On an
instance that is the app's own state. The cluster edition serves the same handlers to each
logged-in user confined to that user's folders: its middleware puts the user's
:class:`InstanceContext` on the request under :data:`SCOPE`, and the handlers never know.

Handlers that change the queue or drive the engine (``POST /prompt``, ``/interrupt``, ``/ws``
...) belong to the instance alone and take :func:`prompt_server`, which refuses a scoped
request, so no edition can run them against state that is not the instance's own.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from ..datadir import DataDir, WorkDirs
from ..settings import StandardSettings
from . import keys

if TYPE_CHECKING:  # pragma: no cover
    from .prompt_server import PromptServer


class QueueReads(Protocol):
    """The read side of ``prompt_queue.PromptQueue``: what /queue, /history and /jobs show."""

    def current_queue(self) -> tuple[list[list[Any]], list[list[Any]]]: ...

    def get_history(self, prompt_id: str | None = None, *, max_items: int | None = None,
                    offset: int = -1) -> dict[str, Any]: ...

    def history_entries(self) -> dict[str, dict[str, Any]]: ...

    def history_json(self, history: dict[str, Any]) -> str:
        """``history`` (from ``get_history``) as the JSON text /history answers."""

    def times_ms(self, prompt_id: str) -> tuple[int, int] | None: ...


class ServerView(Protocol):
    """What the shared handlers use of ``prompt_server.PromptServer``."""

    @property
    def upload_lock(self) -> asyncio.Lock:
        """Held while an upload picks its file name and writes it (two uploads never share a name)."""

    @property
    def registry(self) -> Any:
        """The engine's node registry, or None while no engine is loaded."""

    @property
    def queue(self) -> QueueReads: ...

    def queue_info(self) -> dict[str, Any]: ...


class SettingsFile(Protocol):
    """The frontend's settings file (``comfy.settings.json``); updates are read-modify-write."""

    async def read(self) -> dict[str, Any]: ...

    async def update(self, changes: dict[str, Any]) -> None: ...


class InstanceContext(Protocol):
    """Everything a shared handler reads: one instance's state, or one cluster user's."""

    @property
    def settings(self) -> StandardSettings: ...

    @property
    def data_dir(self) -> DataDir: ...

    @property
    def workdirs(self) -> WorkDirs: ...

    @property
    def server(self) -> ServerView: ...

    @property
    def user_root(self) -> Path:
        """The frontend's userdata folder (ComfyUI's ``default`` user), resolved."""

    @property
    def user_settings(self) -> SettingsFile: ...


SCOPE = web.RequestKey("instance_scope", InstanceContext)
# Set by ``userdata.setup_userdata`` on the instance app.
USER_ROOT = web.AppKey("userdata_root", Path)
USER_SETTINGS = web.AppKey("user_settings", SettingsFile)


class AppContext:
    """An instance app's own state, read from its keys when a handler asks."""

    def __init__(self, app: web.Application) -> None:
        self._app = app

    @property
    def settings(self) -> StandardSettings:
        return self._app[keys.SETTINGS]

    @property
    def data_dir(self) -> DataDir:
        return self._app[keys.DATA_DIR]

    @property
    def workdirs(self) -> WorkDirs:
        return self._app[keys.WORKDIRS]

    @property
    def server(self) -> ServerView:
        return self._app[keys.PROMPT_SERVER]

    @property
    def user_root(self) -> Path:
        return self._app[USER_ROOT]

    @property
    def user_settings(self) -> SettingsFile:
        return self._app[USER_SETTINGS]


def instance_context(request: web.Request) -> InstanceContext:
    """The scope a middleware set on ``request``, else the app's own state."""
    scope = request.get(SCOPE)
    return scope if scope is not None else AppContext(request.app)


def prompt_server(request: web.Request) -> PromptServer:
    """The instance's own prompt server, for handlers that change its queue or drive its engine."""
    if SCOPE in request:
        raise RuntimeError(f"{request.method} {request.path}: an instance-only handler was served in a scope")
    return request.app[keys.PROMPT_SERVER]
