"""Watch extensions for workers: prefetch slots (``_prefetch_``) and a preference (``_affinity_=TAG``).

Both are ignored by a queue service that lacks them (the watch is then plain FIFO):

    ws://.../api/predict/svc?_watch_=true&_window_=2&_prefetch_=true&_affinity_=models&_affinity_wait_=3s
        [&_affinity_prefer_=V]

``_prefetch_=true``: the slots of the window beyond the first hold work queued ahead on a busy
consumer; they are filled only while no other watch of the queue (same tags, this process) holds
nothing, so a task never waits behind another on one instance while a second instance is idle. A
watch that becomes idle after the slots were filled (it opened later, or found nothing to take) asks
a peer to give its queued-ahead item back (``handback``). The API edition's workers ask for one slot
ahead by default (``--prefetch 1``).

The watch remembers the value of tag ``TAG`` on the last item it handed out (``_affinity_prefer_``
before the first): with the API edition's front tagging each task with its models, that is what the
consumer's instance holds. Each claim takes one item at a time: a ready item carrying that value if
there is one, else the oldest ready item, as a plain watch would, but that only when the consumer
holds nothing (its instance is free): a slot behind a held item (``_window_`` > 1, the API edition's
``--prefetch``) waits for a preferred item rather than switch models early, until the consumer says that
item is in its last step (``handback``: ``finishing``). An item without the tag is
never preferred (nor waited out), so work whose models are unknown is served in plain order.

The bound: the oldest ready item is *passed over* when a claim takes another in its place. Once the
same item has stood at the head, passed over, for ``_affinity_wait_``, the watches of this process claim
in plain order (it first) until the head moves. The head is found by reading the first ``PEEK`` items
of the queue after a preferring claim, leaving out the items this process's watches hold. Several
service processes on one Redis keep their own account: an item held by another process may be taken
for the head, which only makes claims fall back to plain order sooner. ``_affinity_wait_=0`` (or no
``_affinity_``): plain order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from . import params
from .handback import Holder
from .store import Item, QueueStore

PEEK = 64
MAX_WAIT_S = 3600.0


@dataclass
class _Head:
    index: int
    since: float


@dataclass
class PassedOver:
    """Per queue, in this process: the head item passed over (and since when), the items watches hold,
    the prefetching watches that hold nothing and every prefetching watch's ``Holder`` (by queue and tags)."""

    clock: Callable[[], float] = time.monotonic
    heads: dict[str, _Head] = field(default_factory=dict)
    held: dict[str, set[int]] = field(default_factory=dict)
    idle: dict[tuple[str, frozenset[tuple[str, str]]], set[int]] = field(default_factory=dict)
    holders: dict[tuple[str, frozenset[tuple[str, str]]], set[Holder]] = field(default_factory=dict)

    def idle_peer(self, key: tuple[str, frozenset[tuple[str, str]]], me: int) -> bool:
        return bool(self.idle.get(key, set()) - {me})

    def set_idle(self, key: tuple[str, frozenset[tuple[str, str]]], me: int, idle: bool) -> None:
        watches = self.idle.setdefault(key, set())
        if idle:
            watches.add(me)
        else:
            watches.discard(me)

    def ask_back(self, key: tuple[str, frozenset[tuple[str, str]]], me: Holder) -> None:
        """``me`` is idle and found nothing to take: ask the peer holding the most for its newest item back
        (``handback``), unless as many asks as there are idle watches are out already."""
        peers = self.holders.get(key, set()) - {me}
        if sum(peer.outstanding() for peer in peers) >= len(self.idle.get(key, ())):
            return
        asked = [peer for peer in peers if peer.queued_ahead() is not None]
        if asked:
            peer = max(asked, key=lambda h: len(h.held))
            index = peer.queued_ahead()
            assert index is not None
            peer.ask(index)

    def overdue(self, queue: str, wait_s: float) -> bool:
        head = self.heads.get(queue)
        return head is not None and self.clock() - head.since >= wait_s

    def taken(self, queue: str, items: list[Item]) -> None:
        head = self.heads.get(queue)
        if head is not None and any(item.index == head.index for item in items):
            del self.heads[queue]
        self.held.setdefault(queue, set()).update(item.index for item in items)

    def let_go(self, queue: str, indexes: set[int]) -> None:
        """A watch ended: what it held is committed or ready again."""
        self.held.get(queue, set()).difference_update(indexes)

    def head_of(self, queue: str, first: list[Item], wanted: Mapping[str, str]) -> Item | None:
        """The oldest of ``first`` (the queue's first items) that no watch here holds and ``wanted`` fits."""
        held = self.held.get(queue, set())
        return next((item for item in first if item.index not in held and item.has_tags(dict(wanted))), None)

    def seen(self, queue: str, first: list[Item], taken: Item, wanted: Mapping[str, str]) -> None:
        """``first``: the queue's first items just after a preferring claim took ``taken``. The oldest
        one ahead of it that no watch here holds (and that the watch could have taken) was passed over."""
        held = self.held.setdefault(queue, set())
        present = {item.index for item in first}
        last = first[-1].index if first else 0
        held.difference_update({i for i in held if i <= last and i not in present})  # committed since
        head = self.head_of(queue, [item for item in first if item.index < taken.index], wanted)
        if head is None:
            self.heads.pop(queue, None)
        elif queue not in self.heads or self.heads[queue].index != head.index:
            self.heads[queue] = _Head(head.index, self.clock())


