"""The real-ComfyUI runtime: proxy HTTP and WS to a ComfyUI at a URL or in a supervised child."""

from .app import create_backend_app
from .runtime import Backend, RemoteBackend
from .supervisor import ComfyUIChild

__all__ = ["Backend", "ComfyUIChild", "RemoteBackend", "create_backend_app"]
