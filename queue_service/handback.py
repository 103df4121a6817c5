"""Hand-back: a prefetching watch (``_prefetch_``) gives a queued-ahead item back to an idle peer.

A prefetch slot is filled only while no other prefetching watch of the queue (same tags, this process)
holds nothing (``affinity``). A watch that opens later (a worker starting, or reconnecting) finds the
work already spread: without more, a task would wait behind a long one on a busy instance while the
new one idles. So when a prefetching watch is idle (it holds nothing and its claim found nothing it
could take), the service asks a peer that holds a queued-ahead item (two or more items) for its newest
one whose models the idle watch's consumer would load (``affinity``), with a TEXT message on the peer's
watch::

    {"give_back": INDEX}

The peer's consumer takes the task back if it has not started (not sent to its instance yet, or taken
off the instance's queue) and answers on the same watch::

    {"release": INDEX}

which makes that one item ready again (``QueueStore.release_one``: only if still pending on that
consumer and session), and wakes the queue, so the idle watch claims it at once. A task that has
started already is kept, runs and is reported as usual: no answer. Only watches that asked for
``_prefetch_`` get such messages (the platform's SDK never asks for it, so its watches never see a
text frame), and only their ``release`` messages are read; anything else a client sends is ignored.

A consumer may also say that the oldest item it holds is about to end (the API edition's worker: its
task's last sampler step has begun)::

    {"finishing": INDEX}

after which a slot behind it that waits for an item with the same models (``affinity``) is filled with
any item, as if the consumer held nothing: at a model switch the next task is then queued on the instance
before the running one ends, instead of one round trip after. If there is none to take, the watch counts as
about to be idle: at once, not when its item ends, the service asks a peer whose own item is not ending for
a queued-ahead item (one with the watch's models first), and keeps the other watches' slots ahead shut
meanwhile, so that the item released comes to this watch rather than back into its peer's slot.

The service honours a ``release`` only for an item it asked for on that watch, and an ask ends when the
item is sent again on it (the pending items are sent again after a store hiccup): the consumer then
has it again and runs it, and a ``release`` still on its way changes nothing. One ask per item at a
time, and no more asks out at once in a queue than watches idle there.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from standard.http_util import BadJSON, parse_json

log = logging.getLogger("comfyserve.queue.handback")

GIVE_BACK = "give_back"
RELEASE = "release"
FINISHING = "finishing"
MAX_MESSAGE_CHARS = 128  # a release is ~30 characters: anything longer is not one
MAX_INDEX = 2**63 - 1


def give_back_message(index: int) -> str:
    return json.dumps({GIVE_BACK: index}, separators=(",", ":"))


def release_message(index: int) -> str:
    return json.dumps({RELEASE: index}, separators=(",", ":"))


def finishing_message(index: int) -> str:
    return json.dumps({FINISHING: index}, separators=(",", ":"))


def control_of(text: str) -> tuple[str, int] | None:
    """(kind, index) of a well-formed ``{"release": INDEX}`` or ``{"finishing": INDEX}``, else None (ignored:
    never echoed, never an error)."""
    if len(text) > MAX_MESSAGE_CHARS:
        return None
    try:
        message = parse_json(text)
    except BadJSON:
        return None
    if not isinstance(message, dict) or len(message) != 1:
        return None
    [(kind, index)] = message.items()
    if kind not in (RELEASE, FINISHING) or type(index) is not int or not 0 < index <= MAX_INDEX:
        return None  # bool is an int: not an index
    return kind, index


@dataclass(eq=False)
class Holder:
    """One prefetching watch as its peers see it. ``held``: the items it holds, in the order it was handed
    them; ``asked``: the items the service asked it to give back (ask sent or about to be); ``outbox``: asks
    to send; ``releases``: releases its client sent, not handled yet; ``finishing``: the item its client said
    is about to end; ``models``: the value of the preference's tag on each held item (``affinity``). Its own
    handler, the socket's one writer and the one caller of the store for it, sends the asks and handles the
    releases (``wake``)."""

    held: list[int] = field(default_factory=list)
    models: dict[int, str | None] = field(default_factory=dict)  # each held item's models (``affinity``'s tag)
    asked: set[int] = field(default_factory=set)
    outbox: list[int] = field(default_factory=list)
    releases: list[int] = field(default_factory=list)
    finishing: int | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def holding(self, indexes: list[int]) -> None:
        """What the store says the watch holds now; the known ones keep their order."""
        now = set(indexes)
        self.held = [i for i in self.held if i in now] + [i for i in indexes if i not in self.held]
        self.asked &= now
        self.models = {i: models for i, models in self.models.items() if i in now}
        if self.finishing not in now:
            self.finishing = None

    def handed(self, indexes: list[int]) -> None:
        self.held += [i for i in indexes if i not in self.held]

    def sent_again(self, indexes: list[int]) -> None:
        """These items were sent again: the client holds them anew, so any ask for them ends."""
        self.asked.difference_update(indexes)
        self.outbox = [i for i in self.outbox if i not in indexes]

    def queued_ahead(self, fits: Callable[[str | None], bool] = lambda _: True) -> int | None:
        """Its newest item queued ahead (not the oldest it holds) that is not asked for already and whose models
        ``fits`` (``affinity``: a load there would pay off)."""
        return next((i for i in reversed(self.held[1:]) if i not in self.asked and fits(self.models.get(i))), None)

    def ending(self) -> bool:
        """The oldest item it holds is about to end: the slot behind it may take any item."""
        return self.finishing is not None and bool(self.held) and self.held[0] == self.finishing

    def outstanding(self) -> int:
        """Asks out for items that are still queued ahead (not the oldest item it holds)."""
        return sum(1 for i in self.asked if self.held and i != self.held[0])

    def ask(self, index: int) -> None:
        self.asked.add(index)
        self.outbox.append(index)
        self.wake.set()

    def take_asks(self) -> list[str]:
        asks, self.outbox = self.outbox, []
        return [give_back_message(i) for i in asks]

    def received(self, text: str) -> None:
        """A text message from the client (read by the watch's reader)."""
        control = control_of(text)
        if control is None:
            log.debug("ignoring a text message that is not a release (%d characters)", len(text))
            return
        kind, index = control
        if kind == RELEASE:
            self.releases.append(index)
        elif index in self.held:
            self.finishing = index
        self.wake.set()  # its watch claims again: a slot may be free now

    def take_releases(self) -> list[int]:
        """The releases to carry out: those of items asked for (and not sent again since)."""
        releases, self.releases = self.releases, []
        granted = [i for i in dict.fromkeys(releases) if i in self.asked]
        self.asked.difference_update(granted)
        return granted

    def released(self, index: int) -> None:
        self.held = [i for i in self.held if i != index]