@dataclass
class Affinity:
    """One watch's extensions: prefetch slots; the preference's tag (None: none), bound, and the value of
    the last item it handed out."""

    tag: str | None
    wait_s: float
    value: str | None = None
    prefetch: bool = False
    holder: Holder = field(default_factory=Holder)  # its account for the hand-back (prefetch only)

    @classmethod
    def of(cls, query: Mapping[str, str]) -> Affinity | None:
        prefetch = params.flag(query, "_prefetch_")
        tag = query.get("_affinity_") or None
        wait_s = params.duration_s(query, "_affinity_wait_", 0.0, high_s=MAX_WAIT_S)
        if tag is None or wait_s <= 0:
            tag = None
        if tag is None and not prefetch:
            return None
        prefer = query.get("_affinity_prefer_") or None
        return cls(params.header_safe("_affinity_", tag) if tag else None, wait_s, prefer, prefetch)

    async def claim(self, store: QueueStore, passed: PassedOver, queue: str, consumer: str, session: str, *,
                    window: int, min_index: int, lease_s: float, tags: dict[str, str]) -> list[Item]:
        """Up to the free part of ``window`` (only the first slot while a peer holds nothing), one item at
        a time (each preferring the one before)."""
        key = (queue, frozenset(tags.items()))
        # Asked also for a window of one when preferring: a preferred claim that finds the slot still taken
        # (its item not yet committed) must not be followed by a plain claim that finds it free; and by a
        # prefetching watch, which must know what it holds to be counted idle (or asked to give back).
        holding = 0
        if window > 1 or self.tag or self.prefetch:
            held = await store.pending(queue, consumer, session)
            self.holder.holding([item.index for item in held])
            holding = len(held)
        if holding >= window:
            if self.prefetch:
                passed.set_idle(key, id(self), False)
            return []
        if self.prefetch and holding and passed.idle_peer(key, id(self)):
            window = 1  # a slot queued ahead would make that item wait while a peer's instance idles
        out: list[Item] = []
        if self.tag is None and holding < window:
            out = await store.claim(queue, consumer, session, window=window, min_index=min_index,
                                    auto_commit=False, lease_s=lease_s, tags=tags, handoff=False)
        while self.tag is not None and holding + len(out) < window:
            # The slot right behind an item about to end (``handback``: its last step) is as good as free.
            free = holding + len(out) == 0 or (holding + len(out) == 1 and not out and self.holder.ending())
            items = await self._one(store, passed, queue, consumer, session, window=holding + len(out) + 1,
                                    min_index=min_index, lease_s=lease_s, tags=tags, free=free)
            if not items:
                break
            out.extend(items)  # more than one when an item was committed since ``pending``: all are sent
        if self.prefetch:
            self.holder.handed([item.index for item in out])
            idle = holding + len(out) == 0
            passed.set_idle(key, id(self), idle)
            if idle:  # nothing it could take is ready: a peer's queued-ahead item is better run here
                passed.ask_back(key, self.holder)
        return out

    def open(self, passed: PassedOver, queue: str, tags: dict[str, str], holding: list[int]) -> None:
        """A prefetching watch holding nothing is an idle peer from the moment it opens, not only after its
        first claim: a peer's claim meanwhile must not queue work ahead behind a running task. Its peers
        may ask it to give back what it holds (``handback``)."""
        if self.prefetch:
            key = (queue, frozenset(tags.items()))
            passed.set_idle(key, id(self), not holding)
            self.holder.holding(holding)
            passed.holders.setdefault(key, set()).add(self.holder)

    def close(self, passed: PassedOver, queue: str, tags: dict[str, str]) -> None:
        key = (queue, frozenset(tags.items()))
        passed.set_idle(key, id(self), False)
        holders = passed.holders.get(key)
        if holders is not None:
            holders.discard(self.holder)
            if not holders:
                del passed.holders[key]

    async def _one(self, store: QueueStore, passed: PassedOver, queue: str, consumer: str, session: str, *,
                   window: int, min_index: int, lease_s: float, tags: dict[str, str], free: bool) -> list[Item]:
        """One item: a preferred one; else the oldest ready one, but into a slot behind another item (``free``
        false) only when it is overdue or untagged: a model switch there would come too early."""
        assert self.tag is not None
        items: list[Item] = []
        overdue = passed.overdue(queue, self.wait_s)
        if self.value is not None and not overdue:
            items = await store.claim(queue, consumer, session, window=window, min_index=min_index,
                                      auto_commit=False, lease_s=lease_s, tags={**tags, self.tag: self.value},
                                      handoff=False)
            if items:
                passed.seen(queue, await store.get(queue, min_index, PEEK, None), items[0], tags)
            elif not free:
                head = passed.head_of(queue, await store.get(queue, min_index, PEEK, None), tags)
                if head is None or head.decoded()[0].get(self.tag):
                    return []  # wait for this consumer's slot to be free (or for the head to be overdue)
        if not items:
            items = await store.claim(queue, consumer, session, window=window, min_index=min_index,
                                      auto_commit=False, lease_s=lease_s, tags=tags, handoff=False)
        if overdue:  # the oldest ready item went first: its account starts again
            passed.heads.pop(queue, None)
        passed.taken(queue, items)
        for item in items:  # an item without the tag (models unknown) leaves the preference as it was
            self.value = item.decoded()[0].get(self.tag) or self.value
        return items
