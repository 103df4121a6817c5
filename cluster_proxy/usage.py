"""Who uses the pool: tasks and instance-seconds per user over a period (admins only).

Each finished task leaves a ``Usage`` record in the state store (kept apart from the history,
which users may delete), so the admin page and ``GET /cluster/usage`` sum any period. ``/metrics``
(admins' API token) counts the same per user since this proxy started, for Prometheus's
``increase()`` over any window.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass
from typing import Any

from standard.errors import RequestError
from standard.metrics import Metrics

from .store import StateStore, Task, Usage

DAY_MS = 24 * 3600 * 1000
DEFAULT_DAYS = 7
MAX_DAYS = 3660


class PeriodError(RequestError):
    """A period the admin gave that cannot be read."""


@dataclass(frozen=True)
class Period:
    since_ms: int
    until_ms: int

    @property
    def label(self) -> str:
        day = "%Y-%m-%d"
        return (f"{time.strftime(day, time.gmtime(self.since_ms / 1000))} to "
                f"{time.strftime(day, time.gmtime((self.until_ms - 1) / 1000))} (UTC)")


def _day_ms(text: str) -> int:
    try:
        return calendar.timegm(time.strptime(text, "%Y-%m-%d")) * 1000
    except (ValueError, OverflowError):
        raise PeriodError(f"a date is YYYY-MM-DD, got {text[:40]!r}") from None


def parse_period(query: Any, now_ms: int | None = None) -> Period:
    """``?days=N`` (the last N days, default 7) or ``?since=YYYY-MM-DD&until=YYYY-MM-DD`` (whole UTC days)."""
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    since, until = query.get("since"), query.get("until")
    if since or until:
        since_ms = _day_ms(str(since)) if since else now_ms - DEFAULT_DAYS * DAY_MS
        until_ms = _day_ms(str(until)) + DAY_MS if until else now_ms
        if until_ms <= since_ms or until_ms - since_ms > MAX_DAYS * DAY_MS:
            raise PeriodError("the period must end after it starts and span at most 3660 days")
        return Period(since_ms, until_ms)
    raw = query.get("days") or str(DEFAULT_DAYS)
    if not str(raw).isdigit() or not 1 <= int(raw) <= MAX_DAYS:
        raise PeriodError(f"days is a whole number from 1 to {MAX_DAYS}")
    return Period(now_ms - int(raw) * DAY_MS, now_ms + 1)


def summarize(records: list[Usage]) -> list[dict[str, Any]]:
    """Per user, most instance time first: tasks, of which failed, and instance-seconds."""
    per_user: dict[str, dict[str, Any]] = {}
    for record in records:
        row = per_user.setdefault(record.user, {"user": record.user, "tasks": 0, "failed": 0, "instance_ms": 0})
        row["tasks"] += 1
        row["failed"] += record.status != "success"
        row["instance_ms"] += record.instance_ms
    rows = [{"user": r["user"], "tasks": r["tasks"], "failed": r["failed"],
             "instance_seconds": round(r["instance_ms"] / 1000, 1)} for r in per_user.values()]
    return sorted(rows, key=lambda r: (-r["instance_seconds"], r["user"]))


class UsageMeter:
    """Records each finished task's usage in the store and counts it on ``/metrics``."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.metrics = Metrics()
        self._tasks = self.metrics.counter("comfyserve_cluster_user_tasks_total",
                                           "Tasks finished on the pool, per user and status", ("user", "status"))
        self._seconds = self.metrics.counter("comfyserve_cluster_user_instance_seconds_total",
                                             "Instance time used by finished tasks, per user", ("user",))

    async def record(self, task: Task) -> None:
        """Count a task ``store.finish`` returned on ``/metrics`` (the finish wrote its usage record too)."""
        usage = Usage.of(task)
        self._tasks.labels(usage.user, usage.status).inc()
        self._seconds.labels(usage.user).inc(usage.instance_ms / 1000)

    async def report(self, period: Period) -> dict[str, Any]:
        return {"since_ms": period.since_ms, "until_ms": period.until_ms, "period": period.label,
                "users": summarize(await self.store.usage(period.since_ms, period.until_ms))}
