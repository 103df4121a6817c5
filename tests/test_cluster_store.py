"""Cluster edition: the state store (SQLite and Redis, one suite) and surviving a proxy restart."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from cluster_proxy.store import DONE, PENDING, RUNNING, SqliteStateStore, Task
from cluster_proxy.store_redis import RedisStateStore
from support.cluster import Cluster, files_under, graph
from support.wait import until


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "sqlite":
        opened: Any = SqliteStateStore(tmp_path / "state.sqlite", history_max_items=3)
    else:
        opened = RedisStateStore(request.getfixturevalue("redis_url"), history_max_items=3)
    yield opened
    await opened.aclose()


def _task(user: str, prompt_id: str, seq: int) -> Task:
    return Task(id=f"id-{user}-{prompt_id}-{seq}", user=user, prompt_id=prompt_id, number=seq, seq=seq,
                prompt={"1": {"class_type": "X", "inputs": {}}}, extra_data={"client_id": "c"},
                outputs_to_execute=["1"])


async def test_tasks_move_pending_running_done_once(store: Any) -> None:
    assert await store.next_seq() < await store.next_seq()
    first, second = _task("alice", "p1", 2), _task("alice", "p2", 1)
    assert await store.add(first) and await store.add(second)
    assert not await store.add(_task("alice", "p1", 3))  # still queued under that id
    assert await store.add(_task("bob", "p1", 4))  # another user's namespace
    assert [t.prompt_id for t in await store.user_tasks("alice", PENDING)] == ["p2", "p1"]
    assert [t.user for t in await store.pending()] == ["alice", "alice", "bob"]
    claimed = await store.claim(first.id, "http://i1")
    assert claimed is not None and claimed.state == RUNNING and claimed.attempts == 1
    assert await store.claim(first.id, "http://i2") is None  # one claim only
    assert [t.id for t in await store.running()] == [first.id]
    requeued = await store.requeue(first.id, "instance lost")
    assert requeued is not None and requeued.notes == ["instance lost"] and requeued.instance is None
    assert (await store.claim(first.id, "http://i2")).attempts == 2
    done = await store.finish(first.id, {"outputs": {"1": {}}, "status": {"status_str": "success"}})
    assert done is not None and done.state == DONE
    assert await store.finish(first.id, {}) is None
    assert (await store.get("alice", "p1")).history["outputs"] == {"1": {}}
    assert (await store.get_by_id(first.id)).state == DONE
    # A finished id may be used again: the new task replaces the old history entry.
    assert await store.add(_task("alice", "p1", 9))
    assert [t.prompt_id for t in await store.user_tasks("alice", DONE)] == []


async def test_a_withdrawal_is_asked_of_a_task_queued_ahead_only_and_ends_when_it_starts_or_goes_back(
        store: Any) -> None:
    ahead, running = _task("alice", "p1", 1), _task("alice", "p2", 2)
    assert await store.add(ahead) and await store.add(running)
    assert await store.request_withdraw(ahead.id) is None  # waiting in the store's queue: a plain delete
    await store.claim(ahead.id, "http://i1", ahead=True)
    await store.claim(running.id, "http://i2")
    assert await store.request_withdraw(running.id) is None  # started: a delete leaves it alone
    asked = await store.request_withdraw(ahead.id)
    assert asked is not None and asked.withdraw_requested and asked.queued_ahead
    assert (await store.get_by_id(ahead.id)).withdraw_requested
    started = await store.mark_started(ahead.id)  # it got away: it runs as any running task
    assert started is not None and not started.withdraw_requested
    assert await store.request_withdraw(ahead.id) is None
    again = _task("alice", "p3", 3)
    assert await store.add(again)
    await store.claim(again.id, "http://i1", ahead=True)
    await store.request_withdraw(again.id)
    assert not (await store.requeue(again.id, "handed back")).withdraw_requested  # a plain delete takes it now


async def test_deletes_touch_only_the_named_users_tasks(store: Any) -> None:
    for index, user in enumerate(("alice", "alice", "bob")):
        await store.add(_task(user, f"p{index}", index))
    assert await store.delete("alice", ["p2"], PENDING) == []  # bob's id
    assert await store.delete("alice", ["p0"], PENDING) == ["p0"]
    assert await store.delete("alice", None, PENDING) == ["p1"]
    assert [t.prompt_id for t in await store.pending()] == ["p2"]


async def test_history_is_bounded_per_user(store: Any) -> None:
    for index in range(5):
        task = _task("alice", f"p{index}", index)
        await store.add(task)
        await store.claim(task.id, "http://i")
        await store.finish(task.id, {"outputs": {}})
        await asyncio.sleep(0.002)
    assert [t.prompt_id for t in await store.user_tasks("alice", DONE)] == ["p2", "p3", "p4"]


async def test_instance_urls_are_kept(store: Any) -> None:
    await store.add_instance_url("http://b")
    await store.add_instance_url("http://a")
    await store.add_instance_url("http://a")
    assert await store.instance_urls() == ["http://a", "http://b"]


async def test_instance_urls_can_be_forgotten_and_usage_is_kept_once(store: Any) -> None:
    from cluster_proxy.store import Usage

    await store.add_instance_url("http://a:1")
    await store.add_instance_url("http://b:2")
    await store.remove_instance_url("http://a:1")
    assert await store.instance_urls() == ["http://b:2"]
    first, second = Usage("t1", "alice", 1000, 250, "success"), Usage("t2", "bob", 5000, 10, "error")
    for usage in (first, second, first):  # a repeated record counts once
        await store.record_usage(usage)
    assert await store.usage(0, 10_000) == [first, second]
    assert await store.usage(1001, 5000) == []
    assert await store.usage(1000, 5001) == [first, second]


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_a_proxy_restart_loses_nothing(start_cluster, aiohttp_server, request, backend: str) -> None:
    from cluster_proxy.app import create_cluster_app
    from cluster_proxy.settings import ClusterSettings
    from support.cluster import INSTANCE_TOKEN

    redis_url = request.getfixturevalue("redis_url") if backend == "redis" else None
    cluster: Cluster = await start_cluster(instances=1, redis_url=redis_url)
    http = cluster.http("alice")
    ids = []
    for index in range(3):
        response = await http.post("/prompt", json={"prompt": graph("r", color=index, seconds=0.6)})
        ids.append((await response.json())["prompt_id"])
    await until(lambda: any(run.last_node for run in cluster.core.runs.values()))
    await cluster.server.close()  # the proxy goes away mid-task
    instance_url = str(cluster.instances[0].make_url("")).rstrip("/")
    app = await create_cluster_app(ClusterSettings(
        data_dir=cluster.data_dir, instance_urls=(instance_url,), instance_token=INSTANCE_TOKEN,
        health_interval_s=0.2, instance_lost_s=1.0, redis_url=redis_url))
    server = await aiohttp_server(app)
    cluster.server = server
    http = cluster.http("alice")
    queue = await (await http.get("/queue")).json()
    seen = [item[1] for item in queue["queue_running"] + queue["queue_pending"]]
    assert seen and set(seen) <= set(ids)
    await until(lambda: _history_size(http, 3), timeout_s=30)
    history = await (await http.get("/history")).json()
    assert {h["status"]["status_str"] for h in history.values()} == {"success"}
    # The running one was followed to its end, not run again; the one queued behind it on the instance
    # (--prefetch) was taken back from the instance's queue unstarted and ran once, from the store.
    assert "cluster" not in history[ids[0]]
    notes = [h["cluster"]["notes"] for h in history.values() if "cluster" in h]
    assert notes in ([], [["handed back: the proxy that queued it went away"]]), notes
    assert files_under(cluster.user_dir("alice") / "output") == [
        "r_00001_.png", "r_00002_.png", "r_00003_.png"]


async def _history_size(http: Any, size: int) -> bool:
    return len(await (await http.get("/history")).json()) == size


async def test_instance_leases_and_proxy_liveness(store: Any) -> None:
    assert await store.lease_instance("http://i", "task-1", 5.0)
    assert not await store.lease_instance("http://i", "task-2", 5.0)
    assert await store.renew_instance("http://i", "task-1", 5.0)
    assert not await store.renew_instance("http://i", "task-2", 5.0)
    await store.release_instance("http://i", "task-2")  # not the holder: no effect
    assert not await store.lease_instance("http://i", "task-2", 5.0)
    await store.release_instance("http://i", "task-1")
    assert await store.lease_instance("http://i", "task-2", 0.05)
    await asyncio.sleep(0.1)
    assert await store.lease_instance("http://i", "task-3", 5.0)  # expired
    await store.heartbeat("proxy-a", 5.0)
    await store.heartbeat("proxy-b", 0.05)
    await asyncio.sleep(0.1)
    assert await store.alive_proxies() == {"proxy-a"}
    task = _task("alice", "p1", 1)
    await store.add(task)
    await store.claim(task.id, "http://i", "proxy-b")
    assert await store.adopt(task.id, "proxy-x", "proxy-a") is None  # not its proxy any more
    adopted = await store.adopt(task.id, "proxy-b", "proxy-a")
    assert adopted is not None and adopted.proxy == "proxy-a"
    assert await store.adopt(task.id, "proxy-b", "proxy-c") is None  # one taker only


async def test_a_dead_redis_is_a_state_unavailable_error_of_the_tree() -> None:
    """Redis' own exceptions stop at the store: callers see ``StateUnavailable`` (a ComfyServeError)."""
    from redis.exceptions import RedisError

    from cluster_proxy.accounts_store import RedisBackend
    from cluster_proxy.store import StateUnavailable
    from standard.errors import ComfyServeError
    from standard.ports import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    for store, call in ((RedisStateStore(url), "pending"), (RedisBackend(url), "all")):
        try:
            with pytest.raises(StateUnavailable) as caught:
                await getattr(store, call)()
        finally:
            await store.aclose()
        assert isinstance(caught.value, ComfyServeError)
        assert isinstance(caught.value.__cause__, (RedisError, OSError))
