"""Prometheus counters of one instance, rendered as text for ``GET /metrics``."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Upper bounds of the execution-time histogram, in seconds.
EXECUTION_BUCKETS_S: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass
class ExecutionMetrics:
    """What the worker counts; the queue gauges are read live at render time."""

    completed_total: int = 0
    failed_total: int = 0
    interrupted_total: int = 0
    rejected_total: int = 0
    execution_seconds_sum: float = 0.0
    bucket_counts: list[int] = field(default_factory=lambda: [0] * len(EXECUTION_BUCKETS_S))

    @property
    def execution_count(self) -> int:
        return self.completed_total + self.failed_total

    def observe(self, seconds: float, *, success: bool, interrupted: bool) -> None:
        if success:
            self.completed_total += 1
        else:
            self.failed_total += 1
        if interrupted:
            self.interrupted_total += 1
        self.execution_seconds_sum += seconds
        index = bisect.bisect_left(EXECUTION_BUCKETS_S, seconds)
        if index < len(self.bucket_counts):
            self.bucket_counts[index] += 1

    def render(self, *, pending: int, running: int, ready: bool, history_items: int) -> str:
        lines = [
            "# HELP comfyserve_queue_pending Prompts waiting in the queue.",
            "# TYPE comfyserve_queue_pending gauge",
            f"comfyserve_queue_pending {pending}",
            "# HELP comfyserve_queue_running Prompts executing right now.",
            "# TYPE comfyserve_queue_running gauge",
            f"comfyserve_queue_running {running}",
            "# HELP comfyserve_history_items Prompts kept in the history.",
            "# TYPE comfyserve_history_items gauge",
            f"comfyserve_history_items {history_items}",
            "# HELP comfyserve_ready 1 when the runtime is loaded and accepts prompts.",
            "# TYPE comfyserve_ready gauge",
            f"comfyserve_ready {1 if ready else 0}",
            "# HELP comfyserve_prompts_completed_total Prompts that executed successfully.",
            "# TYPE comfyserve_prompts_completed_total counter",
            f"comfyserve_prompts_completed_total {self.completed_total}",
            "# HELP comfyserve_prompts_failed_total Prompts that ended in an error or were interrupted.",
            "# TYPE comfyserve_prompts_failed_total counter",
            f"comfyserve_prompts_failed_total {self.failed_total}",
            "# HELP comfyserve_prompts_interrupted_total Prompts stopped by /interrupt.",
            "# TYPE comfyserve_prompts_interrupted_total counter",
            f"comfyserve_prompts_interrupted_total {self.interrupted_total}",
            "# HELP comfyserve_prompts_rejected_total Prompts refused at validation (HTTP 400).",
            "# TYPE comfyserve_prompts_rejected_total counter",
            f"comfyserve_prompts_rejected_total {self.rejected_total}",
            "# HELP comfyserve_execution_seconds Wall time of executed prompts.",
            "# TYPE comfyserve_execution_seconds histogram",
        ]
        cumulative = 0
        for bound, count in zip(EXECUTION_BUCKETS_S, self.bucket_counts):
            cumulative += count
            lines.append(f'comfyserve_execution_seconds_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f'comfyserve_execution_seconds_bucket{{le="+Inf"}} {self.execution_count}')
        lines.append(f"comfyserve_execution_seconds_sum {self.execution_seconds_sum:.6f}")
        lines.append(f"comfyserve_execution_seconds_count {self.execution_count}")
        return "\n".join(lines) + "\n"
