"""A clock the test moves instead of waiting for: pass it where the product takes a ``clock``."""

from __future__ import annotations


class FakeClock:
    """Monotonic seconds that only ``advance`` moves; ``pause`` records sleeps instead of sleeping."""

    def __init__(self, now_s: float = 1000.0) -> None:
        self.now_s = now_s
        self.pauses: list[float] = []

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds

    async def pause(self, seconds: float) -> None:
        self.pauses.append(seconds)
