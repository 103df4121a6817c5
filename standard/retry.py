"""One retry policy for every call that is tried again: ``RetryPolicy``, on tenacity.

A policy says how many tries a call gets (``attempts``; None: until it succeeds),
how long the first and the longest wait are, and which errors are worth another
try (``retry_on``: exception types or a predicate); any other error is final and
raised at once. After the last try the last error is raised as it was.

Waits double from ``initial_s`` up to ``max_s``, each drawn at random from the
upper half of its step ("equal jitter": tenacity's ``wait_exponential`` for the
half that is sure plus ``wait_random_exponential`` for the half that is drawn).
So callers that failed together, such as every worker when the queue restarts,
spread out instead of retrying in lock step, and still back off.

An error that carries ``retry_after_s`` (``RetryLater``, set from an HTTP
``Retry-After`` header through ``retry_after_s()``) waits as long as the server
asked, but never longer than ``retry_after_max_s``, when the policy sets one.

``pause`` is how a wait is spent: ``asyncio.sleep`` / ``time.sleep`` unless a
caller passes another one. Tests pass one that records the delay and returns
at once, so they need not wait out real backoff and can check the delays asked for.

Loops that never give up (reconnects, restarts) and cannot be one call use the
same policy through ``delay_s`` / ``wait`` so their pacing is the same too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import tenacity

from .errors import ComfyServeError

__all__ = ["INSTANCE", "QUEUE", "RECONNECT", "RESTART", "STORAGE", "WEBHOOK", "RetryLater", "RetryPolicy",
           "retry_after_s"]

T = TypeVar("T")
Pause = Callable[[float], object]  # returns None, or an awaitable the async callers await
RetryOn = tuple[type[BaseException], ...] | Callable[[BaseException], bool]


class RetryLater(ComfyServeError):
    """Raised inside a retried call: this try failed in a way another try may fix.

    ``retry_after_s`` is how long the other side asked us to wait (HTTP ``Retry-After``), if it did.
    """

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class RetryPolicy:
    """How a failing call is tried again; see the module docstring. ``but(...)`` makes a variant."""

    attempts: int | None  # tries in all, the first included; None: until it succeeds
    initial_s: float  # the first wait's step (waits are drawn in [step/2, step])
    max_s: float  # the largest step
    retry_on: RetryOn = (Exception,)
    retry_after_max_s: float | None = None  # honour ``retry_after_s`` of an error, up to this; None: ignore it
    pause: Pause | None = None  # how a wait is spent; None: asyncio.sleep / time.sleep
    level: int = logging.WARNING  # the level each retry is logged at

    def but(self, **changes: Any) -> RetryPolicy:
        return dataclasses.replace(self, **changes)

    def retries(self, error: BaseException) -> bool:
        """Is ``error`` worth another try (leaving aside how many are left)?"""
        if isinstance(self.retry_on, tuple):
            return isinstance(error, self.retry_on)
        return self.retry_on(error)

    def delay_s(self, failures: int, error: BaseException | None = None) -> float:
        """The wait after ``failures`` failed tries in a row (1: after the first), ``error`` the last one."""
        asked = getattr(error, "retry_after_s", None)
        if asked is not None and self.retry_after_max_s is not None:
            return min(max(float(asked), 0.0), self.retry_after_max_s)
        state = tenacity.RetryCallState(cast(Any, None), None, (), {})
        state.attempt_number = max(failures, 1)
        return float(self._jitter(state))

    @property
    def _jitter(self) -> tenacity.wait.wait_base:
        half, cap = self.initial_s / 2, self.max_s / 2
        return tenacity.wait_exponential(multiplier=half, max=cap) + tenacity.wait_random_exponential(
            multiplier=half, max=cap)

    async def wait(self, failures: int, error: BaseException | None = None) -> float:
        """Spend the wait after ``failures`` failed tries (for loops that are not one call); returns it."""
        delay = self.delay_s(failures, error)
        await self._pause_async(delay)
        return delay

    async def call(self, fn: Callable[[], Awaitable[T]], *, what: str, log: logging.Logger) -> T:
        """``await fn()`` until it succeeds, an error is final, or the tries run out (then its error)."""
        async def attempt() -> T:  # tenacity awaits only what is a coroutine function itself, not a lambda
            return await fn()

        retrying = tenacity.AsyncRetrying(sleep=self._pause_async, **self._tenacity(what, log))
        return await retrying(attempt)

    def call_sync(self, fn: Callable[[], T], *, what: str, log: logging.Logger) -> T:
        """``fn()`` likewise, blocking (for worker threads, never the event loop)."""
        sleep = cast(Callable[[float], None], self.pause or time.sleep)
        return tenacity.Retrying(sleep=sleep, **self._tenacity(what, log))(fn)

    async def _pause_async(self, seconds: float) -> None:
        result = (self.pause or asyncio.sleep)(seconds)
        if inspect.isawaitable(result):
            await result

    def _tenacity(self, what: str, log: logging.Logger) -> dict[str, Any]:
        def wait(state: tenacity.RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome is not None else None
            return self.delay_s(state.attempt_number, error)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome is not None else None
            tries = "" if self.attempts is None else f"/{self.attempts}"
            log.log(self.level, "%s failed (%s); try %d%s in %.2fs", what, _short(error),
                    state.attempt_number + 1, tries, state.upcoming_sleep)

        stop = tenacity.stop_never if self.attempts is None else tenacity.stop_after_attempt(self.attempts)
        return {"stop": stop, "wait": wait, "retry": tenacity.retry_if_exception(self.retries),
                "before_sleep": before_sleep, "reraise": True}


def retry_after_s(value: str | None, *, now: datetime | None = None) -> float | None:
    """The seconds an HTTP ``Retry-After`` value asks for: delta-seconds or an HTTP-date.

    None when there is none or it cannot be read; a date in the past is 0.
    """
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _short(error: BaseException | None) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= 200 else text[:200] + "..."


# -- the presets: each names what it is for --------------------------------------------------------

INSTANCE = RetryPolicy(attempts=3, initial_s=0.05, max_s=2.0)
"""A ComfyUI instance's idempotent GETs (``InstanceClient``, which sets attempts and waits from its timeouts)."""

QUEUE = RetryPolicy(attempts=None, initial_s=0.05, max_s=2.0)
"""A worker's calls to the queue (sink lookup, result put): until it works; ``but(attempts=5)`` for the rest."""

RECONNECT = RetryPolicy(attempts=None, initial_s=0.05, max_s=2.0, level=logging.INFO)
"""Sockets that reopen until closed (the queue watch, an instance's events)."""

STORAGE = RetryPolicy(attempts=4, initial_s=0.2, max_s=5.0)
"""Object-storage requests (5xx, 429, timeouts, dropped connections)."""

WEBHOOK = RetryPolicy(attempts=5, initial_s=0.5, max_s=8.0, retry_after_max_s=60.0, level=logging.INFO)
"""Webhook deliveries: a receiver's ``Retry-After`` is honoured, up to a minute."""

RESTART = RetryPolicy(attempts=None, initial_s=0.5, max_s=30.0)
"""A supervised child that died (``standard.supervised``): started again until it is stopped."""
