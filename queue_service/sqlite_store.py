"""The embedded store: one SQLite file, one writer thread.

Every call runs on a single dedicated thread that owns the connection, so
calls are serialised (no locking needed, claim is atomic) and the event loop
never blocks. Each write is its own transaction in WAL mode with
``synchronous=NORMAL``: an accepted put survives a kill -9 of the process.
``put_and_remove`` writes two queues in one transaction.
Consumer sessions live in memory (one process per SQLite file); pending
items and their owners are on disk, so a consumer that reconnects after a
restart gets its pending items again.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, TypeVar

from standard.private import private_file
from standard.tasks import cancel_and_wait

from .protocol import decode_frame
from .store import (
    COMMITTED_MAX,
    COMMITTED_TTL_S,
    FULL,
    IDEMPOTENCY_TTL_S,
    TAG_SCAN_LIMIT,
    HandedClaim,
    HandoffStore,
    Item,
    Position,
    PutOnce,
    PutRequest,
    QueueError,
    QueueFull,
    QueueStats,
    Seen,
    Superseded,
    Taker,
    Whereabouts,
)

T = TypeVar("T")
log = logging.getLogger("comfyserve.queue.sqlite")
_CHUNK = 500
CHECKPOINT_INTERVAL_S = 1.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS queues (
    name TEXT PRIMARY KEY,
    last_index INTEGER NOT NULL DEFAULT 0,
    length INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS items (
    queue TEXT NOT NULL,
    idx INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    body BLOB NOT NULL,
    owner TEXT,
    deadline REAL,
    PRIMARY KEY (queue, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS items_ready ON items (queue, priority DESC, idx) WHERE owner IS NULL;
CREATE INDEX IF NOT EXISTS items_owner ON items (queue, owner) WHERE owner IS NOT NULL;
CREATE INDEX IF NOT EXISTS items_deadline ON items (queue, deadline) WHERE owner IS NOT NULL;
CREATE INDEX IF NOT EXISTS items_rid ON items (queue, request_id);
CREATE TABLE IF NOT EXISTS dedup (
    queue TEXT NOT NULL,
    key TEXT NOT NULL,
    idx INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (queue, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedup_expires ON dedup (expires);
CREATE TABLE IF NOT EXISTS committed (
    queue TEXT NOT NULL,
    request_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (queue, request_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS committed_expires ON committed (queue, expires);
"""


