"""What the bucket holds under one prefix (``models/``, ``input/``), by path relative to it.

Every key is checked before it counts: one whose relative name would leave the
local folder it mirrors into (``../x``, an absolute name, a NUL byte) is dropped
and logged, so nothing later joins it to a local path.

Names are read on the event loop (node lists, prompt validation), so reading
never waits for the bucket: ``names()`` answers from the last listing and, once
that is older than ``ttl_s``, starts one refresh in a thread - never two at
once and never more than one per ``ttl_s``, however many requests ask.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..paths import resolve_inside
from .client import ObjectInfo, OssClient
from .errors import ObjectNotFound, StorageError

log = logging.getLogger("comfyserve.storage")


def safe_entries(client: OssClient, prefix: str, local_dir: Path) -> dict[str, ObjectInfo]:
    """Objects under ``prefix`` by relative name; names that leave ``local_dir`` are skipped (logged)."""
    found: dict[str, ObjectInfo] = {}
    for info in client.list(prefix):
        rel = info.key[len(prefix):]
        try:
            resolve_inside(local_dir, rel)
        except ValueError:
            log.warning("skipping %s: its name leaves %s", info.key, local_dir)
            continue
        found[rel] = info
    return found


class BucketListing:
    """The entries under ``prefix``, refreshed on demand (``ttl_s=None``: only by ``refresh()``).

    ``clock`` (monotonic seconds) is what ``ttl_s`` is measured on; tests move it instead of waiting.
    """

    def __init__(self, client: OssClient, prefix: str, local_dir: Path, *, ttl_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.prefix = prefix
        self.local_dir = local_dir
        self.ttl_s = ttl_s
        self.clock = clock
        self.refreshes = 0  # completed listings (tests, logs)
        self._entries: dict[str, ObjectInfo] = {}
        self._lock = threading.Lock()
        self._listed_at = float("-inf")  # monotonic time the last listing started
        self._refreshing = False
        self._closed = False

    def refresh(self) -> int:
        """List the prefix now (blocking); returns the number of entries. Raises StorageError."""
        with self._lock:
            self._listed_at = self.clock()
        entries = safe_entries(self.client, self.prefix, self.local_dir)
        with self._lock:
            self._entries = entries
            self.refreshes += 1
        return len(entries)

    def probe(self, rel: str) -> ObjectInfo | None:
        """One HEAD for a name the last listing lacks (put in the bucket since): known from now on if the
        bucket has it, None if not (or if the name would leave the local folder: no request then).
        Blocking; raises StorageError when the bucket cannot answer."""
        try:
            resolve_inside(self.local_dir, rel)
        except ValueError:
            return None
        try:
            info = self.client.head(self.prefix + rel)
        except ObjectNotFound:
            return None
        with self._lock:
            return self._entries.setdefault(rel, info)

    def forget(self, rel: str) -> None:
        """Drop one entry until the next listing (a probed name whose object is expected to go)."""
        with self._lock:
            self._entries.pop(rel, None)

    def get(self, rel: str) -> ObjectInfo | None:
        with self._lock:
            return self._entries.get(rel)

    def entries(self) -> dict[str, ObjectInfo]:
        """A copy of the last listing."""
        with self._lock:
            return dict(self._entries)

    def names(self, under: str = "") -> list[str]:
        """Sorted names (relative to ``under``, a folder ending in '/' or '') from the last listing."""
        self._refresh_if_stale()
        with self._lock:
            return sorted(rel[len(under):] for rel in self._entries if rel.startswith(under))

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def close(self) -> None:
        """No refresh starts any more (the instance is stopping)."""
        with self._lock:
            self._closed = True

    def _refresh_if_stale(self) -> None:
        with self._lock:
            if (self.ttl_s is None or self._closed or self._refreshing
                    or self.clock() - self._listed_at < self.ttl_s):
                return
            self._refreshing = True
        threading.Thread(target=self._background_refresh, name="oss-listing", daemon=True).start()

    def _background_refresh(self) -> None:
        try:
            self.refresh()
        except StorageError as exc:  # keep the last listing; the next ask after ttl_s tries again
            log.warning("refreshing the listing of %s failed: %s", self.prefix, exc)
        except Exception:  # a thread must not die silently
            log.exception("refreshing the listing of %s failed", self.prefix)
        finally:
            with self._lock:
                self._refreshing = False
