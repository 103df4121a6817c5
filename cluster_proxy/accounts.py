"""Cluster-edition accounts: names, hashed passwords, per-user API tokens, admins.

Passwords are hashed with scrypt (stdlib), tokens are random and stored only as
their SHA-256, so a leaked store reveals neither. The store is SQLite in the
data dir by default, or Redis (``--redis-url``) so several proxies share users.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import re
import secrets
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from standard.datadir import DataDir

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}
MIN_PASSWORD_LENGTH = 8


class AccountError(ValueError):
    """A bad name, a duplicate, a short password: said plainly to the admin."""


@dataclass(frozen=True)
class User:
    name: str
    is_admin: bool


@dataclass
class _Record:
    name: str
    password_hash: str
    token_hash: str
    is_admin: bool
    version: int  # bumped when credentials change: old sessions stop working
    created_s: float

    def user(self) -> User:
        return User(self.name, self.is_admin)


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **SCRYPT)
    return f"scrypt${salt.hex()}${digest.hex()}"


def password_matches(password: str, stored: str) -> bool:
    try:
        scheme, salt_hex, digest_hex = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    digest = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt_hex), **SCRYPT)
    return hmac.compare_digest(digest.hex(), digest_hex)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def new_token() -> str:
    return "csu_" + secrets.token_urlsafe(32)


class _Backend(Protocol):
    async def get(self, name: str) -> _Record | None: ...
    async def by_token(self, digest: str) -> _Record | None: ...
    async def insert(self, record: _Record) -> bool: ...
    async def update(self, record: _Record, old_token_hash: str) -> None: ...
    async def delete(self, name: str) -> _Record | None: ...
    async def all(self) -> list[_Record]: ...
    async def aclose(self) -> None: ...


class _SqliteBackend:
    """One connection used from one worker thread at a time (``asyncio.to_thread`` + a lock)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, password_hash TEXT NOT NULL,"
            " token_hash TEXT NOT NULL UNIQUE, is_admin INTEGER NOT NULL, version INTEGER NOT NULL,"
            " created_s REAL NOT NULL)")
        self._lock = asyncio.Lock()

    async def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        async with self._lock:
            return await asyncio.to_thread(lambda: self._db.execute(sql, args).fetchall())

    @staticmethod
    def _record(row: tuple[Any, ...] | None) -> _Record | None:
        if row is None:
            return None
        name, password_hash, digest, is_admin, version, created = row
        return _Record(name, password_hash, digest, bool(is_admin), version, created)

    async def get(self, name: str) -> _Record | None:
        rows = await self._run("SELECT * FROM users WHERE name = ?", (name,))
        return self._record(rows[0] if rows else None)

    async def by_token(self, digest: str) -> _Record | None:
        rows = await self._run("SELECT * FROM users WHERE token_hash = ?", (digest,))
        return self._record(rows[0] if rows else None)

    async def insert(self, record: _Record) -> bool:
        try:
            await self._run("INSERT INTO users VALUES (?, ?, ?, ?, ?, ?)", (
                record.name, record.password_hash, record.token_hash, int(record.is_admin), record.version,
                record.created_s))
        except sqlite3.IntegrityError:
            return False
        return True

    async def update(self, record: _Record, old_token_hash: str) -> None:
        await self._run("UPDATE users SET password_hash = ?, token_hash = ?, is_admin = ?, version = ?"
                        " WHERE name = ?", (record.password_hash, record.token_hash, int(record.is_admin),
                                            record.version, record.name))

    async def delete(self, name: str) -> _Record | None:
        record = await self.get(name)
        if record is not None:
            await self._run("DELETE FROM users WHERE name = ?", (name,))
        return record

    async def all(self) -> list[_Record]:
        return [r for row in await self._run("SELECT * FROM users ORDER BY name") if (r := self._record(row))]

    async def aclose(self) -> None:
        async with self._lock:
            await asyncio.to_thread(self._db.close)


