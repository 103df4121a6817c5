"""The durable queue and history of one standard-edition instance: one SQLite file, one writer thread.

ComfyUI keeps its queue and history in memory, so a restart loses both. An
instance with a state file (``comfyserve standard`` always has one:
``DIR/.comfyserve/standard-PORT.sqlite3``, or under ``--state-dir``) records
every accepted prompt and every finished history entry here, and reads them
back when it starts.

* Writes never run on the event loop: they are queued to one writer thread,
  which commits whatever has queued up meanwhile in one transaction (WAL,
  ``synchronous=NORMAL``: a commit survives ``kill -9`` of the process; only a
  power cut may lose the last ones). A caller that must not go on before its
  write is on disk awaits :meth:`StateStore.flush` (or waits on
  :meth:`StateStore.flush_future`): the worker before it runs a prompt (so a
  restart never runs it twice), deletes from the queue or the
  history before their 200. ``POST /prompt`` does not wait: its write is queued
  before the answer and committed with the writer's next batch, typically well
  under a millisecond later. Waiting for it would cost the answer a thread
  switch, up to Python's 5 ms GIL switch interval while the engine runs a node,
  so a ``kill -9`` in that instant can lose the prompt just accepted; a graceful
  stop and the Restart button never lose one (closing commits what is queued).
* Checkpoints (copying the WAL into the database file, with its two
  ``fsync``) run on the writer thread through a connection of its own, never
  within a commit: SQLite's automatic checkpoint would run them in whichever
  commit crosses 1000 WAL pages, often the execution thread's between two
  prompts (a few ms, up to ~15 ms on a busy disk, while the GPU waits).
* One instance per file: the file's ``.lock`` is held (``flock``) while the
  store is open, so a second instance pointed at it refuses to start, saying
  which process holds it. The kernel drops the lock when the holder dies,
  even by ``kill -9``.
* A file that is not a SQLite database, or a database this module did not
  write (its ``application_id``), or one from a newer schema, is refused with
  a :class:`~standard.errors.ConfigError` naming the file: never read as an
  empty history, never overwritten.

A prompt row is ``pending`` until its runner marks it ``running`` (that mark
is flushed before the prompt starts), and it leaves the table in the same
transaction that writes its history entry. So after any stop each prompt is
pending (it runs after the restart, once, in order), finished (its history),
or was running; what to do with the latter is the runner's choice (see
``standard.server.prompt_server`` and ``standard.backend.journal``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .private import private_dir, private_file

log = logging.getLogger("comfyserve.state")

APPLICATION_ID = 0x43534856  # "CSHV": a comfyserve state file
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS prompts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt_id TEXT NOT NULL UNIQUE,
    number REAL NOT NULL,
    payload TEXT NOT NULL,
    running INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt_id TEXT NOT NULL UNIQUE,
    entry TEXT NOT NULL,
    start_ms INTEGER,
    end_ms INTEGER
);
"""
Op = Callable[[sqlite3.Connection], object]  # what an op returns (a cursor) is ignored
# Prompts and history entries are JSON already (they came as JSON or go out as JSON): no check for cycles, a
# third of json.dumps' time, on the execution thread between two prompts (a cycle raises RecursionError instead).
# Otherwise the same text json.dumps writes with its defaults (what /history answers).
encode_json = json.JSONEncoder(check_circular=False).encode
INSERT_HISTORY = "INTO history (prompt_id, entry, start_ms, end_ms) VALUES (?, ?, ?, ?)"
# Commits between two checkpoints. A prompt's gap writes ~5 pages, so about the WAL size (1000 pages) at which
# SQLite's automatic checkpoint, turned off here, would have run; a checkpoint's cost grows with the pages it copies.
CHECKPOINT_EVERY_COMMITS = 200
# SQLite starts the WAL over at the first commit that finds it all copied; a checkpoint that leaves it this long
# (commits never paused long enough) catches up with commits held, once, so the WAL file stays ~16 MB at most.
WAL_RESTART_FRAMES = 4000


def restart_error(prompt_id: str) -> list[Any]:
    """The status message of a prompt that was running when its server (or ComfyUI) stopped: ComfyUI's
    ``execution_error`` shape, so clients and ``/jobs`` see a failed prompt with a reason."""
    return ["execution_error", {
        "prompt_id": prompt_id, "node_id": None, "node_type": None, "executed": [],
        "exception_message": "the server restarted while this prompt ran; queue it again to run it",
        "exception_type": "ServerRestarted", "traceback": [], "current_inputs": {}, "current_outputs": {},
        "timestamp": int(time.time() * 1000)}]


