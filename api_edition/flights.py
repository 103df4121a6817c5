"""The tasks a worker holds at once: the running one and those queued behind it (``--prefetch``).

With ``--prefetch N`` a worker watches its input queue with window ``1 + N``: the queue hands it up to
``N`` tasks beyond the running one, and the worker queues each on its instance as soon as it is checked,
so ComfyUI's own queue starts the next task the moment the current one ends (no round trip between).
A ``Flight`` is one such task's state as the worker handles it; ``Flights`` keeps them in arrival
order, so tasks go to the instance in the order the queue handed them out.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from queue_service.client import DataFrame


@dataclass(eq=False)
class Flight:
    frame: DataFrame
    request_id: str
    previous: Flight | None = None  # the flight that goes to the instance before this one
    prompt_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    behind: bool = False  # queued on the instance behind another of the worker's prompts
    submitting: bool = False  # its prompt is being (or was) sent to the instance
    held: bool = False  # taken back before it was sent: it must not be
    started: bool = False  # the instance began it (execution_start; at once when not behind)
    dropped: bool = False  # taken off the instance's queue before it started
    ran: bool = False  # its run on the instance is over
    sent: asyncio.Event = field(default_factory=asyncio.Event)  # on the instance (or never will be)
    task: asyncio.Task[None] | None = None
    on_start: Callable[[], None] | None = None  # counts its run at its execution_start (queued behind)
    # The queue asked for it back (``queue_service.handback``), on this connection of the watch.
    asked_on: int | None = None
    handing_back: bool = False  # being taken back for the queue: not run here if that works
    redelivered: bool = False  # the queue sent it again since it asked for it back: the ask is void
    finishing: bool = False  # the queue was told it is in its last sampler step (at most once)

    async def turn(self) -> None:
        """Wait until the flight before this one is on the instance (or will never be)."""
        if self.previous is not None:
            await self.previous.sent.wait()
            self.previous = None  # let the chain go


class Flights:
    """The worker's flights by input index."""

    def __init__(self) -> None:
        self.by_index: dict[int, Flight] = {}
        self.by_prompt: dict[str, Flight] = {}
        self._last: Flight | None = None

    def __len__(self) -> int:
        return len(self.by_index)

    def __contains__(self, index: int) -> bool:
        return index in self.by_index

    def add(self, frame: DataFrame, request_id: str) -> Flight:
        flight = Flight(frame, request_id, previous=self._last)
        self._last = flight
        self.by_index[frame.index] = flight
        self.by_prompt[flight.prompt_id] = flight
        return flight

    def remove(self, flight: Flight) -> None:
        flight.sent.set()  # whoever waits behind it goes on
        self.by_index.pop(flight.frame.index, None)
        self.by_prompt.pop(flight.prompt_id, None)
        if self._last is flight:
            self._last = None

    def ahead_on_instance(self, flight: Flight) -> bool:
        """Another of the worker's prompts is on the instance, not finished: this one waits behind it."""
        return any(other is not flight and other.submitting and not other.held and not other.ran
                   for other in self.by_index.values())

    def first(self) -> Flight | None:
        """The oldest flight (running, or next to run)."""
        return next(iter(self.by_index.values()), None)

    def not_started(self) -> list[Flight]:
        return [f for f in self.by_index.values() if not f.started]
