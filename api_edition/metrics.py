"""The API edition's metrics (front + its workers, or one split-deployment worker) for ``GET /metrics``."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from standard.metrics import Metrics


class WorkerMetrics:
    """One worker's series (labelled with its name) in the registry it shares with the front."""

    def __init__(self, metrics: ApiMetrics, name: str) -> None:
        self.in_flight: Gauge = metrics.in_flight.labels(worker=name)
        self.instance_up: Gauge = metrics.instance_up.labels(worker=name)
        self.succeeded: Counter = metrics.tasks.labels(worker=name, status="success")
        self.errors: Counter = metrics.tasks.labels(worker=name, status="error")
        self.failures: Counter = metrics.failures.labels(worker=name)
        self.redeliveries: Counter = metrics.redeliveries.labels(worker=name)
        self.abandoned: Counter = metrics.abandoned.labels(worker=name)
        self.task_seconds: Histogram = metrics.task_seconds.labels(worker=name)

    def finished(self, status: str, seconds: float) -> None:
        """A result went on the sink."""
        self.task_seconds.observe(seconds)
        if status == "success":
            self.succeeded.inc()
        else:
            self.errors.inc()
            self.failures.inc()


class ApiMetrics(Metrics):
    def __init__(self) -> None:
        super().__init__()
        self.queue_length = self.gauge("comfyserve_api_queue_length", "Items in the input and sink queues.",
                                       ["queue"])
        self.accepted = self.counter("comfyserve_api_tasks_accepted_total", "Tasks /api_prompt put on the input queue.")
        self.refused = self.counter("comfyserve_api_tasks_refused_total", "Requests /api_prompt refused, by reason.",
                                    ["reason"])
        self.in_flight = self.gauge("comfyserve_api_worker_tasks_in_flight", "Tasks a worker is running now (0 or 1).",
                                    ["worker"])
        self.instance_up = self.gauge("comfyserve_api_worker_instance_up",
                                      "1 while the worker's instance is reachable.",
                                      ["worker"])
        self.tasks = self.counter("comfyserve_api_worker_tasks_total", "Results a worker put on the sink, by status.",
                                  ["worker", "status"])
        self.task_seconds = self.histogram("comfyserve_api_worker_task_seconds",
                                           "Seconds a worker spent on a task, from taking it to its result.",
                                           ["worker"])
        self.failures = self.counter("comfyserve_api_worker_failures_total", "Tasks that ended in an error result.",
                                     ["worker"])
        self.redeliveries = self.counter("comfyserve_api_worker_redeliveries_total",
                                         "Input items seen again (already reported: committed without running).",
                                         ["worker"])
        self.abandoned = self.counter("comfyserve_api_worker_tasks_abandoned_total",
                                      "Tasks reported as too_many_attempts instead of being run again.", ["worker"])
        self.webhook_failures = self.counter(
            "comfyserve_api_webhook_failures_total",
            "Webhooks given up after all retries, or refused by --webhook-allow / the default policy.")
        self.workers: dict[str, WorkerMetrics] = {}

    def worker(self, name: str) -> WorkerMetrics:
        if name not in self.workers:
            self.workers[name] = WorkerMetrics(self, name)
        return self.workers[name]

    def set_depths(self, depths: dict[str, int]) -> None:
        """The queue lengths, read (over the network) just before a scrape."""
        self.queue_length.clear()
        for queue, length in depths.items():
            self.queue_length.labels(queue=queue).set(length)