def default_state_file(state_dir: Path, port: int) -> Path:
    """One file per instance: instances sharing a data dir (the API and cluster editions' children)
    listen on different ports, and a restarted instance keeps its port."""
    return state_dir / f"standard-{port}.sqlite3"


@dataclass
class StoredPrompt:
    prompt_id: str
    number: float
    payload: dict[str, Any]
    running: bool


@dataclass
class StoredHistory:
    prompt_id: str
    entry: dict[str, Any]
    times_ms: tuple[int, int] | None


@dataclass
class StoredState:
    """What a start reads back: prompts in their run order (number, then arrival), history oldest first."""

    prompts: list[StoredPrompt] = field(default_factory=list)
    history: list[StoredHistory] = field(default_factory=list)

    @property
    def pending(self) -> list[StoredPrompt]:
        return [p for p in self.prompts if not p.running]

    @property
    def running(self) -> list[StoredPrompt]:
        return [p for p in self.prompts if p.running]


class StateStore:
    """The open state file. Write methods are cheap calls for the event loop; the writer thread commits."""

    def __init__(self, path: Path, conn: sqlite3.Connection, lock_fd: int, history_max_items: int) -> None:
        self.path = path
        self.history_max_items = history_max_items
        self._conn = conn
        self._lock_fd = lock_fd
        self._read_lock = threading.Lock()  # load() reads on the caller's thread; the writer waits for it
        self._history_rows: int | None = None  # the writer thread's count of history rows (None: count again)
        # Queued writes (an op, or a flush's future; (None, None) stops the writer), taken in order under
        # _read_lock by whichever thread commits them: the writer, or a caller of commit_here.
        self._cv = threading.Condition()
        self._queued: list[tuple[Op | None, concurrent.futures.Future[None] | None]] = []
        self._quiet = False  # see committing_here: the writer is not woken meanwhile
        self._commits = 0  # since the last checkpoint (counted under _read_lock)
        self._checkpoint_due = False  # under _cv: the writer checkpoints when it next wakes
        self._checkpointer: sqlite3.Connection | None = None  # the writer thread's own connection (opened lazily)
        self._thread = threading.Thread(target=self._write_loop, name="comfyserve-state", daemon=True)
        self._thread.start()
        self._closed = False

    # -- opening -----------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, history_max_items: int) -> StateStore:
        """Lock and check ``path`` (created 0600 if missing); ConfigError when it cannot be this instance's."""
        try:
            private_dir(path.parent)
        except OSError as exc:
            raise ConfigError(f"state dir {path.parent}: {exc}") from None
        lock_fd = _lock(path)
        try:
            conn = _connect(path)
        except (OSError, sqlite3.Error) as exc:  # unreadable, read-only, a folder in its place...
            os.close(lock_fd)
            raise ConfigError(f"state file {path}: cannot open it: {exc}") from None
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(path, conn, lock_fd, history_max_items)

    def load(self) -> StoredState:
        """Everything stored (blocking: call before serving or through ``asyncio.to_thread``); history is
        cut to ``history_max_items`` (the newest) on disk too."""
        try:
            return self._load()
        except (sqlite3.DatabaseError, ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"state file {self.path} is damaged ({exc!r}); it was left as it is: move it away "
                              "(or give another --state-dir) to start with an empty queue and history") from None

    def _load(self) -> StoredState:
        state = StoredState()
        with self._read_lock:
            conn = self._conn
            for prompt_id, number, payload, running in conn.execute(
                    "SELECT prompt_id, number, payload, running FROM prompts ORDER BY number, seq"):
                state.prompts.append(StoredPrompt(prompt_id, number, json.loads(payload), bool(running)))
            rows = conn.execute("SELECT prompt_id, entry, start_ms, end_ms FROM history ORDER BY seq DESC LIMIT ?",
                                (self.history_max_items,)).fetchall()
        for prompt_id, entry, start_ms, end_ms in reversed(rows):
            times = (start_ms, end_ms) if start_ms is not None and end_ms is not None else None
            state.history.append(StoredHistory(prompt_id, json.loads(entry), times))
        self._submit(self._trim)
        return state

    # -- writes (from the event loop; committed by the writer thread) ------------

    def add_prompt(self, prompt_id: str, number: float, payload: dict[str, Any]) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO prompts (prompt_id, number, payload) VALUES (?, ?, ?)",
                         (prompt_id, number, encode_json(payload)))

        self._submit(op)

    def mark_running(self, prompt_id: str) -> None:
        self._submit(lambda conn: conn.execute("UPDATE prompts SET running = 1 WHERE prompt_id = ?", (prompt_id,)))

    def drop_prompts(self, prompt_ids: list[str] | None = None) -> None:
        """Forget these pending prompts (all of them when None)."""
        if prompt_ids is None:
            self._submit(lambda conn: conn.execute("DELETE FROM prompts WHERE running = 0"))
        else:
            ids = [(prompt_id,) for prompt_id in prompt_ids]
            self._submit(lambda conn: conn.executemany("DELETE FROM prompts WHERE prompt_id = ?", ids))

    def finish(self, prompt_id: str, entry: dict[str, Any], times_ms: tuple[int, int] | None,
               encoded: str | None = None) -> None:
        """The prompt's history entry replaces its prompt row, in one transaction (``encoded``: the entry's
        JSON, when the caller has it already)."""
        start_ms, end_ms = times_ms or (None, None)

        def op(conn: sqlite3.Connection) -> None:
            rows = self._count_history(conn)
            conn.execute("DELETE FROM prompts WHERE prompt_id = ?", (prompt_id,))
            row = (prompt_id, encoded if encoded is not None else encode_json(entry), start_ms, end_ms)
            # One statement for a prompt's first entry (nearly always: it runs between two prompts); finished
            # again (the same prompt_id queued again), its entry moves to the newest place.
            if not conn.execute(f"INSERT OR IGNORE {INSERT_HISTORY}", row).rowcount:
                conn.execute("DELETE FROM history WHERE prompt_id = ?", (prompt_id,))
                conn.execute(f"INSERT {INSERT_HISTORY}", row)
                rows -= 1
            self._history_rows = rows + 1
            self._trim(conn)

        self._submit(op)

    def delete_history(self, prompt_ids: list[str] | None = None) -> None:
        """Forget these history entries (all of them when None)."""
        def op(conn: sqlite3.Connection) -> None:
            if prompt_ids is None:
                conn.execute("DELETE FROM history")
            else:
                conn.executemany("DELETE FROM history WHERE prompt_id = ?", [(prompt_id,) for prompt_id in prompt_ids])
            self._history_rows = None  # counted again when next needed

        self._submit(op)

    async def flush(self) -> None:
        """Until every write submitted before this call is committed (raises if the commit failed)."""
        await asyncio.wrap_future(self.flush_future())

    def flush_future(self) -> concurrent.futures.Future[None]:
        """Done once every write submitted before this call is committed: the execution thread waits on it
        itself (``result()``) before it runs the next prompt, without a hop through the event loop."""
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._put((None, future))
        return future

    @contextlib.contextmanager
    def committing_here(self) -> Iterator[None]:
        """Within: writes are queued without waking the writer thread, for :meth:`commit_here` to commit.

        The execution thread, between two prompts, queues the finished one's
        history and the next one's "running" mark, then commits both itself:
        waking the writer and waiting for it cost two thread switches, each a
        wait for the GIL while the idle GPU waits too. What is still queued when
        the block ends goes to the writer as usual.
        """
        with self._cv:
            self._quiet = True
        try:
            yield
        finally:
            with self._cv:
                self._quiet = False
                if self._queued:
                    self._cv.notify()

    def commit_here(self) -> None:
        """Commit every write queued so far on the calling thread (blocking; raises if the commit failed)."""
        _stopping, error = self._commit_queued(by_writer=False)
        if error is not None:
            raise error

    def close(self) -> None:
        """Commit what is queued, then close the file and release the lock (blocking: a short wait)."""
        if self._closed:
            return
        self._closed = True
        self._put((None, None))
        self._thread.join()
        if self._checkpointer is not None:
            self._checkpointer.close()
        self._conn.close()  # the last connection: SQLite checkpoints the WAL into the file and removes it
        os.close(self._lock_fd)

    # -- the writer thread --------------------------------------------------------

    def _submit(self, op: Op) -> None:
        if self._closed:
            log.warning("state store %s is closed: a write was not recorded", self.path)
            return
        self._put((op, None))

    def _put(self, entry: tuple[Op | None, concurrent.futures.Future[None] | None]) -> None:
        with self._cv:
            self._queued.append(entry)
            if not self._quiet or entry == (None, None):
                self._cv.notify()

    def _count_history(self, conn: sqlite3.Connection) -> int:
        if self._history_rows is None:
            self._history_rows = conn.execute("SELECT count(*) FROM history").fetchone()[0]
        return self._history_rows

    def _trim(self, conn: sqlite3.Connection) -> None:
        """Drop the oldest entries beyond ``history_max_items``. Runs with every finished prompt, so it
        costs what it drops, not the table's size: a count kept by the writer says when (a scan of a full
        10,000-entry history per prompt took ~10 ms, and the worker waits for the writer before each prompt)."""
        excess = self._count_history(conn) - self.history_max_items
        if excess > 0:
            conn.execute("DELETE FROM history WHERE seq IN (SELECT seq FROM history ORDER BY seq LIMIT ?)", (excess,))
            self._history_rows = self.history_max_items

    def _write_loop(self) -> None:
        stopping = False
        while not stopping:
            with self._cv:
                while not self._queued and not self._checkpoint_due:
                    self._cv.wait()
                checkpoint, self._checkpoint_due = self._checkpoint_due, False
            if checkpoint:
                self._checkpoint()
            if self._queued:
                stopping, _error = self._commit_queued(by_writer=True)

    def _checkpoint(self) -> None:
        """On the writer thread, outside ``_read_lock``: copy the WAL into the file while commits go on
        (``PASSIVE``: never waits for them; a later one copies what this one could not)."""
        try:
            if self._checkpointer is None:
                self._checkpointer = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            _busy, frames, _copied = self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if frames >= WAL_RESTART_FRAMES:
                # Commits went on all along (a run of trivial prompts), so the WAL never was all copied when one
                # began and never started over: copy the few frames committed meanwhile with commits held.
                with self._read_lock:
                    self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:  # the WAL grows until one succeeds; commits are not affected
            log.warning("state store %s: checkpoint failed: %r", self.path, exc)

    def _commit_queued(self, *, by_writer: bool) -> tuple[bool, BaseException | None]:
        """Commit what is queued in one transaction; (the stop sentinel was taken, the commit's error)."""
        stopping = False
        error: BaseException | None = None
        with self._read_lock:  # taking and committing under one lock: batches commit in the order queued
            with self._cv:
                batch, self._queued = self._queued, []
                if not by_writer and (None, None) in batch:  # the stop is the writer's to take
                    batch.remove((None, None))
                    self._queued.append((None, None))
                    self._cv.notify()
            if any(op is not None for op, _ in batch):
                try:
                    with self._conn:  # one transaction for the batch
                        for op, _ in batch:
                            if op is not None:
                                op(self._conn)
                except (sqlite3.Error, ValueError, TypeError, RecursionError) as exc:
                    error = exc
                    self._history_rows = None  # rolled back: count again
                    log.error("state store %s: %d write(s) not recorded: %r", self.path, len(batch), exc)
                else:
                    self._commits += 1
                    if self._commits >= CHECKPOINT_EVERY_COMMITS:
                        self._commits = 0
                        with self._cv:
                            self._checkpoint_due = True
                            self._cv.notify()
        for op, future in batch:
            if op is None and future is None:
                stopping = True
            elif future is not None and future.set_running_or_notify_cancel():  # not if its waiter left
                future.set_exception(error) if error is not None else future.set_result(None)
        return stopping, error


