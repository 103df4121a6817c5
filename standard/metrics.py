"""Prometheus metrics of every role, through ``prometheus_client``: one way to declare and serve them.

Each app owns a ``Metrics`` with its own ``CollectorRegistry``, never the library's global one:
tests and the API edition run several apps (and workers) in one process, and two apps must
neither share a series nor clash over a name. Counters are declared by their exposed
``..._total`` name so that a grep finds them; the library keeps that name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

# No ``*_created`` series beside each counter: a scrape shows the counts and nothing else.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated

# Seconds, for run times and waits: a 10 ms API round trip up to a 15-minute workflow.
LATENCY_BUCKETS_S: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)


class Metrics:
    """One app's metrics; ``response()`` is what its ``GET /metrics`` returns."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(name, doc, labels, registry=self.registry)

    def gauge(self, name: str, doc: str, labels: Sequence[str] = (), *,
              read: Callable[[], float] | None = None) -> Gauge:
        """A gauge; with ``read`` it is read at scrape time (it must be quick and never block)."""
        gauge = Gauge(name, doc, labels, registry=self.registry)
        if read is not None:
            gauge.set_function(read)
        return gauge

    def histogram(self, name: str, doc: str, labels: Sequence[str] = (),
                  buckets: Sequence[float] = LATENCY_BUCKETS_S) -> Histogram:
        return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

    def counter_read(self, name: str, doc: str, read: Callable[[], float | None]) -> None:
        """A count kept by someone else (e.g. a supervisor's crash count), read at scrape time; None: absent."""
        self.registry.register(_ReadCounter(name, doc, read))

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 when it has none yet), for code that decides on a count."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def response(self) -> web.Response:
        """The text exposition; everything it reads is in memory, so it never waits."""
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


class _ReadCounter(Collector):
    def __init__(self, name: str, doc: str, read: Callable[[], float | None]) -> None:
        self.name, self.doc, self.read = name.removesuffix("_total"), doc, read

    def collect(self) -> Iterator[Metric]:
        value = self.read()
        if value is not None:
            yield CounterMetricFamily(self.name, self.doc, value=value)

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.doc)
