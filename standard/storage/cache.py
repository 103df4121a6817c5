"""``ModelCache``: model files of an oss:// data dir on local disk, bounded, least recently used first.

A file is fetched on first use (``ensure``) and only appears under its name
once it is complete and verified (see ``download``). Several threads asking for
the same file share one download. Files in use (held by a running prompt) are
never evicted; when nothing more can go, the cache runs over its bound with a
warning rather than failing a task - unless one file alone exceeds the bound.

The inputs of an oss:// data dir use the same class without a bound
(``max_bytes=None``): their folder also holds local uploads, which must never go.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

from ..paths import resolve_inside
from .client import ObjectInfo, OssClient
from .crc import file_crc64
from .download import ProgressCallback, download_object
from .errors import CacheFullError

log = logging.getLogger("comfyserve.storage")
INDEX_NAME = ".oss-cache.json"
LOCK_SUFFIX = ".lock"
PARTIAL_SUFFIXES = (".part", ".part.json", ".part.json.tmp", LOCK_SUFFIX)


class ModelCache:
    """Files under ``root`` (the local ``models/``, ``input/``) mirrored from ``key_prefix`` in the bucket."""

    def __init__(self, client: OssClient, key_prefix: str, root: Path, *, max_bytes: int | None,
                 part_size: int, workers: int, lock_root: Path | None = None, label: str = "model") -> None:
        self.client = client
        self.key_prefix = key_prefix
        self.root = root
        self.max_bytes = max_bytes
        self.part_size = part_size
        self.workers = workers
        # Where the inter-process lock files go (``NAME.lock``): beside the files unless a folder
        # that listings skip is named (the input folder is shown to users file by file).
        self.lock_root = lock_root or root
        self.label = label  # what the log lines call a file
        self._lock = threading.RLock()
        self._sizes: OrderedDict[str, int] = OrderedDict()  # rel -> size, least recently used first
        self._etags: dict[str, str] = {}
        self._in_use: Counter[str] = Counter()
        self._fetching: dict[str, Future[Path]] = {}
        self.downloads = 0  # count of completed downloads (tests, metrics)
        self.root.mkdir(parents=True, exist_ok=True)
        self._scan()

    # -- state -----------------------------------------------------------------

    @property
    def index_path(self) -> Path:
        return self.root / INDEX_NAME

    def _scan(self) -> None:
        """Adopt complete files already on disk (a warm cache), oldest access first."""
        try:
            self._etags = json.loads(self.index_path.read_text())
        except (OSError, ValueError):
            self._etags = {}
        found = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if name.startswith(INDEX_NAME) or name.endswith(PARTIAL_SUFFIXES):
                    continue
                path = Path(dirpath, name)
                stat = path.stat()
                found.append((stat.st_atime, path.relative_to(self.root).as_posix(), stat.st_size))
        for _atime, rel, size in sorted(found):
            self._sizes[rel] = size

    def _save_index(self) -> None:
        tmp = self.index_path.with_name(f"{INDEX_NAME}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(self._etags))
        os.replace(tmp, self.index_path)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def cached(self) -> list[str]:
        with self._lock:
            return list(self._sizes)

    def is_cached(self, rel: str, info: ObjectInfo | None = None) -> bool:
        with self._lock:
            if rel not in self._sizes:
                return False
            return info is None or self._etags.get(rel) in (None, info.etag)

    def is_outdated(self, rel: str, info: ObjectInfo) -> bool:
        """Did we fetch ``rel`` from an older version of the object than ``info``?

        False for files we did not fetch (a local upload stays as it is).
        """
        with self._lock:
            return self._etags.get(rel) not in (None, info.etag)

    # -- use -------------------------------------------------------------------

    @contextlib.contextmanager
    def hold(self, rel: str) -> Iterator[None]:
        """Keep ``rel`` from eviction while the block runs."""
        self.acquire(rel)
        try:
            yield
        finally:
            self.release(rel)

    def acquire(self, rel: str) -> None:
        with self._lock:
            self._in_use[rel] += 1

    def release(self, rel: str) -> None:
        with self._lock:
            self._in_use[rel] -= 1
            if self._in_use[rel] <= 0:
                del self._in_use[rel]

    def ensure(self, rel: str, info: ObjectInfo | None, *, progress: ProgressCallback | None = None) -> Path:
        """The local path of model ``rel`` (relative to models/), downloading it if needed.

        ``info`` is the listing's entry (None: ask the bucket). Raises StorageError.
        """
        path = resolve_inside(self.root, rel)
        with self._lock:
            if rel in self._sizes and path.is_file() and (info is None or self._etags.get(rel) in (None, info.etag)):
                self._sizes.move_to_end(rel)
                with contextlib.suppress(OSError):
                    os.utime(path)
                return path
            future = self._fetching.get(rel)
            owner = future is None
            if owner:
                future = Future()
                self._fetching[rel] = future
        assert future is not None
        if not owner:
            return future.result()
        try:
            result = self._download(rel, path, info, progress)
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            future.set_result(result)
            return result
        finally:
            with self._lock:
                self._fetching.pop(rel, None)

    def _download(self, rel: str, path: Path, info: ObjectInfo | None, progress: ProgressCallback | None) -> Path:
        key = self.key_prefix + rel
        head = self.client.head(key)  # the CRC64 and the current version, even when listed
        if info is not None and head.size != info.size:
            log.info("%s changed in the bucket since it was listed", key)
        self._make_room(rel, head.size)
        with self._lock:  # a stale copy goes before the new one arrives
            if rel in self._sizes:
                del self._sizes[rel]
        started = time.monotonic()
        # Several instances on one machine may share the cache dir: one downloads, the others
        # wait for it and adopt the file once its CRC64 matches.
        with _file_lock(resolve_inside(self.lock_root, rel + LOCK_SUFFIX)):
            if _matches(path, head):
                log.info("%s %s already in the cache (another process fetched it)", self.label, rel)
            else:
                download_object(self.client, head, path, part_size=self.part_size, workers=self.workers,
                                progress=progress)
        with self._lock:
            self._sizes[rel] = head.size
            self._sizes.move_to_end(rel)
            self._etags[rel] = head.etag
            self._save_index()
            self.downloads += 1
        log.info("%s %s cached (%.1f MB in %.2fs)", self.label, rel, head.size / 1024**2,
                 time.monotonic() - started)
        return path

    def drop(self, rel: str) -> bool:
        """Remove a file we fetched (not one in use or being fetched) and the folders it leaves empty;
        whether it went. The bucket still has it: a later use fetches it again."""
        with self._lock:
            if rel not in self._etags or self._in_use.get(rel) or rel in self._fetching:
                return False
            self._sizes.pop(rel, None)
            self._etags.pop(rel, None)
            path = self.root / rel
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            for folder in path.parents:
                if folder == self.root or not folder.is_relative_to(self.root):
                    break
                try:
                    folder.rmdir()
                except OSError:  # not empty (or gone): the folders above are not empty either
                    break
            self._save_index()
            return True

    def _make_room(self, rel: str, need: int) -> None:
        if self.max_bytes is None:
            return
        if need > self.max_bytes:
            raise CacheFullError(
                f"model {rel} ({need / 1024**3:.2f} GB) is larger than --cache-max-gb "
                f"({self.max_bytes / 1024**3:.2f} GB)")
        with self._lock:
            used = sum(size for name, size in self._sizes.items() if name != rel)
            for victim in list(self._sizes):
                if used + need <= self.max_bytes:
                    break
                if victim == rel or self._in_use.get(victim) or victim in self._fetching:
                    continue
                size = self._sizes.pop(victim)
                self._etags.pop(victim, None)
                with contextlib.suppress(FileNotFoundError):
                    (self.root / victim).unlink()
                used -= size
                log.info("evicted %s (%.1f MB) from the model cache", victim, size / 1024**2)
            if used + need > self.max_bytes:
                log.warning("model cache over its bound (%.2f GB): the remaining files are in use",
                            self.max_bytes / 1024**3)
            self._save_index()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock between processes (threads are serialised by ``ensure``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _matches(path: Path, info: ObjectInfo) -> bool:
    """Is the complete file at ``path`` this object version (size, and CRC64 when known)?"""
    try:
        if path.stat().st_size != info.size:
            return False
    except FileNotFoundError:
        return False
    return info.crc64 is None or file_crc64(path) == info.crc64
