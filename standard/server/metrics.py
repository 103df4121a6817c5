"""The embedded instance's metrics for ``GET /metrics``; the queue gauges are read at scrape time."""

from __future__ import annotations

from collections.abc import Callable

from ..metrics import Metrics
from .prompt_queue import PromptQueue


class ExecutionMetrics(Metrics):
    """What the worker counts and times, plus live views of the queue and the engine."""

    def __init__(self, queue: PromptQueue, ready: Callable[[], bool]) -> None:
        super().__init__()
        self.gauge("comfyserve_queue_pending", "Prompts waiting in the queue.", read=lambda: len(queue.pending()))
        self.gauge("comfyserve_queue_running", "Prompts executing right now.", read=lambda: len(queue.running()))
        self.gauge("comfyserve_history_items", "Prompts kept in the history.", read=queue.history_size)
        self.gauge("comfyserve_ready", "1 when the runtime is loaded and accepts prompts.",
                   read=lambda: 1 if ready() else 0)
        self.completed = self.counter("comfyserve_prompts_completed_total", "Prompts that executed successfully.")
        self.failed = self.counter("comfyserve_prompts_failed_total",
                                   "Prompts that ended in an error or were interrupted.")
        self.interrupted = self.counter("comfyserve_prompts_interrupted_total", "Prompts stopped by /interrupt.")
        self.rejected = self.counter("comfyserve_prompts_rejected_total", "Prompts refused at validation (HTTP 400).")
        self.execution = self.histogram("comfyserve_execution_seconds", "Wall time of executed prompts.")
        self.queue_wait = self.histogram("comfyserve_queue_wait_seconds",
                                         "Time prompts waited in the queue before they started.")

    def observe(self, seconds: float, *, success: bool, interrupted: bool) -> None:
        (self.completed if success else self.failed).inc()
        if interrupted:
            self.interrupted.inc()
        self.execution.observe(seconds)
