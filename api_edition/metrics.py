"""Prometheus counters of the API edition (front + in-process workers), rendered for ``GET /metrics``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class WorkerStats:
    in_flight: int = 0
    succeeded: int = 0
    failed: int = 0
    redeliveries: int = 0
    abandoned: int = 0  # not run again: cut off mid-run max_attempts times
    task_seconds_sum: float = 0.0
    instance_up: bool = False


@dataclass
class ApiMetrics:
    accepted_total: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # reason -> count
    webhook_failures_total: int = 0
    workers: dict[str, WorkerStats] = field(default_factory=dict)

    def worker(self, name: str) -> WorkerStats:
        return self.workers.setdefault(name, WorkerStats())

    def render(self, depths: dict[str, int]) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {value:g}" for labels, value in samples)

        def lab(**labels: str) -> str:
            inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            return "{" + inner + "}" if inner else ""

        workers = sorted(self.workers.items())
        metric("comfyserve_api_queue_length", "gauge", "Items in the input and sink queues.",
               [(lab(queue=q), n) for q, n in sorted(depths.items())])
        metric("comfyserve_api_tasks_accepted_total", "counter", "Tasks /api_prompt put on the input queue.",
               [("", self.accepted_total)])
        metric("comfyserve_api_tasks_refused_total", "counter", "Requests /api_prompt refused, by reason.",
               [(lab(reason=r), n) for r, n in sorted(self.refused.items())])
        metric("comfyserve_api_worker_tasks_in_flight", "gauge", "Tasks a worker is running now (0 or 1).",
               [(lab(worker=w), s.in_flight) for w, s in workers])
        metric("comfyserve_api_worker_instance_up", "gauge", "1 while the worker's instance is reachable.",
               [(lab(worker=w), int(s.instance_up)) for w, s in workers])
        metric("comfyserve_api_worker_tasks_total", "counter", "Results a worker put on the sink, by status.",
               [(lab(worker=w, status=st), n) for w, s in workers
                for st, n in (("success", s.succeeded), ("error", s.failed))])
        metric("comfyserve_api_worker_task_seconds_sum", "counter", "Seconds spent running tasks.",
               [(lab(worker=w), s.task_seconds_sum) for w, s in workers])
        metric("comfyserve_api_worker_task_seconds_count", "counter", "Tasks timed.",
               [(lab(worker=w), s.succeeded + s.failed) for w, s in workers])
        metric("comfyserve_api_worker_failures_total", "counter", "Tasks that ended in an error result.",
               [(lab(worker=w), s.failed) for w, s in workers])
        metric("comfyserve_api_worker_redeliveries_total", "counter",
               "Input items seen again (already reported: committed without running).",
               [(lab(worker=w), s.redeliveries) for w, s in workers])
        metric("comfyserve_api_worker_tasks_abandoned_total", "counter",
               "Tasks reported as too_many_attempts instead of being run again.",
               [(lab(worker=w), s.abandoned) for w, s in workers])
        metric("comfyserve_api_webhook_failures_total", "counter",
               "Webhooks given up after all retries, or refused by --webhook-allow / the default policy.",
               [("", self.webhook_failures_total)])
        return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
