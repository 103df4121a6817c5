"""Slowing password guessing on ``/login`` without locking the real user out.

Three budgets, each aimed at one attacker and harmless to the user:
    name + address   a few free failures, then a growing wait (1 s, 2 s, 4 s ... at most
                     ``PAIR_MAX_DELAY_S``) before that address may try that name again: 429 +
                     Retry-After. The user, at another address, is not affected; a success
                     from the address clears it.
    name             more than ``NAME_BUDGET`` failures in ``WINDOW_S`` from anywhere (a
                     guesser with many addresses): every try for the name is answered
                     ``NAME_PAUSE_S`` later, never refused, so the user still gets in.
    address          ``ADDRESS_LIMIT`` failures in ``WINDOW_S`` over all names (spraying):
                     429 for that address. Set high, since a reverse proxy makes many users
                     one address.
A try is charged before the password is checked and refunded if it was right,
so parallel guesses cannot slip past the count. Memory is bounded: each table
keeps at most ``MAX_ENTRIES`` keys, dropping the least recently failed.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

PAIR_FREE_FAILURES = 3
PAIR_MAX_DELAY_S = 300.0
PAIR_FORGET_S = 3600.0  # a name+address quiet this long starts again from zero
NAME_BUDGET = 20
NAME_PAUSE_S = 1.0
ADDRESS_LIMIT = 200
WINDOW_S = 900.0
MAX_ENTRIES = 10_000

K = TypeVar("K")
V = TypeVar("V")


def backoff_s(failures: int) -> float:
    """How long after its last failure a name+address may try again."""
    if failures < PAIR_FREE_FAILURES:
        return 0.0
    return min(2.0 ** (failures - PAIR_FREE_FAILURES), PAIR_MAX_DELAY_S)


class LoginThrottle:
    """The three budgets; ``clock`` and ``pause`` are injectable so tests need not wait."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 pause: Callable[[float], Awaitable[object]] = asyncio.sleep, *,
                 name_budget: int = NAME_BUDGET, address_limit: int = ADDRESS_LIMIT,
                 max_entries: int = MAX_ENTRIES) -> None:
        self.clock = clock
        self.pause = pause
        self._name_budget, self._address_limit, self._max_entries = name_budget, address_limit, max_entries
        self._pairs: dict[tuple[str, str], tuple[int, float]] = {}  # -> (failures, last failure)
        self._names: dict[str, deque[float]] = {}
        self._addresses: dict[str, deque[float]] = {}

    def entries(self) -> int:
        """How many keys the tables hold (bounded by ``max_entries`` each)."""
        return len(self._pairs) + len(self._names) + len(self._addresses)

    def _put(self, table: dict[K, V], key: K, value: V) -> None:
        table.pop(key, None)
        table[key] = value
        if len(table) > self._max_entries:
            del table[next(iter(table))]

    def _recent(self, table: dict[str, deque[float]], key: str, now: float) -> deque[float]:
        times = table.get(key)
        if times is None:
            return deque()
        while times and times[0] <= now - WINDOW_S:
            times.popleft()
        if not times:
            del table[key]
        return times

    def attempt(self, name: str, address: str) -> tuple[int, float]:
        """Before checking a password: (seconds to refuse for, 0 = go on; seconds to pause first).

        A try that may go on is charged as a failure now; call :meth:`succeeded` if it was right.
        """
        name = name.lower()[:64]
        now = self.clock()
        wait = 0.0
        pair = self._pairs.get((name, address))
        if pair is not None:
            if now - pair[1] > PAIR_FORGET_S:
                del self._pairs[(name, address)]
                pair = None
            else:
                wait = pair[1] + backoff_s(pair[0]) - now
        addresses = self._recent(self._addresses, address, now)
        if len(addresses) >= self._address_limit:
            wait = max(wait, addresses[0] + WINDOW_S - now)
        if wait > 0:
            return max(math.ceil(wait), 1), 0.0
        names = self._recent(self._names, name, now)
        pause = NAME_PAUSE_S if len(names) >= self._name_budget else 0.0
        self._put(self._pairs, (name, address), ((pair[0] if pair else 0) + 1, now))
        for table, key, limit in ((self._names, name, self._name_budget),
                                  (self._addresses, address, self._address_limit)):
            times = self._recent(table, key, now)
            if not times:
                times = deque(maxlen=limit)
            times.append(now)
            self._put(table, key, times)
        return 0, pause

    def succeeded(self, name: str, address: str) -> None:
        """The password was right: refund the charge, and this address starts again for this name."""
        name = name.lower()[:64]
        self._pairs.pop((name, address), None)
        for table, key in ((self._names, name), (self._addresses, address)):
            times = table.get(key)
            if times:
                times.pop()
