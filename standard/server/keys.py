"""Typed keys for state shared across the instance app's route modules."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..datadir import DataDir, WorkDirs
from ..settings import StandardSettings

if TYPE_CHECKING:  # pragma: no cover
    pass

SETTINGS = web.AppKey("settings", StandardSettings)
DATA_DIR = web.AppKey("data_dir", DataDir)
WORKDIRS = web.AppKey("workdirs", WorkDirs)
# The PromptServer (standard.server.prompt_server): queue, history, sockets, engine.
PROMPT_SERVER: web.AppKey[Any] = web.AppKey("prompt_server", object)