class _RedisBackend:
    """``{prefix}user:{name}`` holds the record as JSON; ``{prefix}token:{sha256}`` maps to the name."""

    def __init__(self, url: str, prefix: str = "comfyserve:cluster:") -> None:
        import redis.asyncio as redis

        self._redis = redis.Redis.from_url(url, decode_responses=True)
        self._prefix = prefix

    def _user_key(self, name: str) -> str:
        return f"{self._prefix}user:{name}"

    def _token_key(self, digest: str) -> str:
        return f"{self._prefix}token:{digest}"

    async def get(self, name: str) -> _Record | None:
        raw = await self._redis.get(self._user_key(name))
        return _Record(**json.loads(raw)) if raw else None

    async def by_token(self, digest: str) -> _Record | None:
        name = await self._redis.get(self._token_key(digest))
        return await self.get(name) if name else None

    async def insert(self, record: _Record) -> bool:
        if not await self._redis.set(self._user_key(record.name), json.dumps(asdict(record)), nx=True):
            return False
        await self._redis.set(self._token_key(record.token_hash), record.name)
        await self._redis.sadd(f"{self._prefix}users", record.name)
        return True

    async def update(self, record: _Record, old_token_hash: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._user_key(record.name), json.dumps(asdict(record)))
            if old_token_hash != record.token_hash:
                pipe.delete(self._token_key(old_token_hash))
                pipe.set(self._token_key(record.token_hash), record.name)
            await pipe.execute()

    async def delete(self, name: str) -> _Record | None:
        record = await self.get(name)
        if record is not None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._user_key(name), self._token_key(record.token_hash))
                pipe.srem(f"{self._prefix}users", name)
                await pipe.execute()
        return record

    async def all(self) -> list[_Record]:
        names = sorted(await self._redis.smembers(f"{self._prefix}users"))
        records = [await self.get(name) for name in names]
        return [r for r in records if r is not None]

    async def aclose(self) -> None:
        await self._redis.aclose()


class Accounts:
    """The account operations the CLI, the login pages and the proxy share."""

    def __init__(self, backend: _Backend) -> None:
        self._backend = backend

    @classmethod
    async def open(cls, data_dir: DataDir, redis_url: str | None = None) -> Accounts:
        if redis_url:
            return cls(_RedisBackend(redis_url))
        return cls(_SqliteBackend(data_dir.root / ".comfyserve" / "cluster.sqlite"))

    async def aclose(self) -> None:
        await self._backend.aclose()

    async def add(self, name: str, password: str, admin: bool = False) -> str:
        """Create the account; returns its new API token (shown once, stored hashed)."""
        if not NAME_PATTERN.match(name):
            raise AccountError(f"invalid user name {name!r}: letters, digits, '_', '.', '-' (max 64)")
        _check_password(password)
        token = new_token()
        record = _Record(name, await asyncio.to_thread(hash_password, password), token_hash(token), admin, 1,
                         time.time())
        if not await self._backend.insert(record):
            raise AccountError(f"user {name!r} already exists")
        return token

    async def remove(self, name: str) -> bool:
        return await self._backend.delete(name) is not None

    async def list(self) -> list[User]:
        return [record.user() for record in await self._backend.all()]

    async def get(self, name: str) -> User | None:
        record = await self._backend.get(name)
        return record.user() if record else None

    async def session(self, name: str) -> tuple[User, int] | None:
        """The user and the credential version a session cookie must carry (None: no such user)."""
        record = await self._backend.get(name)
        return (record.user(), record.version) if record else None

    async def verify_password(self, name: str, password: str) -> User | None:
        record = await self._backend.get(name)
        stored = record.password_hash if record else _dummy_hash()  # same work whether the name exists or not
        matches = await asyncio.to_thread(password_matches, password, stored)
        return record.user() if record and matches else None

    async def verify_token(self, token: str) -> User | None:
        record = await self._backend.by_token(token_hash(token))
        return record.user() if record else None

    async def reset_token(self, name: str) -> str:
        """A new API token; the old one and every open session stop working."""
        record = await self._backend.get(name)
        if record is None:
            raise AccountError(f"no user {name!r}")
        token, old = new_token(), record.token_hash
        record.token_hash, record.version = token_hash(token), record.version + 1
        await self._backend.update(record, old)
        return token

    async def set_password(self, name: str, password: str) -> None:
        _check_password(password)
        record = await self._backend.get(name)
        if record is None:
            raise AccountError(f"no user {name!r}")
        record.password_hash = await asyncio.to_thread(hash_password, password)
        record.version += 1
        await self._backend.update(record, record.token_hash)


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"password too short: at least {MIN_PASSWORD_LENGTH} characters")


@functools.cache
def _dummy_hash() -> str:
    return hash_password("comfyserve-no-such-user", b"\0" * 16)
