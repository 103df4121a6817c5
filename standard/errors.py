"""The project's error tree.

    ComfyServeError
     ├── PathOutsideRoot      a request path escaped its root (also ValueError)
     ├── PathTooLong          a request path is longer than the file system takes (also ValueError)
     ├── ConfigError          bad flags / environment
     └── InstanceError        talking to an instance failed (see standard.client)
          ├── InstanceUnavailable
          ├── PromptRejected  the instance answered 400 to /prompt
          └── PromptLost      a queued prompt vanished (the instance restarted)

Errors of libraries underneath are translated at the boundary with
``raise OurError(...) from exc``.
"""

from __future__ import annotations

from typing import Any


class ComfyServeError(Exception):
    """Root of every error comfyserve raises on purpose."""


class PathOutsideRoot(ComfyServeError, ValueError):
    """A filename, subfolder or userdata path would leave its root."""


class PathTooLong(ComfyServeError, ValueError):
    """A filename, subfolder or userdata path is longer than the file system allows (answered 400)."""


class ConfigError(ComfyServeError):
    """The command line or environment asks for something impossible."""


class InstanceError(ComfyServeError):
    """Talking to a ComfyUI-protocol instance failed."""


class InstanceUnavailable(InstanceError):
    """The instance could not be reached (connection refused, timeout, 5xx)."""


class PromptRejected(InstanceError):
    """The instance refused a prompt (HTTP 400); ``body`` is ComfyUI's error JSON."""

    def __init__(self, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.body = body or {}


class PromptLost(InstanceError):
    """A submitted prompt is neither queued, running nor in history: the instance lost it."""
