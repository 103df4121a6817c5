"""Cluster-edition accounts: names, hashed passwords, per-user API tokens, admins.

Passwords are hashed with scrypt (stdlib), tokens and session ids are random
and stored only as their SHA-256, so a leaked store reveals none of them. Each
account has a random id that is never reused: sessions belong to it, so a name
removed and created again does not inherit them. The store is SQLite in the
data dir by default, or Redis (``--redis-url``) so several proxies share users
and sessions (``accounts_store.py``).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from standard.datadir import DataDir
from standard.errors import ClusterError

from .accounts_store import Backend, Record, RedisBackend, SessionRecord, SqliteBackend

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}
MIN_PASSWORD_LENGTH = 8
SESSION_CACHE_S = 2.0  # how long a proxy trusts its last look at a session (revocation by a sibling proxy)
MAX_CACHED_SESSIONS = 10_000


class AccountError(ClusterError, ValueError):
    """A bad name, a duplicate, a short password: said plainly to the admin."""


@dataclass(frozen=True)
class User:
    name: str
    is_admin: bool
    disabled: bool = False


def _user(record: Record) -> User:
    return User(record.name, record.is_admin, record.disabled)


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


class Accounts:
    """The account operations the CLI, the login pages and the proxy share.

    Session checks are cached for ``cache_s`` (every request of a browser asks);
    whatever this object changes (logout, password, disable, removal) drops its
    own cache entries at once, so a revocation is immediate on the proxy that
    made it and reaches proxies sharing the Redis store within ``cache_s``.
    """

    def __init__(self, backend: Backend, *, cache_s: float = SESSION_CACHE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._backend = backend
        self._cache_s = cache_s
        self._clock = clock
        self._sessions: dict[str, tuple[float, User | None]] = {}  # digest -> (checked at, user)

    @classmethod
    async def open(cls, data_dir: DataDir | None, redis_url: str | None = None, *,
                   cache_s: float = SESSION_CACHE_S, clock: Callable[[], float] = time.monotonic) -> Accounts:
        """Redis when ``redis_url`` is given (``data_dir`` may then be None), else the data dir's SQLite."""
        if redis_url:
            backend: Backend = RedisBackend(redis_url)
        elif data_dir is not None:
            backend = SqliteBackend(data_dir.root / ".comfyserve" / "cluster.sqlite")
        else:
            raise ValueError("accounts need a data dir or a Redis URL")
        return cls(backend, cache_s=cache_s, clock=clock)

    async def aclose(self) -> None:
        await self._backend.aclose()

    async def add(self, name: str, password: str, admin: bool = False) -> str:
        """Create the account; returns its new API token (shown once, stored hashed)."""
        if not NAME_PATTERN.match(name):
            raise AccountError(f"invalid user name {name!r}: letters, digits, '_', '.', '-' (max 64)")
        _check_password(password)
        token = new_token()
        record = Record(name, await asyncio.to_thread(hash_password, password), token_hash(token), admin,
                        secrets.token_hex(16), time.time())
        if not await self._backend.insert(record):
            raise AccountError(f"user {name!r} already exists")
        return token

    async def remove(self, name: str) -> str | None:
        """Delete the account, its token and its sessions; returns its account id (None: no such user)."""
        record = await self._backend.delete(name)
        if record is None:
            return None
        await self._backend.delete_sessions(record.account_id)
        self._forget(name)
        return record.account_id

    async def list(self) -> list[User]:
        return [_user(record) for record in await self._backend.all()]

    async def get(self, name: str) -> User | None:
        record = await self._backend.get(name)
        return _user(record) if record else None

    async def verify_password(self, name: str, password: str) -> User | None:
        """The user if the password is right (a disabled user too: the caller says so, not 'wrong')."""
        record = await self._backend.get(name)
        stored = record.password_hash if record else _dummy_hash()  # same work whether the name exists or not
        matches = await asyncio.to_thread(password_matches, password, stored)
        return _user(record) if record and matches else None

    async def verify_token(self, token: str) -> User | None:
        record = await self._backend.by_token(token_hash(token))
        return _user(record) if record and not record.disabled else None

    # -- sessions ---------------------------------------------------------------------

    async def start_session(self, name: str, ttl_s: float) -> str:
        """A new session id for an enabled user (the caller checked the password)."""
        record = await self._backend.get(name)
        if record is None or record.disabled:
            raise AccountError(f"user {name!r} cannot log in")
        session_id = secrets.token_urlsafe(32)
        await self._backend.add_session(token_hash(session_id),
                                        SessionRecord(record.account_id, name, time.time() + ttl_s))
        return session_id

    async def session_user(self, session_id: str) -> User | None:
        """Who holds this session: None once it expired, was revoked, or its account is gone or disabled."""
        digest = token_hash(session_id)
        now = self._clock()
        cached = self._sessions.get(digest)
        if cached is not None and now - cached[0] < self._cache_s:
            return cached[1]
        user = None
        session = await self._backend.get_session(digest)
        if session is not None and session.expires_s > time.time():
            record = await self._backend.get(session.name)
            if record is not None and record.account_id == session.account_id and not record.disabled:
                user = _user(record)
        if len(self._sessions) >= MAX_CACHED_SESSIONS:
            self._sessions = {k: v for k, v in self._sessions.items() if now - v[0] < self._cache_s}
            if len(self._sessions) >= MAX_CACHED_SESSIONS:
                self._sessions.clear()
        self._sessions[digest] = (now, user)
        return user

    async def end_session(self, session_id: str) -> None:
        digest = token_hash(session_id)
        self._sessions.pop(digest, None)
        await self._backend.delete_session(digest)

    def _forget(self, name: str) -> None:
        """Drop cached session checks of ``name`` (after a change that may revoke them)."""
        self._sessions = {k: v for k, v in self._sessions.items() if v[1] is None or v[1].name != name}

    async def _revoke_sessions(self, record: Record, keep_session: str | None = None) -> None:
        await self._backend.delete_sessions(record.account_id, token_hash(keep_session) if keep_session else None)
        self._forget(record.name)

    # -- credentials ------------------------------------------------------------------

    async def _record(self, name: str) -> Record:
        record = await self._backend.get(name)
        if record is None:
            raise AccountError(f"no user {name!r}")
        return record

    async def reset_token(self, name: str) -> str:
        """A new API token; the old one and every open session stop working."""
        record = await self._record(name)
        token, old = new_token(), record.token_hash
        record.token_hash = token_hash(token)
        await self._backend.update(record, old)
        await self._revoke_sessions(record)
        return token

    async def set_password(self, name: str, password: str, *, keep_session: str | None = None) -> None:
        """A new password (an admin's reset, or the user's own change): every other session ends."""
        _check_password(password)
        record = await self._record(name)
        record.password_hash = await asyncio.to_thread(hash_password, password)
        await self._backend.update(record, record.token_hash)
        await self._revoke_sessions(record, keep_session)

    async def set_disabled(self, name: str, disabled: bool) -> None:
        """A disabled user cannot log in; their token and sessions stop working (enabling brings the token back)."""
        record = await self._record(name)
        record.disabled = disabled
        await self._backend.update(record, record.token_hash)
        await self._revoke_sessions(record)

    async def set_admin(self, name: str, admin: bool) -> None:
        """Grant or take back the admin role; the user's sessions end, so no page keeps the old role."""
        record = await self._record(name)
        record.is_admin = admin
        await self._backend.update(record, record.token_hash)
        await self._revoke_sessions(record)


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"password too short: at least {MIN_PASSWORD_LENGTH} characters")


@functools.cache
def _dummy_hash() -> str:
    return hash_password("comfyserve-no-such-user", b"\0" * 16)
