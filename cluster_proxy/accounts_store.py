"""Where accounts and login sessions live: SQLite in the data dir, or Redis (``--redis-url``).

Both keep the same things:
    account records      name, scrypt password hash, SHA-256 of the API token, admin, disabled,
                         and ``account_id``: random, never reused, so a name removed and created
                         again is a new account (old sessions, token and files do not carry over)
    sessions             SHA-256 of a session id -> (account_id, name, expiry); a browser holds the
                         id itself. Revoking a session deletes it here, which every proxy sharing
                         the store sees.
Redis keys (prefix ``comfyserve:cluster:``): ``user:<name>`` (JSON record), ``token:<sha256>`` (name),
``users`` (set of names), ``session:<sha256>`` (JSON, expires with the session),
``account-sessions:<account_id>`` (set of that account's session digests).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol, cast

from standard.private import private_dir, private_file

from .store import REDIS_CALL_TIMEOUT_S, REDIS_CLIENT_OPTIONS, StateUnavailable, redis_errors_translated


@dataclass
class Record:
    name: str
    password_hash: str
    token_hash: str
    is_admin: bool
    account_id: str
    created_s: float
    disabled: bool = False

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Record:
        """Also reads records written before accounts had an id (they carried a ``version``)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        values.setdefault("account_id", legacy_account_id(raw["name"], raw["created_s"]))
        return cls(**values)


@dataclass(frozen=True)
class SessionRecord:
    account_id: str
    name: str
    expires_s: float


def legacy_account_id(name: str, created_s: float) -> str:
    """A stable id for an account made before ids existed (its creation time tells two incarnations apart)."""
    return "legacy-" + hashlib.sha256(f"{name}|{created_s!r}".encode()).hexdigest()[:24]


class Backend(Protocol):
    async def get(self, name: str) -> Record | None: ...
    async def by_token(self, digest: str) -> Record | None: ...
    async def insert(self, record: Record) -> bool: ...
    async def update(self, record: Record, old_token_hash: str) -> None: ...
    async def delete(self, name: str) -> Record | None: ...
    async def all(self) -> list[Record]: ...
    async def add_session(self, digest: str, session: SessionRecord) -> None: ...
    async def get_session(self, digest: str) -> SessionRecord | None: ...
    async def delete_session(self, digest: str) -> None: ...
    async def delete_sessions(self, account_id: str, keep: str | None = None) -> None: ...
    async def aclose(self) -> None: ...


_COLUMNS = "name, password_hash, token_hash, is_admin, account_id, created_s, disabled"


class SqliteBackend:
    """One connection used from one worker thread at a time (``asyncio.to_thread`` + a lock)."""

    def __init__(self, path: Path) -> None:
        private_dir(path.parent)
        private_file(path)  # password and token hashes: the owner's eyes only (-wal/-shm follow its mode)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, password_hash TEXT NOT NULL,"
            " token_hash TEXT NOT NULL UNIQUE, is_admin INTEGER NOT NULL, version INTEGER NOT NULL,"
            " created_s REAL NOT NULL, account_id TEXT, disabled INTEGER NOT NULL DEFAULT 0)")
        self._migrate()
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS sessions (digest TEXT PRIMARY KEY, account_id TEXT NOT NULL,"
            " name TEXT NOT NULL, expires_s REAL NOT NULL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS sessions_account ON sessions (account_id)")
        self._lock = asyncio.Lock()

    def _migrate(self) -> None:
        """Stores made before accounts had ids or could be disabled get the columns (and ids).

        ``version`` is what those stores tied sessions to; it stays (unused) so they open unchanged.
        """
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(users)")}
        if "account_id" not in columns:
            self._db.execute("ALTER TABLE users ADD COLUMN account_id TEXT")
        if "disabled" not in columns:
            self._db.execute("ALTER TABLE users ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0")
        for name, created in self._db.execute("SELECT name, created_s FROM users WHERE account_id IS NULL").fetchall():
            self._db.execute("UPDATE users SET account_id = ? WHERE name = ?", (legacy_account_id(name, created), name))

    async def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        async with self._lock:
            try:
                return await asyncio.to_thread(lambda: self._db.execute(sql, args).fetchall())
            except sqlite3.IntegrityError:
                raise  # a taken name or token: the caller's answer, not a failure
            except sqlite3.Error as exc:
                raise StateUnavailable(f"sqlite: {exc}") from exc

    @staticmethod
    def _record(row: tuple[Any, ...] | None) -> Record | None:
        if row is None:
            return None
        name, password_hash, digest, is_admin, account_id, created, disabled = row
        return Record(name, password_hash, digest, bool(is_admin), account_id, created, bool(disabled))

    async def get(self, name: str) -> Record | None:
        rows = await self._run(f"SELECT {_COLUMNS} FROM users WHERE name = ?", (name,))
        return self._record(rows[0] if rows else None)

    async def by_token(self, digest: str) -> Record | None:
        rows = await self._run(f"SELECT {_COLUMNS} FROM users WHERE token_hash = ?", (digest,))
        return self._record(rows[0] if rows else None)

    async def insert(self, record: Record) -> bool:
        try:
            await self._run(f"INSERT INTO users ({_COLUMNS}, version) VALUES (?, ?, ?, ?, ?, ?, ?, 0)", (
                record.name, record.password_hash, record.token_hash, int(record.is_admin), record.account_id,
                record.created_s, int(record.disabled)))
        except sqlite3.IntegrityError:
            return False
        return True

    async def update(self, record: Record, old_token_hash: str) -> None:
        await self._run("UPDATE users SET password_hash = ?, token_hash = ?, is_admin = ?, disabled = ?"
                        " WHERE name = ? AND account_id = ?",
                        (record.password_hash, record.token_hash, int(record.is_admin), int(record.disabled),
                         record.name, record.account_id))

    async def delete(self, name: str) -> Record | None:
        record = await self.get(name)
        if record is not None:
            await self._run("DELETE FROM users WHERE name = ?", (name,))
        return record

    async def all(self) -> list[Record]:
        rows = await self._run(f"SELECT {_COLUMNS} FROM users ORDER BY name")
        return [r for row in rows if (r := self._record(row))]

    async def add_session(self, digest: str, session: SessionRecord) -> None:
        await self._run("DELETE FROM sessions WHERE expires_s < ?", (time.time(),))
        await self._run("INSERT INTO sessions VALUES (?, ?, ?, ?)",
                        (digest, session.account_id, session.name, session.expires_s))

    async def get_session(self, digest: str) -> SessionRecord | None:
        rows = await self._run("SELECT account_id, name, expires_s FROM sessions WHERE digest = ?", (digest,))
        return SessionRecord(*rows[0]) if rows else None

    async def delete_session(self, digest: str) -> None:
        await self._run("DELETE FROM sessions WHERE digest = ?", (digest,))

    async def delete_sessions(self, account_id: str, keep: str | None = None) -> None:
        await self._run("DELETE FROM sessions WHERE account_id = ? AND digest != ?", (account_id, keep or ""))

    async def aclose(self) -> None:
        async with self._lock:
            await asyncio.to_thread(self._db.close)


