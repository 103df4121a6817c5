"""The real-ComfyUI instance's metrics: what the proxy relayed, and the backend's health."""

from __future__ import annotations

from ..metrics import Metrics
from .journal import PromptJournal
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

    def follow(self, journal: PromptJournal) -> None:
        """The journal's counts (a front with a state file)."""
        self.gauge("comfyserve_backend_journal_socket_up",
                   "1 while the journal's WebSocket to ComfyUI is open (how it knows ComfyUI did not restart).",
                   read=lambda: 1.0 if journal.continuity.up else 0.0)
        self.counter_read("comfyserve_backend_journal_epochs_total",
                          "Times the journal lost sight of ComfyUI (its socket closed, a request failed, the "
                          "supervised child started again): what ComfyUI no longer holds from before is "
                          "taken for forgotten.", lambda: journal.continuity.epoch)
        self.counter_read("comfyserve_backend_journal_requeued_total",
                          "Prompts ComfyUI forgot in a restart, queued again by the journal.",
                          lambda: journal.requeued)
        self.counter_read("comfyserve_backend_journal_trimmed_total",
                          "Prompts that finished in ComfyUI whose history entry it no longer held (its history "
                          "is bounded) when the journal looked: not stored, not run again.",
                          lambda: journal.trimmed)
