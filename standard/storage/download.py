"""Download one object to a file: parallel ranged GETs, resume, size + CRC64 check, atomic rename.

The bytes go to ``NAME.part``; ``NAME.part.json`` records which ranges are
complete (and their CRC64s, combined at the end into the object's). A download
cut short (process killed, connection lost after the retries) leaves both
behind and the next attempt continues where it stopped, as long as the object
(its ETag and size) did not change. ``NAME`` itself only ever appears complete
and verified, so a half-written model is never used.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from ..retry import STORAGE
from .client import ObjectInfo, OssClient
from .crc import crc64_combine, crc64_update
from .errors import IntegrityError, StorageError, is_retryable, translate


class _Aborted(StorageError):
    """A part stopped because another one failed (never the error reported)."""

log = logging.getLogger("comfyserve.storage")

PART_RETRY = STORAGE.but(attempts=5)  # a dropped range resumes where it stopped, up to 5 tries
PROGRESS_LOG_MIN_BYTES = 64 * 1024 * 1024
ProgressCallback = Callable[[int, int], None]  # (bytes done, total)


def part_paths(dest: Path) -> tuple[Path, Path]:
    return dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")


class _State:
    """The resume record: object identity, part size, finished parts -> CRC64."""

    def __init__(self, path: Path, info: ObjectInfo, part_size: int) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.etag, self.size, self.part_size = info.etag, info.size, part_size
        self.done: dict[int, int] = {}

    @classmethod
    def load_or_new(cls, path: Path, info: ObjectInfo, part_size: int) -> tuple[_State, bool]:
        """(state, resumed) - a saved state only counts for the same object version."""
        try:
            saved = json.loads(path.read_text())
            if saved["etag"] == info.etag and saved["size"] == info.size:
                state = cls(path, info, int(saved["part_size"]))
                state.done = {int(k): int(v) for k, v in saved["done"].items()}
                return state, True
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return cls(path, info, part_size), False

    def finish(self, index: int, crc: int) -> None:
        with self.lock:
            self.done[index] = crc
            data = {"etag": self.etag, "size": self.size, "part_size": self.part_size,
                    "done": {str(k): v for k, v in self.done.items()}}
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.path)

    def ranges(self) -> list[tuple[int, int, int]]:
        """(index, start, end inclusive) of every part."""
        return [(i, start, min(start + self.part_size, self.size) - 1)
                for i, start in enumerate(range(0, self.size, self.part_size))]


def download_object(
    client: OssClient,
    info: ObjectInfo,
    dest: Path,
    *,
    part_size: int,
    workers: int,
    progress: ProgressCallback | None = None,
) -> Path:
    """Fetch ``info.key`` into ``dest`` (verified); returns ``dest``. Raises StorageError."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part_path, state_path = part_paths(dest)
    state, resumed = _State.load_or_new(state_path, info, part_size)
    if not resumed or not part_path.exists():
        state.done.clear()
        with part_path.open("wb") as handle:
            handle.truncate(info.size)
    elif resumed:
        log.info("resuming %s: %d of %d parts already here", info.key, len(state.done), len(state.ranges()))
    done_bytes = sum(end - start + 1 for i, start, end in state.ranges() if i in state.done)
    counter = _Progress(info, done_bytes, progress)
    failed = threading.Event()
    pending = [r for r in state.ranges() if r[0] not in state.done]
    fd = os.open(part_path, os.O_WRONLY)
    try:
        def fetch(part: tuple[int, int, int]) -> None:
            index, start, end = part
            crc = _fetch_part(client, info.key, fd, start, end, counter, failed)
            state.finish(index, crc)

        if pending:
            with ThreadPoolExecutor(max_workers=max(1, min(workers, len(pending))),
                                    thread_name_prefix="oss-download") as pool:
                futures = [pool.submit(fetch, part) for part in pending]
                wait(futures, return_when=FIRST_EXCEPTION)
                if any(f.done() and f.exception() is not None for f in futures):
                    failed.set()  # the other parts stop at their next chunk
                wait(futures)
                errors = [e for f in futures if (e := f.exception()) is not None]
                errors = [e for e in errors if not isinstance(e, _Aborted)] or errors
                if errors:
                    first = errors[0]
                    raise (first if isinstance(first, StorageError) else translate(first, f"downloading {info.key}"))
    finally:
        os.close(fd)
    _verify(info, part_path, state)
    os.replace(part_path, dest)
    state_path.unlink(missing_ok=True)
    counter.finished()
    return dest


