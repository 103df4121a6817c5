"""Watch extensions for workers: prefetch slots (``_prefetch_``) and a preference (``_affinity_=TAG``).

Both are ignored by a queue service that lacks them (the watch is then plain FIFO):

    ws://.../api/predict/svc?_watch_=true&_window_=2&_prefetch_=true&_affinity_=models&_affinity_wait_=3s
        [&_affinity_prefer_=V]

``_prefetch_=true``: the slots of the window beyond the first hold work queued ahead on a busy
consumer; they are filled only while no other watch of the queue (same tags, this process) holds
nothing, or is about to (its item is in its last step and its slot ahead is empty), so a task never waits
behind another on one instance while a second instance is idle. A watch that becomes idle after the
slots were filled (it opened later, or found nothing to take), or is about to with nothing to take, asks
a peer to give a queued-ahead item back (``handback``): one with its own models first, never one whose
models it would not load (below), and, when it is only about to be idle, not of a peer that is too. The
API edition's workers ask for one slot ahead by default (``--prefetch 1``).

The watch remembers the value of tag ``TAG`` on the last item it handed out (``_affinity_prefer_``
before the first): with the API edition's front tagging each task with its models, that is what the
consumer's instance holds. Each claim takes one item at a time: a ready item carrying that value if
there is one, else the oldest ready item, as a plain watch would, but that only when the consumer
holds nothing (its instance is free): a slot behind a held item (``_window_`` > 1, the API edition's
``--prefetch``) waits for a preferred item rather than switch models early, until the consumer says that
item is in its last step (``handback``: ``finishing``). An item without the tag is
never preferred (nor waited out), so work whose models are unknown is served in plain order.

A free consumer loads models only where that pays off (``standard.load_costs``, the cluster scheduler's
rule): an item whose models no watch's consumer holds goes first (the oldest such); else the oldest item
whose models are worth loading, that is whose holders would take longer over the waiting items with
those models (observed run time each) than a load takes (the observed extra time of runs that needed
one; until both kinds were seen, four runs, ``Costs``). Items not worth it are left to their holders: at
the end of a model's work, a consumer that holds it finishes it rather than three others each loading it
for one item. A consumer holds the models of the item it is being handed from the watch's decision on
(``PassedOver.loading``), not from the store's answer: two free watches that decide at the same moment
do not both load one model. A run is timed here, from the end of the consumer's previous item (or its
hand-out) to the end of this one (its commit, seen by the next claim); it needed a load when its value
differs from the one before (unknown before the first).

The bound: the oldest ready item is *passed over* when a claim takes another in its place, or takes
none while it is left to its models' holders. Once the
same item has stood at the head, passed over, for ``_affinity_wait_``, the watches of this process claim
in plain order (it first) until the head moves: the first watch to see it overdue takes it, and its
account starts again from that decision, so peers deciding at the same moment keep their preference.
The head is found by reading the first ``PEEK`` items of the queue after a preferring claim, leaving out
the items this process's watches hold. Several service processes on one Redis keep their own account: an
item held by another process may be taken for the head, which only makes claims fall back to plain order
sooner. ``_affinity_wait_=0`` (or no ``_affinity_``): plain order.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from standard.load_costs import Costs

from . import params
from .handback import Holder
from .store import Item, QueueStore

PEEK = 64
MAX_WAIT_S = 3600.0
Key = tuple[str, frozenset[tuple[str, str]]]  # a queue and the tags its watches take


@dataclass
class _Run:
    """An item a preferring watch handed out, followed until it ends: how long it ran, and whether its consumer
    had to load its models first (None: the consumer's models were unknown)."""

    index: int
    loaded: bool | None
    handed_at: float


@dataclass
class _Head:
    index: int
    since: float


@dataclass
class PassedOver:
    """Per queue, in this process: the head item passed over (and since when), the items watches hold,
    the prefetching watches that hold nothing (or are about to: ``Affinity.claim``) and every prefetching
    watch's ``Holder``, the models each preferring watch's consumer holds and what runs took (by queue and tags).
    """

    clock: Callable[[], float] = time.monotonic
    heads: dict[str, _Head] = field(default_factory=dict)
    held: dict[str, set[int]] = field(default_factory=dict)
    idle: dict[Key, set[int]] = field(default_factory=dict)
    ending: dict[Key, set[int]] = field(default_factory=dict)  # about to be idle (``Affinity.claim``)
    holders: dict[Key, set[Holder]] = field(default_factory=dict)
    models: dict[Key, dict[int, str | None]] = field(default_factory=dict)
    costs: dict[Key, Costs] = field(default_factory=dict)

    def idle_peer(self, key: Key, me: Holder, *, ending: bool = False) -> bool:
        """Another watch holds nothing (``ending``: or is about to, ``Affinity.claim``)."""
        others = {id(me)}
        return bool(self.idle.get(key, set()) - others) or ending and bool(self.ending.get(key, set()) - others)

    def set_idle(self, key: Key, me: Holder, idle: bool, ending: bool = False) -> None:
        """A watch that stops being idle (or about to be) without a change in the store (it took nothing, or
        took an item another consumer had let go) wakes its peers: it kept their slots ahead shut."""
        was = False
        for watches, now in ((self.idle.setdefault(key, set()), idle), (self.ending.setdefault(key, set()), ending)):
            was = was or id(me) in watches
            if now:
                watches.add(id(me))
            else:
                watches.discard(id(me))
        if was and not (idle or ending):
            for peer in self.holders.get(key, set()) - {me}:
                peer.wake.set()

    def worth_loading(self, key: Key, models: str, waiting: int, me: Holder, *, mine: bool = True) -> bool:
        """A consumer loading ``models`` for ``waiting`` items pays off (``Costs``, the cluster's rule): no other
        consumer holds them, or those that do would take longer over those items than a load takes.
        ``mine``: the consumer holds models of its own (False: none known)."""
        holding = sum(1 for watch, held in self.models.get(key, {}).items() if watch != id(me) and held == models)
        return not holding or self.costs.setdefault(key, Costs()).worth_loading(waiting / holding, holding=mine)

    def loading(self, key: Key, me: Holder, models: str | None) -> None:
        """``me``'s consumer is about to be handed an item with ``models`` (None: unknown, nothing changes): they
        count as held from the decision on, not from the claim's answer, so a peer deciding meanwhile (its
        claim awaits the store too) loads other models rather than the same ones (``Affinity._one`` then sets
        what was handed out, or back what it held if nothing was)."""
        if models:
            self.models.setdefault(key, {})[id(me)] = models

    def ask_back(self, key: Key, me: Holder, fits: Callable[[str | None], bool], *, prefer: str | None = None,
                 ending: bool = False) -> None:
        """``me`` is idle (or ``ending``: its slot ahead is empty at its item's last step) and found nothing to
        take: ask a peer for its newest queued-ahead item whose models ``fits`` back (``handback``), one with
        the models ``prefer`` first, then the peer holding the most; never a peer whose own item is ending
        when ``ending`` (its queued-ahead item starts as soon); not while as many asks are out as watches idle.
        """
        peers = self.holders.get(key, set()) - {me}
        if sum(peer.outstanding() for peer in peers) >= len(self.idle.get(key, ())) + len(self.ending.get(key, ())):
            return
        asked = [(peer, index) for peer in peers if not (ending and peer.ending())
                 if (index := peer.queued_ahead(fits)) is not None]
        if asked:
            peer, index = max(asked, key=lambda p: (prefer is not None and p[0].models.get(p[1]) == prefer,
                                                    len(p[0].held)))
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
        else:
            self.passed_over(queue, head)

    def passed_over(self, queue: str, head: Item) -> None:
        """``head`` waits, passed over: its clock runs from the first time (the bound, ``overdue``)."""
        if queue not in self.heads or self.heads[queue].index != head.index:
            self.heads[queue] = _Head(head.index, self.clock())


@dataclass(eq=False)
class Affinity:
    """One watch's extensions: prefetch slots; the preference's tag (None: none), bound, and the value of
    the last item it handed out; the items it handed out that have not ended (``runs``) and when the last
    one ended."""

    tag: str | None
    wait_s: float
    value: str | None = None
    prefetch: bool = False
    holder: Holder = field(default_factory=Holder)  # its account for the hand-back (prefetch only)
    runs: list[_Run] = field(default_factory=list)
    ended_at: float | None = None
    declined: bool = False  # its last claim left the ready items to their models' holders (``worth_loading``)

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
        self.declined = False
        if window > 1 or self.tag or self.prefetch:
            held = await store.pending(queue, consumer, session)
            self.holder.holding([item.index for item in held])
            self._ended(passed, key, {item.index for item in held})
            if self.tag and self.prefetch:
                self.holder.models.update((item.index, self._models_of(item)) for item in held
                                          if item.index not in self.holder.models)
            holding = len(held)
        if holding >= window:
            if self.prefetch:
                passed.set_idle(key, self.holder, False)
            return []
        ending = self.prefetch and holding == 1 and self.holder.ending()
        if self.prefetch and holding and passed.idle_peer(key, self.holder, ending=not ending):
            window = 1  # a slot queued ahead would make that item wait while a peer's instance idles (or is about to)
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
            # About to be idle: its item is at its last step and its slot ahead is still empty. Like an idle
            # watch it keeps its peers' slots ahead shut, and asks a peer for an item queued ahead there.
            ending = ending and not out and window > 1 and not self.declined
            idle = holding + len(out) == 0 and not self.declined
            passed.set_idle(key, self.holder, idle, ending)
            if idle or ending:  # nothing it could take is ready: a peer's queued-ahead item is better run here
                passed.ask_back(key, self.holder, lambda models: self._takes(passed, key, models, 1),
                                prefer=self.value, ending=ending)
        return out

    def open(self, passed: PassedOver, queue: str, tags: dict[str, str], holding: list[int]) -> None:
        """A prefetching watch holding nothing is an idle peer from the moment it opens, not only after its
        first claim: a peer's claim meanwhile must not queue work ahead behind a running task. Its peers
        may ask it to give back what it holds (``handback``)."""
        key = (queue, frozenset(tags.items()))
        if self.tag:
            passed.models.setdefault(key, {})[id(self.holder)] = self.value
        if self.prefetch:
            passed.set_idle(key, self.holder, not holding)
            self.holder.holding(holding)
            passed.holders.setdefault(key, set()).add(self.holder)

    def close(self, passed: PassedOver, queue: str, tags: dict[str, str]) -> None:
        key = (queue, frozenset(tags.items()))
        passed.set_idle(key, self.holder, False, False)
        holders = passed.holders.get(key)
        if holders is not None:
            holders.discard(self.holder)
            if not holders:
                del passed.holders[key]
        models = passed.models.get(key)
        if models is not None:
            models.pop(id(self.holder), None)
            if not models:
                del passed.models[key]

    def _models_of(self, item: Item) -> str | None:
        assert self.tag is not None
        return item.decoded()[0].get(self.tag) or None

    def _takes(self, passed: PassedOver, key: Key, models: str | None, waiting: int) -> bool:
        """Whether this watch's consumer should take an item with ``models`` (``waiting`` such items): its own
        models, models unknown, or a load that pays off (``PassedOver.worth_loading``)."""
        return not models or models == self.value or passed.worth_loading(key, models, waiting, self.holder,
                                                                           mine=self.value is not None)

    def _ended(self, passed: PassedOver, key: Key, held: set[int]) -> None:
        """Items it handed out that its consumer no longer holds have ended: the oldest one ran from the end
        of the one before (or from when it was handed out) until now, which ``Costs`` learns from. A later one
        gone with it was given back or dropped, not run."""
        gone = [run for run in self.runs if run.index not in held]
        if not gone:
            return
        now = passed.clock()
        first = self.runs[0]
        if gone[0] is first:
            if first.loaded is not None:
                started = first.handed_at if self.ended_at is None else max(first.handed_at, self.ended_at)
                passed.costs.setdefault(key, Costs()).observe(now - started, first.loaded)
            self.ended_at = now
        self.runs = [run for run in self.runs if run.index in held]

    async def _one(self, store: QueueStore, passed: PassedOver, queue: str, consumer: str, session: str, *,
                   window: int, min_index: int, lease_s: float, tags: dict[str, str], free: bool) -> list[Item]:
        """One item: a preferred one; else the oldest ready one, but into a slot behind another item (``free``
        false) only when it is overdue or untagged: a model switch there would come too early; and into a free
        slot only when loading its models pays off (``_loadable``), unless it is overdue."""
        assert self.tag is not None
        key = (queue, frozenset(tags.items()))
        items: list[Item] = []
        overdue = passed.overdue(queue, self.wait_s)
        if overdue:  # the oldest ready item goes first, here: its account starts again now, so that a peer
            passed.heads.pop(queue, None)  # deciding meanwhile keeps its preference, not a plain claim beside it
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
        try:
            if not items and free and not overdue:
                first = await store.get(queue, min_index, PEEK, None)
                models = self._loadable(passed, key, first, tags)  # counted held from here (``loading``)
                if models is None:
                    return []  # every ready item is better left to the consumers holding its models
                if models:  # the oldest ready item worth loading, behind others that are not: they are passed over
                    items = await store.claim(queue, consumer, session, window=window, min_index=min_index,
                                              auto_commit=False, lease_s=lease_s, tags={**tags, self.tag: models},
                                              handoff=False)
                    if items:
                        passed.seen(queue, first, items[0], tags)
            if not items:
                items = await store.claim(queue, consumer, session, window=window, min_index=min_index,
                                          auto_commit=False, lease_s=lease_s, tags=tags, handoff=False)
        except BaseException:
            passed.models.setdefault(key, {})[id(self.holder)] = self.value  # nothing handed out: what it held
            raise
        passed.taken(queue, items)
        now = passed.clock()
        for item in items:  # an item without the tag (models unknown) leaves the preference as it was
            models = self._models_of(item)
            if models:
                self.runs.append(_Run(item.index, None if self.value is None else models != self.value, now))
            if self.prefetch:
                self.holder.models[item.index] = models
            self.value = models or self.value
        passed.models.setdefault(key, {})[id(self.holder)] = self.value
        return items

    def _loadable(self, passed: PassedOver, key: Key, first: list[Item], tags: dict[str, str]) -> str | None:
        """For a free slot, among ``first`` (the queue's first items): ``""`` to take the oldest ready item as
        a plain watch would, the models of a later one to take instead (loading those pays off, loading the
        ones before it does not), or None to take none: then the oldest waits for its models' holders,
        passed over (``passed_over``), at most the bound."""
        ready = [item for item in first if item.index not in passed.held.get(key[0], set()) and item.has_tags(tags)]
        models = [self._models_of(item) for item in ready]
        held = Counter(passed.models.get(key, {}).values())
        # Models no consumer holds go first (the cluster's spare instance): else every free consumer takes the
        # oldest model at the start, and the others' items pile up until the bound moves several at once.
        unheld = next((position for position, wanted in enumerate(models) if wanted and not held[wanted]), None)
        if unheld is not None:
            passed.loading(key, self.holder, models[unheld])
            return models[unheld] if unheld else ""
        waiting = Counter(m for m in models if m)
        for position, wanted in enumerate(models):
            if self._takes(passed, key, wanted, waiting[wanted] if wanted else 0):
                passed.loading(key, self.holder, wanted)
                return "" if position == 0 or not wanted else wanted
        if ready:
            self.declined = True
            passed.passed_over(key[0], ready[0])
            return None
        return ""
