"""The real-ComfyUI instance's metrics: what the proxy relayed, and the backend's health."""

from __future__ import annotations

from ..metrics import Metrics
from .runtime import Backend
from .supervisor import ComfyUIChild


class BackendMetrics(Metrics):
    """Counted by both proxy paths (aiohttp's and the fast path); ``ready`` is set by each scrape."""

    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self.ready = self.gauge("comfyserve_ready", "1 when the ComfyUI backend answers.")
        self.requests = self.counter("comfyserve_proxied_requests_total", "HTTP requests relayed to ComfyUI.")
        self.websockets = self.counter("comfyserve_proxied_websockets_total", "WebSockets relayed to ComfyUI.")
        self.errors = self.counter("comfyserve_backend_errors_total",
                                   "Requests answered 502/503 because ComfyUI could not be reached.")
        if isinstance(backend, ComfyUIChild):
            self.counter_read("comfyserve_backend_crashes_total", "Times the supervised ComfyUI child died.",
                              lambda: backend.crashes)