def _fetch_part(client: OssClient, key: str, fd: int, start: int, end: int, counter: _Progress,
                failed: threading.Event) -> int:
    """One range into the file at its offset; a dropped connection resumes at the byte it reached."""
    crc = 0
    offset = start

    def resume() -> int:
        nonlocal crc, offset
        for chunk in client.iter_range(key, offset, end):
            if failed.is_set():
                raise _Aborted("download stopped: another part failed")
            if offset + len(chunk) > end + 1:
                raise IntegrityError(f"{key}: the bucket sent more than the range {start}-{end}")
            os.pwrite(fd, chunk, offset)
            crc = crc64_update(crc, chunk)
            offset += len(chunk)
            counter.add(len(chunk))
        if offset != end + 1:
            raise ConnectionError(f"range {start}-{end} ended at {offset}")
        return crc

    def worth_resuming(exc: BaseException) -> bool:
        return not isinstance(exc, StorageError) and is_retryable(exc) and not failed.is_set()

    try:
        return PART_RETRY.but(retry_on=worth_resuming).call_sync(resume, what=f"download of {key} bytes {start}-{end}",
                                                                log=log)
    except StorageError:
        raise
    except Exception as exc:
        raise translate(exc, f"downloading {key} bytes {offset}-{end}") from exc


def _verify(info: ObjectInfo, part_path: Path, state: _State) -> None:
    """Size and CRC64 (combined from the parts) must match the object, else the file is dropped."""
    size = part_path.stat().st_size
    problem = None
    if size != info.size:
        problem = f"size {size} != {info.size}"
    elif info.crc64 is not None:
        total = 0
        for index, start, end in state.ranges():
            total = crc64_combine(total, state.done[index], end - start + 1)
        if total != info.crc64:
            problem = f"CRC64 {total} != {info.crc64}"
    if problem is not None:
        part_path.unlink(missing_ok=True)
        state.path.unlink(missing_ok=True)
        raise IntegrityError(f"download of {info.key} is corrupt ({problem}); discarded, it will be fetched again")


class _Progress:
    """Counts bytes across threads; logs every ~10% for large files, feeds a callback."""

    def __init__(self, info: ObjectInfo, done: int, callback: ProgressCallback | None) -> None:
        self.info = info
        self.done = done
        self.callback = callback
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.start_bytes = done
        self.next_log = done + max(info.size // 10, 1)
        self.log = info.size >= PROGRESS_LOG_MIN_BYTES

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n
            done = self.done
            report = self.log and done >= self.next_log
            if report:
                self.next_log = done + max(self.info.size // 10, 1)
        if report:
            elapsed_s = max(time.monotonic() - self.started, 1e-6)
            rate = (done - self.start_bytes) / elapsed_s / 1024**2
            log.info("downloading %s: %d%% of %.1f MB (%.1f MB/s)", self.info.key,
                     done * 100 // max(self.info.size, 1), self.info.size / 1024**2, rate)
        if self.callback is not None:
            self.callback(done, self.info.size)

    def finished(self) -> None:
        elapsed_s = time.monotonic() - self.started
        if self.log or elapsed_s > 2:
            log.info("downloaded %s (%.1f MB) in %.1fs", self.info.key, self.info.size / 1024**2, elapsed_s)
