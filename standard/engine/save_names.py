"""Output names ``{stem}_{counter:05}_.png`` without listing the folder on every save.

ComfyUI finds the next counter by listing the whole output folder, so a save
into a folder of 20,000 files costs a 20,000-entry listing. Here the next
counter of each (folder, stem) is kept in memory once known: the folder is
listed only the first time a (folder, stem) is seen, and again when the name
the counter points at turns out to be taken (another process saving into the
same folder: API and cluster editions share one output dir between
instances), after which the counter jumps past everything on disk.

A name is claimed by creating the file exclusively (``O_EXCL``), so even a
stale counter never overwrites another writer's image. Files deleted behind
our back leave gaps, never reuse: the counter only grows while the process
lives (the next process lists again). The memory is bounded (least recently
used pairs are forgotten and simply listed again on their next save).
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict

MAX_REMEMBERED = 4096  # (folder, stem) pairs; a date in the prefix makes a new pair each day

_lock = threading.Lock()
_next: OrderedDict[tuple[str, str], int] = OrderedDict()


def _key(folder: str, stem: str) -> tuple[str, str]:
    return os.path.normcase(os.path.abspath(folder)), stem.lower()  # the listing matches stems case-blind


def _remember(key: tuple[str, str], counter: int) -> None:
    with _lock:
        _next[key] = max(counter, _next.get(key, 0))
        _next.move_to_end(key)
        while len(_next) > MAX_REMEMBERED:
            _next.popitem(last=False)


def listed_next(folder: str, stem: str) -> int:
    """One past the highest ``{stem}_NNNNN_`` counter on disk (1 for none), as ComfyUI computes it; remembered."""
    numbered = re.compile(re.escape(stem) + r"_(\d+)_", re.IGNORECASE)
    counters = [int(m.group(1)) for name in os.listdir(folder) if (m := numbered.match(name))]
    counter = max(counters, default=0) + 1
    _remember(_key(folder, stem), counter)
    return counter


def next_counter(folder: str, stem: str) -> int:
    """The counter the next save of ``stem`` into ``folder`` tries first (lists the folder only when unknown)."""
    with _lock:
        known = _next.get(_key(folder, stem))
    return known if known is not None else listed_next(folder, stem)


def claim(folder: str, stem: str, counter: int, *, counted_as: str | None = None) -> tuple[str, int]:
    """Create ``{stem}_{counter:05}_.png`` exclusively; returns (name, counter used).

    A taken name means another writer got there first: the folder is listed
    again and the counter moves past everything on disk. ``counted_as`` is the
    stem the counter is kept under when the written one differs (``%batch_num%``).
    """
    key_stem = counted_as or stem
    while True:
        name = f"{stem}_{counter:05}_.png"
        try:
            os.close(os.open(os.path.join(folder, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            counter = max(counter + 1, listed_next(folder, key_stem))
            continue
        _remember(_key(folder, key_stem), counter + 1)
        return name, counter
