"""``create_app(settings)``: the standard edition's app for the runtime the settings choose.

The embedded engine by default; the real-ComfyUI front (``standard.backend``)
when ``--comfyui-dir`` or ``--backend-url`` is given.
"""

from __future__ import annotations

from aiohttp import web

from .errors import ConfigError
from .settings import StandardSettings


def create_app(settings: StandardSettings) -> web.Application:
    if settings.backend_url or settings.comfyui_dir:
        try:
            from .backend.app import create_backend_app
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("standard.backend"):
                raise ConfigError("the real-ComfyUI runtime is not available in this build") from exc
            raise
        return create_backend_app(settings)
    from .server.app import create_embedded_app

    return create_embedded_app(settings)