def _lock(path: Path) -> int:
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigError(f"state file {path}: cannot create its lock {lock_path}: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(f"state file {path} is in use by another instance (pid {holder}); give each instance "
                          "its own --state-dir or --port") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _connect(path: Path) -> sqlite3.Connection:
    """Open and check the file; create the schema in a new (empty) one."""
    private_file(path)
    refuse = (f"state file {path} is not a comfyserve state file ({{}}); it was left as it is: move it away "
              "(or give another --state-dir) to start with an empty queue and history")
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        try:
            application_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as exc:
            raise ConfigError(refuse.format(exc)) from None
        if application_id == 0 and not tables - {"sqlite_sequence"}:
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif application_id != APPLICATION_ID:
            raise ConfigError(refuse.format(f"a SQLite database of another program, application_id {application_id}"))
        elif version > SCHEMA_VERSION:
            raise ConfigError(f"state file {path} was written by a newer comfyserve (schema {version}); "
                              "upgrade, or give another --state-dir")
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA wal_autocheckpoint = 0")  # the writer thread checkpoints (see StateStore)
            conn.executescript(SCHEMA)
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise ConfigError(refuse.format(exc)) from None
        if check != "ok":
            raise ConfigError(refuse.format(f"damaged: {check}"))
        conn.isolation_level = "DEFERRED"  # the writer's `with conn:` is one transaction per batch
    except BaseException:
        conn.close()
        raise
    private_file(path)  # the -wal and -shm files it just created: 0600 too
    return conn