@redis_errors_translated
class RedisBackend:
    """The same records in Redis, so several proxies share users and sessions."""

    def __init__(self, url: str, prefix: str = "comfyserve:cluster:", *,
                 call_timeout_s: float = REDIS_CALL_TIMEOUT_S) -> None:
        import redis.asyncio as redis

        # decode_responses: every reply is str (redis-py types them bytes | str, hence the casts below).
        self._redis = redis.Redis.from_url(url, decode_responses=True, **REDIS_CLIENT_OPTIONS)
        self.call_timeout_s = call_timeout_s  # each public method's bound (redis_errors_translated)
        self._prefix = prefix

    def _user_key(self, name: str) -> str:
        return f"{self._prefix}user:{name}"

    def _token_key(self, digest: str) -> str:
        return f"{self._prefix}token:{digest}"

    def _session_key(self, digest: str) -> str:
        return f"{self._prefix}session:{digest}"

    def _account_sessions_key(self, account_id: str) -> str:
        return f"{self._prefix}account-sessions:{account_id}"

    async def get(self, name: str) -> Record | None:
        raw = await self._redis.get(self._user_key(name))
        return Record.from_dict(json.loads(raw)) if raw else None

    async def by_token(self, digest: str) -> Record | None:
        name = cast("str | None", await self._redis.get(self._token_key(digest)))
        record = await self.get(name) if name else None
        return record if record is not None and record.token_hash == digest else None

    async def insert(self, record: Record) -> bool:
        if not await self._redis.set(self._user_key(record.name), json.dumps(asdict(record)), nx=True):
            return False
        await self._redis.set(self._token_key(record.token_hash), record.name)
        await self._redis.sadd(f"{self._prefix}users", record.name)
        return True

    async def update(self, record: Record, old_token_hash: str) -> None:
        """Only the same account (a name removed and made again meanwhile is another one)."""
        from redis.exceptions import WatchError

        key = self._user_key(record.name)
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if not raw or Record.from_dict(json.loads(raw)).account_id != record.account_id:
                        await pipe.unwatch()
                        return
                    pipe.multi()
                    pipe.set(key, json.dumps(asdict(record)))
                    if old_token_hash != record.token_hash:
                        pipe.delete(self._token_key(old_token_hash))
                        pipe.set(self._token_key(record.token_hash), record.name)
                    await pipe.execute()
                    return
                except WatchError:
                    continue

    async def delete(self, name: str) -> Record | None:
        record = await self.get(name)
        if record is not None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._user_key(name), self._token_key(record.token_hash))
                pipe.srem(f"{self._prefix}users", name)
                await pipe.execute()
        return record

    async def all(self) -> list[Record]:
        names = sorted(cast("set[str]", await self._redis.smembers(f"{self._prefix}users")))
        records = [await self.get(name) for name in names]
        return [r for r in records if r is not None]

    async def add_session(self, digest: str, session: SessionRecord) -> None:
        ttl_s = max(int(session.expires_s - time.time()), 1)
        index = self._account_sessions_key(session.account_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._session_key(digest), json.dumps(asdict(session)), ex=ttl_s)
            pipe.sadd(index, digest)
            pipe.expire(index, ttl_s)  # sessions all last as long: the newest outlives the others
            await pipe.execute()

    async def get_session(self, digest: str) -> SessionRecord | None:
        raw = await self._redis.get(self._session_key(digest))
        return SessionRecord(**json.loads(raw)) if raw else None

    async def delete_session(self, digest: str) -> None:
        session = await self.get_session(digest)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._session_key(digest))
            if session is not None:
                pipe.srem(self._account_sessions_key(session.account_id), digest)
            await pipe.execute()

    async def delete_sessions(self, account_id: str, keep: str | None = None) -> None:
        index = self._account_sessions_key(account_id)
        digests = [d for d in cast("set[str]", await self._redis.smembers(index)) if d != keep]
        if digests:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(*(self._session_key(d) for d in digests))
                pipe.srem(index, *digests)
                await pipe.execute()

    async def aclose(self) -> None:
        await self._redis.aclose()
