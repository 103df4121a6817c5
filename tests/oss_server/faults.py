"""Faults the tests switch on in the OSS test server: error statuses, dropped connections, slow bodies."""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class Fault:
    """One injected fault: matches a method and a key substring, fires ``times`` times."""

    kind: str  # "status" | "drop" | "slow"
    method: str
    key_contains: str
    times: int
    status: int = 500
    after_bytes: int = 0
    delay_s: float = 0.0
    skip: int = 0  # let this many matching requests through first


class Faults:
    """Faults the tests switch on; thread-safe because tests run in another thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self.fired: list[tuple[str, str, str]] = []

    def fail(self, method: str = "GET", key_contains: str = "", *, status: int = 500, times: int = 1,
             after: int = 0) -> None:
        """Answer ``status`` to ``times`` matching requests, after letting ``after`` of them through."""
        self._add(Fault("status", method, key_contains, times, status=status, skip=after))

    def drop(self, key_contains: str = "", *, after_bytes: int, times: int = 1) -> None:
        """Close the connection after ``after_bytes`` of a GET body."""
        self._add(Fault("drop", "GET", key_contains, times, after_bytes=after_bytes))

    def slow(self, key_contains: str = "", *, delay_s: float, times: int = 1_000_000) -> None:
        self._add(Fault("slow", "GET", key_contains, times, delay_s=delay_s))

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def _add(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def take(self, method: str, key: str, kind: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.kind == kind and fault.method == method and fault.key_contains in key and fault.times > 0:
                    if fault.skip > 0:
                        fault.skip -= 1
                        continue
                    fault.times -= 1
                    self.fired.append((kind, method, key))
                    return fault
        return None
