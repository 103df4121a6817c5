"""Typed keys for state shared across the instance app's route modules."""

from __future__ import annotations

from aiohttp import web

from ..datadir import DataDir, WorkDirs
from ..settings import StandardSettings
from .prompt_server import PromptServer

SETTINGS = web.AppKey("settings", StandardSettings)
DATA_DIR = web.AppKey("data_dir", DataDir)
WORKDIRS = web.AppKey("workdirs", WorkDirs)
PROMPT_SERVER = web.AppKey("prompt_server", PromptServer)  # queue, history, sockets, engine
