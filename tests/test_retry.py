"""``standard.retry``: the one retry policy — tries, final errors, jittered waits, Retry-After."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from standard.retry import QUEUE, RECONNECT, STORAGE, WEBHOOK, RetryLater, RetryPolicy, retry_after_s

log = logging.getLogger("test.retry")


class Flaky:
    """Fails with ``errors`` in turn, then answers ``"ok"``; counts its calls."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"

    async def async_call(self) -> str:
        return self()


async def test_retries_until_it_works_and_records_each_wait() -> None:
    waits: list[float] = []
    flaky = Flaky(ConnectionError("a"), ConnectionError("b"))
    policy = RetryPolicy(attempts=3, initial_s=0.1, max_s=1.0, pause=waits.append)
    assert await policy.call(flaky.async_call, what="x", log=log) == "ok"
    assert flaky.calls == 3 and len(waits) == 2


async def test_the_last_error_is_raised_as_it_was_when_the_tries_run_out() -> None:
    flaky = Flaky(*(ConnectionError(str(i)) for i in range(5)))
    policy = RetryPolicy(attempts=3, initial_s=0.1, max_s=1.0, pause=lambda s: None)
    with pytest.raises(ConnectionError, match="^2$"):
        await policy.call(flaky.async_call, what="x", log=log)
    assert flaky.calls == 3


def test_an_error_outside_retry_on_is_final_at_once() -> None:
    waits: list[float] = []
    flaky = Flaky(PermissionError("no"))
    policy = RetryPolicy(attempts=5, initial_s=0.1, max_s=1.0, retry_on=lambda e: not isinstance(e, PermissionError),
                         pause=waits.append)
    with pytest.raises(PermissionError):
        policy.call_sync(flaky, what="x", log=log)
    assert flaky.calls == 1 and waits == []


@pytest.mark.parametrize("policy", [QUEUE, RECONNECT, STORAGE, WEBHOOK])
def test_waits_are_jittered_within_the_upper_half_of_a_doubling_step(policy: RetryPolicy) -> None:
    for failures in range(1, 12):
        step = min(policy.initial_s * 2 ** (failures - 1), policy.max_s)
        draws = {policy.delay_s(failures) for _ in range(50)}
        assert all(step / 2 <= wait <= step for wait in draws)
        assert len(draws) > 1  # two callers failing together do not retry in lock step


def test_retry_after_replaces_the_drawn_wait_up_to_the_cap() -> None:
    assert WEBHOOK.delay_s(1, RetryLater("503", retry_after_s=3.0)) == 3.0
    assert WEBHOOK.delay_s(1, RetryLater("503", retry_after_s=1e6)) == WEBHOOK.retry_after_max_s
    assert QUEUE.delay_s(1, RetryLater("503", retry_after_s=30.0)) <= QUEUE.initial_s  # not asked to honour it


def test_retry_after_values() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert retry_after_s("120") == 120.0
    assert retry_after_s(format_datetime(now + timedelta(seconds=90), usegmt=True), now=now) == 90.0
    assert retry_after_s(format_datetime(now - timedelta(seconds=90), usegmt=True), now=now) == 0.0
    assert retry_after_s(None) is None and retry_after_s("") is None
    assert retry_after_s("soon") is None and retry_after_s("-5") is None