class SQLiteStore(HandoffStore):
    backend = "sqlite"

    def __init__(self, path: Path, *, committed_ttl_s: float = COMMITTED_TTL_S,
                 committed_max: int = COMMITTED_MAX) -> None:
        self.path = path
        self.committed_ttl_s = committed_ttl_s
        self.committed_max = committed_max
        super().__init__()
        self._committed_counts: dict[str, int] = {}  # rows of ``committed`` per queue, counted once then kept
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._lock: BinaryIO | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        self._sessions: dict[tuple[str, str], str] = {}

    # -- plumbing -------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        assert self._executor is not None, "store is not open"
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        private_file(self.path)  # the queued prompts: the owner's eyes only (-wal/-shm follow its mode)
        # Sessions and wake-ups live in this process: a second process on the same file would
        # hand out items twice on reconnects. Redis is the store for several processes.
        lock = open(self.path.with_name(self.path.name + ".lock"), "a+b")  # noqa: SIM115 - held until close
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise QueueError(f"{self.path} is in use by another queue-service process "
                             "(one process per SQLite store; use --redis-url to run several)") from None
        self._lock = lock
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run beside the writer, see _checkpoints
        db.executescript(SCHEMA)
        self._db = db

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE, then COMMIT, or ROLLBACK when the body raises."""
        assert self._db is not None
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    async def open(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="queue-sqlite")
        try:
            await self._run(self._connect)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        self._checkpointer = asyncio.create_task(self._checkpoints(), name="queue-sqlite-checkpoints")

    async def _checkpoints(self) -> None:
        """Copy the WAL into the database on a thread of its own, once a second.

        SQLite's automatic checkpoint runs inside a commit and fsyncs: a put that
        triggers it waits ~20 ms. A PASSIVE checkpoint on another connection never
        blocks the writer, so puts keep a flat latency.
        """
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="queue-sqlite-checkpoint")
        db = await loop.run_in_executor(
            executor, lambda: sqlite3.connect(self.path, isolation_level=None, check_same_thread=False))
        try:
            while True:
                await asyncio.sleep(CHECKPOINT_INTERVAL_S)
                try:
                    await loop.run_in_executor(executor, db.execute, "PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:
                    log.warning("sqlite checkpoint failed: %s", exc)
        finally:
            executor.shutdown(wait=True)  # a checkpoint in progress finishes first
            db.close()

    async def close(self) -> None:
        if self._executor is None:
            return
        if self._checkpointer is not None:
            with contextlib.suppress(Exception):
                await cancel_and_wait(self._checkpointer)
            self._checkpointer = None
        if self._db is not None:
            await self._run(self._db.execute, "PRAGMA wal_checkpoint(TRUNCATE)")
            await self._run(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)
        self._executor = None
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def changes(self, queue: str) -> asyncio.Event:
        return self._notifier.event(queue)

    async def arm(self, queue: str) -> None:
        """Nothing to do: every change happens in this process and notifies directly."""

    # -- producers ------------------------------------------------------------

    @staticmethod
    def _insert(db: sqlite3.Connection, queue: str, requests: list[PutRequest]) -> list[int]:
        """Append inside the caller's transaction; FULL for each put the max length refuses."""
        row = db.execute("SELECT last_index, length FROM queues WHERE name = ?", (queue,)).fetchone()
        if row is None:
            db.execute("INSERT INTO queues (name) VALUES (?)", (queue,))
            row = (0, 0)
        last, length = row
        results: list[int] = []
        rows = []
        for request in requests:
            if request.max_length and length >= request.max_length:
                results.append(FULL)
                continue
            last += 1
            length += 1
            rows.append((queue, last, request.priority, request.request_id, request.body))
            results.append(last)
        if rows:
            db.executemany("INSERT INTO items (queue, idx, priority, request_id, body) VALUES (?, ?, ?, ?, ?)", rows)
            db.execute("UPDATE queues SET last_index = ?, length = ? WHERE name = ?", (last, length, queue))
        return results

    def _put_batch(self, queue: str, requests: list[PutRequest]) -> list[int]:
        """One transaction for a batch of puts."""
        with self._transaction() as db:
            return self._insert(db, queue, requests)

    def _put_and_remove(self, put_queue: str, request: PutRequest, remove_queue: str, indexes: list[int]) -> int:
        """One transaction: the put and the removal land together or not at all."""
        with self._transaction() as db:
            [index] = self._insert(db, put_queue, [request])
            if index == FULL:  # rolled back: nothing written, the input stays
                raise QueueFull(f"queue {put_queue!r} is full ({request.max_length} items)")
            self._delete_where(db, remove_queue, indexes)
            return index

    def _put_once(self, queue: str, request: PutRequest, key: str, ttl_s: float) -> PutOnce:
        """One transaction: forget expired keys, look the key up, else put and remember it."""
        now = time.time()
        with self._transaction() as db:
            db.execute("DELETE FROM dedup WHERE expires <= ?", (now,))
            row = db.execute("SELECT idx, request_id FROM dedup WHERE queue = ? AND key = ?", (queue, key)).fetchone()
            if row is not None:
                return PutOnce(row[0], row[1], duplicate=True)
            [index] = self._insert(db, queue, [request])
            if index == FULL:
                raise QueueFull(f"queue {queue!r} is full ({request.max_length} items)")
            if ttl_s > 0:
                db.execute("INSERT INTO dedup (queue, key, idx, request_id, expires) VALUES (?, ?, ?, ?, ?)",
                           (queue, key, index, request.request_id, now + ttl_s))
            return PutOnce(index, request.request_id, duplicate=False)

    def _put_batch_and_claim(self, queue: str, requests: list[PutRequest], takers: list[Taker]
                             ) -> tuple[list[int], list[HandedClaim]]:
        """The puts (one transaction), then each taker's claim (its own): one thread hop for all. A claim's
        failure is the taker's, never the puts' (they are committed by then)."""
        results = self._put_batch(queue, requests)
        claims: list[HandedClaim] = []
        for taker in takers:
            try:
                claims.append(self._claim_drained(taker))
            except Exception as exc:  # noqa: BLE001 - handed to that watcher
                claims.append(exc)
        return results, claims

    async def _put_many(self, queue: str, requests: list[PutRequest]) -> list[int]:
        return await self._run(self._put_batch, queue, requests)

    async def _put_many_and_claim(self, queue: str, requests: list[PutRequest], takers: list[Taker]
                                  ) -> tuple[list[int], list[HandedClaim]]:
        return await self._run(self._put_batch_and_claim, queue, requests, takers)

    async def put_once(self, queue: str, body: bytes, request_id: str, priority: int, max_length: int, *,
                       key: str, ttl_s: float = IDEMPOTENCY_TTL_S) -> PutOnce:
        result = await self._run(self._put_once, queue, PutRequest(body, request_id, priority, max_length), key, ttl_s)
        if not result.duplicate:
            self._notifier.notify(queue)
        return result

    async def put_and_remove(self, put_queue: str, body: bytes, request_id: str, priority: int, max_length: int,
                             remove_queue: str, indexes: list[int]) -> int:
        index = await self._run(self._put_and_remove, put_queue,
                                PutRequest(body, request_id, priority, max_length), remove_queue, indexes)
        self._notifier.notify(put_queue)
        self._handoff.removed(remove_queue)
        return index

    # -- readers --------------------------------------------------------------

    def _get(self, queue: str, start: int, length: int, request_id: str | None) -> list[Item]:
        assert self._db is not None
        if request_id is not None:
            rows = self._db.execute(
                "SELECT idx, body FROM items WHERE queue = ? AND request_id = ? AND idx >= ? ORDER BY idx LIMIT ?",
                (queue, request_id, start, length)).fetchall()
        else:
            rows = self._db.execute(
                "SELECT idx, body FROM items WHERE queue = ? AND idx >= ? ORDER BY idx LIMIT ?",
                (queue, start, length)).fetchall()
        return [Item(idx, body) for idx, body in rows]

    async def get(self, queue: str, start_index: int, length: int, request_id: str | None) -> list[Item]:
        return await self._run(self._get, queue, start_index, length, request_id)

    async def tail(self, queue: str, start_index: int, length: int) -> list[Item]:
        return await self.get(queue, start_index, length, None)  # arming is nothing here (see ``arm``)

    def _lookup(self, queue: str, request_id: str) -> Seen | None:
        assert self._db is not None
        row = self._db.execute("SELECT idx FROM items WHERE queue = ? AND request_id = ? ORDER BY idx DESC LIMIT 1",
                               (queue, request_id)).fetchone()
        if row is not None:
            return Seen(row[0], committed=False)
        row = self._db.execute("SELECT idx FROM committed WHERE queue = ? AND request_id = ? AND expires > ?",
                               (queue, request_id, time.time())).fetchone()
        return None if row is None else Seen(row[0], committed=True)

    async def lookup(self, queue: str, request_id: str) -> Seen | None:
        return await self._run(self._lookup, queue, request_id)

    def _stats(self, queue: str) -> QueueStats:
        assert self._db is not None
        row = self._db.execute("SELECT last_index, length FROM queues WHERE name = ?", (queue,)).fetchone()
        last, length = row or (0, 0)
        first = self._db.execute("SELECT MIN(idx) FROM items WHERE queue = ?", (queue,)).fetchone()[0]
        consumers = sum(1 for (q, _) in self._sessions if q == queue)
        return QueueStats(length=length, first_index=first or 0, last_index=last, consumers=consumers)

    async def stats(self, queue: str) -> QueueStats:
        return await self._run(self._stats, queue)

    def _position(self, queue: str, index: int) -> Position | None:
        assert self._db is not None
        row = self._db.execute("SELECT owner, deadline, priority FROM items WHERE queue = ? AND idx = ?",
                               (queue, index)).fetchone()
        if row is None:
            return None
        owner, deadline, priority = row
        if owner is not None and deadline >= time.time():
            return Position(pending=True, waiting=0)
        ahead = self._db.execute(
            "SELECT COUNT(*) FROM items WHERE queue = ? AND owner IS NULL AND "
            "(priority > ? OR (priority = ? AND idx < ?))", (queue, priority, priority, index)).fetchone()[0]
        return Position(pending=False, waiting=ahead)

    async def position(self, queue: str, index: int) -> Position | None:
        return await self._run(self._position, queue, index)

    def _whereabouts(self, queue: str, sink: str, progress: str, request_id: str | None, index_queue: str | None,
                     index_key: str | None) -> Whereabouts | None:
        """One executor hop; its reads see one state, the writer being this same thread."""
        assert self._db is not None
        db = self._db
        if index_queue and index_key:
            row = db.execute("SELECT body FROM items WHERE queue = ? AND request_id = ? ORDER BY idx DESC LIMIT 1",
                             (index_queue, index_key)).fetchone()
            if row is None:
                return None
            request_id = decode_frame(row[0])[2].decode()
        request_id = request_id or ""
        row = db.execute("SELECT idx, body FROM items WHERE queue = ? AND request_id = ? ORDER BY idx LIMIT 1",
                         (queue, request_id)).fetchone()
        if row is not None:
            item = Item(*row)
            position = self._position(queue, item.index)
            if position is not None:
                record = None
                if position.pending:
                    found = db.execute("SELECT idx, body FROM items WHERE queue = ? AND request_id = ? "
                                       "ORDER BY idx DESC LIMIT 1", (progress, request_id)).fetchone()
                    record = None if found is None else Item(*found)
                return Whereabouts(request_id, item=item, position=position, progress=record)
        row = db.execute("SELECT idx, body FROM items WHERE queue = ? AND request_id = ? ORDER BY idx LIMIT 1",
                         (sink, request_id)).fetchone()
        return Whereabouts(request_id, result=None if row is None else Item(*row))

    async def whereabouts(self, queue: str, sink: str, progress: str, *, request_id: str | None = None,
                          index_queue: str | None = None, index_key: str | None = None) -> Whereabouts | None:
        return await self._run(self._whereabouts, queue, sink, progress, request_id, index_queue, index_key)

    def _exists(self, queue: str) -> bool:
        assert self._db is not None
        return self._db.execute("SELECT 1 FROM queues WHERE name = ?", (queue,)).fetchone() is not None

    async def exists(self, queue: str) -> bool:
        return await self._run(self._exists, queue)

    # -- removal --------------------------------------------------------------

    def _remember(self, db: sqlite3.Connection, queue: str, condition: str, args: tuple[object, ...]) -> None:
        """Inside the removal's transaction: remember the requestIds of the items about to go (``lookup``),
        forget the expired ones and the oldest beyond ``committed_max``."""
        if self.committed_ttl_s <= 0 or self.committed_max <= 0:
            return
        now = time.time()
        added = db.execute("INSERT OR REPLACE INTO committed (queue, request_id, idx, expires) "
                           f"SELECT queue, request_id, idx, ? FROM items WHERE queue = ? AND {condition}",
                           (now + self.committed_ttl_s, queue, *args)).rowcount
        expired = db.execute("DELETE FROM committed WHERE queue = ? AND expires <= ?", (queue, now)).rowcount
        count = self._committed_counts.get(queue)
        if count is None:
            count = db.execute("SELECT COUNT(*) FROM committed WHERE queue = ?", (queue,)).fetchone()[0]
        else:
            count += added - expired  # a replaced row counts as added: the count errs high, trims a little early
        if count > self.committed_max:
            db.execute("DELETE FROM committed WHERE queue = ? AND request_id IN "
                       "(SELECT request_id FROM committed WHERE queue = ? ORDER BY expires LIMIT ?)",
                       (queue, queue, count - self.committed_max))
            count = self.committed_max
        self._committed_counts[queue] = count

    def _delete_where(self, db: sqlite3.Connection, queue: str, indexes: list[int]) -> int:
        removed = 0
        for start in range(0, len(indexes), _CHUNK):
            chunk = indexes[start:start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            self._remember(db, queue, f"idx IN ({marks})", tuple(chunk))
            removed += db.execute(f"DELETE FROM items WHERE queue = ? AND idx IN ({marks})",
                                  (queue, *chunk)).rowcount
        if removed:
            db.execute("UPDATE queues SET length = length - ? WHERE name = ?", (removed, queue))
        return removed

    def _remove(self, queue: str, indexes: list[int]) -> int:
        with self._transaction() as db:
            return self._delete_where(db, queue, indexes)

    async def remove(self, queue: str, indexes: list[int]) -> int:
        removed = await self._run(self._remove, queue, indexes)
        self._handoff.removed(queue)
        return removed

    def _truncate(self, queue: str, below: int) -> int:
        with self._transaction() as db:
            self._remember(db, queue, "idx < ?", (below,))
            removed = db.execute("DELETE FROM items WHERE queue = ? AND idx < ?", (queue, below)).rowcount
            if removed:
                db.execute("UPDATE queues SET length = length - ? WHERE name = ?", (removed, queue))
            return removed

    async def truncate(self, queue: str, below_index: int) -> int:
        removed = await self._run(self._truncate, queue, below_index)
        self._handoff.removed(queue)
        return removed

    # -- consumers ------------------------------------------------------------

    def _check(self, queue: str, consumer: str, session: str) -> None:
        if self._sessions.get((queue, consumer)) != session:
            raise Superseded(f"consumer {consumer!r} reconnected")

    def _open_session(self, queue: str, consumer: str, session: str, lease_s: float) -> list[Item]:
        assert self._db is not None
        self._sessions[(queue, consumer)] = session
        self._db.execute("UPDATE items SET deadline = ? WHERE queue = ? AND owner = ?",
                         (time.time() + lease_s, queue, consumer))
        rows = self._db.execute("SELECT idx, body FROM items WHERE queue = ? AND owner = ? ORDER BY idx",
                                (queue, consumer)).fetchall()
        return [Item(idx, body) for idx, body in rows]

    async def open_session(self, queue: str, consumer: str, session: str, lease_s: float) -> list[Item]:
        return await self._run(self._open_session, queue, consumer, session, lease_s)

    @staticmethod
    def _ready(db: sqlite3.Connection, queue: str, min_index: int, need: int,
               tags: dict[str, str] | None) -> list[Item]:
        """The next ``need`` ready items in delivery order (priority first), with ``tags`` if given."""
        query = ("SELECT idx, body FROM items WHERE queue = ? AND owner IS NULL AND idx >= ? "
                 "ORDER BY priority DESC, idx LIMIT ? OFFSET ?")
        if not tags:
            return [Item(idx, body) for idx, body in db.execute(query, (queue, min_index, need, 0))]
        found: list[Item] = []
        for offset in range(0, TAG_SCAN_LIMIT, _CHUNK):
            rows = db.execute(query, (queue, min_index, _CHUNK, offset)).fetchall()
            found += [item for item in (Item(idx, body) for idx, body in rows) if item.has_tags(tags)]
            if len(found) >= need or len(rows) < _CHUNK:
                break
        return found[:need]

    def _claim_drained(self, taker: Taker) -> tuple[list[Item], bool]:
        """The claim, and whether it drained what was ready for this consumer (took fewer than it could)."""
        queue, consumer, spec = taker.queue, taker.consumer, taker.spec
        self._check(queue, consumer, taker.session)
        window, auto_commit = spec.window, spec.auto_commit
        now = time.time()
        with self._transaction() as db:
            db.execute("UPDATE items SET owner = NULL, deadline = NULL "
                       "WHERE queue = ? AND owner IS NOT NULL AND deadline < ?", (queue, now))
            need = window
            if not auto_commit:
                need -= db.execute("SELECT COUNT(*) FROM items WHERE queue = ? AND owner = ?",
                                   (queue, consumer)).fetchone()[0]
            items: list[Item] = []
            if need > 0:
                items = self._ready(db, queue, spec.min_index, need, spec.tag_dict())
                if items and auto_commit:
                    self._delete_where(db, queue, [item.index for item in items])
                elif items:
                    marks = ",".join("?" * len(items))
                    db.execute(f"UPDATE items SET owner = ?, deadline = ? WHERE queue = ? AND idx IN ({marks})",
                               (consumer, now + spec.lease_s, queue, *(item.index for item in items)))
            return items, need > 0 and len(items) < need

    async def _claim(self, taker: Taker) -> tuple[list[Item], bool]:
        return await self._run(self._claim_drained, taker)

    def _pending(self, queue: str, consumer: str, session: str) -> list[Item]:
        assert self._db is not None
        self._check(queue, consumer, session)
        rows = self._db.execute("SELECT idx, body FROM items WHERE queue = ? AND owner = ? ORDER BY idx",
                                (queue, consumer)).fetchall()
        return [Item(idx, body) for idx, body in rows]

    async def pending(self, queue: str, consumer: str, session: str) -> list[Item]:
        return await self._run(self._pending, queue, consumer, session)

    def _renew(self, queue: str, consumer: str, session: str, lease_s: float) -> None:
        assert self._db is not None
        self._check(queue, consumer, session)
        self._db.execute("UPDATE items SET deadline = ? WHERE queue = ? AND owner = ?",
                         (time.time() + lease_s, queue, consumer))

    async def renew(self, queue: str, consumer: str, session: str, lease_s: float) -> None:
        await self._run(self._renew, queue, consumer, session, lease_s)

    def _release(self, queue: str, consumer: str, session: str) -> bool:
        assert self._db is not None
        if self._sessions.get((queue, consumer)) != session:
            return False
        del self._sessions[(queue, consumer)]
        return self._db.execute("UPDATE items SET owner = NULL, deadline = NULL WHERE queue = ? AND owner = ?",
                                (queue, consumer)).rowcount > 0

    def _release_one(self, queue: str, consumer: str, session: str, index: int) -> bool:
        assert self._db is not None
        if self._sessions.get((queue, consumer)) != session:
            return False
        return self._db.execute("UPDATE items SET owner = NULL, deadline = NULL WHERE queue = ? AND idx = ? "
                                "AND owner = ?", (queue, index, consumer)).rowcount > 0

    def _forget(self, queue: str, consumer: str, session: str) -> None:
        if self._sessions.get((queue, consumer)) == session:
            del self._sessions[(queue, consumer)]

    async def forget(self, queue: str, consumer: str, session: str) -> None:
        self._handoff.leave(queue, consumer, session)
        await self._run(self._forget, queue, consumer, session)  # on the store thread: no race with open

    async def release(self, queue: str, consumer: str, session: str) -> None:
        self._handoff.leave(queue, consumer, session)
        if await self._run(self._release, queue, consumer, session):
            self._notifier.notify(queue)

    async def release_one(self, queue: str, consumer: str, session: str, index: int) -> bool:
        released = await self._run(self._release_one, queue, consumer, session, index)
        if released:
            self._notifier.notify(queue)
        return released
