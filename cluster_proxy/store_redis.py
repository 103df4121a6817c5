"""The cluster's state in Redis (``--redis-url``): several proxies see the same queues.

Keys under ``comfyserve:cluster:state:``:
    task:<id>                 the task as JSON
    state:<state>             ids of all tasks in that state (pending, running)
    user:<name>:<state>       ids of one user's tasks in that state
    uid:<name>:<prompt_id>    the task id behind a user's prompt id
    seq                       the submission counter
    instances                 instance URLs added at run time
    lease:<url>               which task holds an instance (a TTL, renewed while it runs)
    proxies                   live proxies (sorted set: id -> heartbeat deadline)
Every state change is a WATCH/MULTI transaction on the task's key, so a task
is claimed by one proxy only, and a retried or finished task is never claimed again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, cast

import redis.asyncio as redis
from redis.exceptions import WatchError

from .store import (
    DONE,
    PENDING,
    REDIS_CALL_TIMEOUT_S,
    REDIS_CLIENT_OPTIONS,
    RUNNING,
    Task,
    TransitionRefused,
    Usage,
    _order,
    adopt_change,
    claim_change,
    finish_change,
    redis_errors_translated,
    requeue_change,
    started_change,
    withdraw_change,
)

PREFIX = "comfyserve:cluster:state:"


RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


@redis_errors_translated
class RedisStateStore:
    shared = True

    def __init__(self, url: str, *, history_max_items: int = 10000, prefix: str = PREFIX,
                 call_timeout_s: float = REDIS_CALL_TIMEOUT_S) -> None:
        # decode_responses: every reply is str (redis-py types them bytes | str, hence the casts below).
        self._redis = redis.Redis.from_url(url, decode_responses=True, **REDIS_CLIENT_OPTIONS)
        self.call_timeout_s = call_timeout_s  # each public method's bound (redis_errors_translated)
        self._p = prefix
        self._history_max_items = history_max_items

    def _task_key(self, task_id: str) -> str:
        return f"{self._p}task:{task_id}"

    def _uid_key(self, user: str, prompt_id: str) -> str:
        return f"{self._p}uid:{user}:{prompt_id}"

    def _user_key(self, user: str, state: str) -> str:
        return f"{self._p}user:{user}:{state}"

    def _state_key(self, state: str) -> str:
        return f"{self._p}state:{state}"

    def _stage(self, pipe: Any, task: Task, old_state: str | None) -> None:
        pipe.set(self._task_key(task.id), task.to_json())
        if old_state is not None and old_state != task.state:
            pipe.srem(self._state_key(old_state), task.id)
            pipe.srem(self._user_key(task.user, old_state), task.id)
        pipe.sadd(self._state_key(task.state), task.id)
        pipe.sadd(self._user_key(task.user, task.state), task.id)

    async def _load(self, ids: list[str]) -> list[Task]:
        if not ids:
            return []
        raws = await self._redis.mget([self._task_key(i) for i in ids])
        return [Task.from_json(raw) for raw in raws if raw]

    # -- interface --------------------------------------------------------------------

    async def next_seq(self) -> int:
        return int(await self._redis.incr(f"{self._p}seq"))

    async def add(self, task: Task) -> bool:
        uid = self._uid_key(task.user, task.prompt_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(uid)
                    old_id = cast("str | None", await pipe.get(uid))
                    old_raw = await pipe.get(self._task_key(old_id)) if old_id else None
                    old = Task.from_json(old_raw) if old_raw else None
                    if old is not None and old.state != DONE:
                        await pipe.unwatch()
                        return False
                    pipe.multi()
                    if old is not None:
                        self._unstage(pipe, old)
                    pipe.set(uid, task.id)
                    self._stage(pipe, task, None)
                    await pipe.execute()
                    return True
                except WatchError:
                    continue

    def _unstage(self, pipe: Any, task: Task) -> None:
        pipe.delete(self._task_key(task.id))
        pipe.srem(self._state_key(task.state), task.id)
        pipe.srem(self._user_key(task.user, task.state), task.id)

    async def get(self, user: str, prompt_id: str) -> Task | None:
        task_id = cast("str | None", await self._redis.get(self._uid_key(user, prompt_id)))
        return await self.get_by_id(task_id) if task_id else None

    async def get_by_id(self, task_id: str) -> Task | None:
        found = await self._load([task_id])
        return found[0] if found else None

    async def user_tasks(self, user: str, state: str) -> list[Task]:
        ids = list(cast("set[str]", await self._redis.smembers(self._user_key(user, state))))
        return _order([t for t in await self._load(ids) if t.state == state], state)

    async def pending(self) -> list[Task]:
        ids = list(cast("set[str]", await self._redis.smembers(self._state_key(PENDING))))
        return _order([t for t in await self._load(ids) if t.state == PENDING], PENDING)

    async def running(self) -> list[Task]:
        ids = list(cast("set[str]", await self._redis.smembers(self._state_key(RUNNING))))
        return _order([t for t in await self._load(ids) if t.state == RUNNING], RUNNING)

    async def _transition(self, task_id: str, from_state: str, change: Callable[[Task], None],
                          also: Callable[[Any, Task], None] | None = None) -> Task | None:
        """``change`` the task if it is in ``from_state``; ``also`` stages more writes in the same MULTI."""
        key = self._task_key(task_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    task = Task.from_json(raw) if raw else None
                    if task is None or task.state != from_state:
                        await pipe.unwatch()
                        return None
                    try:
                        change(task)
                    except TransitionRefused:
                        await pipe.unwatch()
                        return None
                    pipe.multi()
                    self._stage(pipe, task, from_state)
                    if also is not None:
                        also(pipe, task)
                    await pipe.execute()
                    return task
                except WatchError:
                    continue

    async def claim(self, task_id: str, instance: str, proxy: str = "", ahead: bool = False) -> Task | None:
        return await self._transition(task_id, PENDING, claim_change(instance, proxy, ahead))

    async def mark_started(self, task_id: str) -> Task | None:
        return await self._transition(task_id, RUNNING, started_change)

    async def request_withdraw(self, task_id: str) -> Task | None:
        return await self._transition(task_id, RUNNING, withdraw_change)

    async def adopt(self, task_id: str, old_proxy: str | None, new_proxy: str) -> Task | None:
        return await self._transition(task_id, RUNNING, adopt_change(old_proxy, new_proxy))

    async def heartbeat(self, proxy: str, ttl_s: float) -> None:
        key = f"{self._p}proxies"
        now = time.time()
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zadd(key, {proxy: now + ttl_s})
            pipe.zremrangebyscore(key, "-inf", now - 60)
            await pipe.execute()

    async def alive_proxies(self) -> set[str]:
        return set(cast("list[str]", await self._redis.zrangebyscore(f"{self._p}proxies", time.time(), "+inf")))

    async def requeue(self, task_id: str, note: str) -> Task | None:
        return await self._transition(task_id, RUNNING, requeue_change(note))

    async def finish(self, task_id: str, history: dict[str, Any]) -> Task | None:
        # Its usage is written in the same transaction: no crash can keep one without the other.
        task = await self._transition(task_id, RUNNING, finish_change(history),
                                      lambda pipe, done: self._stage_usage(pipe, Usage.of(done)))
        if task is not None:
            await self._prune(task.user)
        return task

    async def _prune(self, user: str) -> None:
        if await self._redis.scard(self._user_key(user, DONE)) <= self._history_max_items:
            return
        done = await self.user_tasks(user, DONE)
        for task in done[: len(done) - self._history_max_items]:
            await self._drop(task)

    async def _drop(self, task: Task) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            self._unstage(pipe, task)
            pipe.delete(self._uid_key(task.user, task.prompt_id))
            await pipe.execute()

    async def delete(self, user: str, prompt_ids: list[str] | None, state: str) -> list[str]:
        tasks = await self.user_tasks(user, state)
        if prompt_ids is not None:
            wanted = set(prompt_ids)
            tasks = [t for t in tasks if t.prompt_id in wanted]
        deleted = []
        for task in tasks:
            key = self._task_key(task.id)
            async with self._redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if not raw or json.loads(raw).get("state") != state:
                        await pipe.unwatch()
                        continue  # it moved on meanwhile (e.g. started running)
                    pipe.multi()
                    self._unstage(pipe, task)
                    pipe.delete(self._uid_key(task.user, task.prompt_id))
                    await pipe.execute()
                except WatchError:
                    continue
            deleted.append(task.prompt_id)
        return deleted

    async def add_instance_url(self, url: str) -> None:
        await self._redis.sadd(f"{self._p}instances", url)

    async def remove_instance_url(self, url: str) -> None:
        await self._redis.srem(f"{self._p}instances", url)

    def _stage_usage(self, pipe: Any, usage: Usage) -> None:
        member = json.dumps([usage.task_id, usage.user, usage.instance_ms, usage.status], separators=(",", ":"))
        pipe.zadd(f"{self._p}usage", {member: usage.ended_ms}, nx=True)

    async def record_usage(self, usage: Usage) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            self._stage_usage(pipe, usage)
            await pipe.execute()

    async def usage(self, since_ms: int, until_ms: int) -> list[Usage]:
        rows = await self._redis.zrangebyscore(f"{self._p}usage", since_ms, f"({until_ms}", withscores=True)
        found = []
        for member, score in cast("list[tuple[str, float]]", rows):
            task_id, user, instance_ms, status = json.loads(member)
            found.append(Usage(task_id, user, int(score), int(instance_ms), status))
        return found

    async def instance_urls(self) -> list[str]:
        return sorted(cast("set[str]", await self._redis.smembers(f"{self._p}instances")))

    def _lease_key(self, url: str) -> str:
        return f"{self._p}lease:{url}"

    async def lease_instance(self, url: str, holder: str, ttl_s: float) -> bool:
        return bool(await self._redis.set(self._lease_key(url), holder, nx=True, px=int(ttl_s * 1000)))

    async def renew_instance(self, url: str, holder: str, ttl_s: float) -> bool:
        return bool(await self._redis.eval(RENEW, 1, self._lease_key(url), holder, int(ttl_s * 1000)))

    async def release_instance(self, url: str, holder: str) -> None:
        await self._redis.eval(RELEASE, 1, self._lease_key(url), holder)

    async def aclose(self) -> None:
        await self._redis.aclose()
