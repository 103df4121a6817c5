"""The API edition: ``/api_prompt`` front -> input queue -> one worker per instance -> sink queue."""

from .app import Pool, create_api_app, running
from .settings import ApiSettings, WorkerSettings
from .worker import Worker

__all__ = ["ApiSettings", "Pool", "Worker", "WorkerSettings", "create_api_app", "running"]
