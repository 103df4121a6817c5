"""Exactly once under chaos, split deployment (queue service, front and workers as separate processes).

A Redis stall longer than the queue's call timeout, and a worker killed between its result's put and its
input's commit: 0 tasks lost, 0 duplicate results, 0 re-runs of a task whose result was put.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from queue_service.client import QueueClient
from queue_service.server import STORE_KEY
from queue_service.store import QueueStore, StoreUnavailable
from standard.ports import free_port
from support.api import SERVICE, TOKEN, Procs, submit, wait_running
from support.processes import RedisServer, wait_for_port
from support.queue import LiveQueue
from support.server import gated_graph, install_gate_plugin, open_gate, tiny_graph
from support.wait import until

SINK = f"{SERVICE}/sink"
REQUEST_ID = "X-Eas-Queueservice-Request-Id"


class CommitGate:
    """Holds the first commit of ``queue`` inside the queue service, then fails it.

    The worker commits its input only after its result's put has been answered, so a commit held here
    is the deterministic point "result on the sink, input not committed" at which the test kills it.
    """

    def __init__(self, store: QueueStore, queue: str) -> None:
        self.reached = asyncio.Event()
        self._release = asyncio.Event()
        self._store = store
        self._remove = store.remove

        async def remove(name: str, indexes: list[int]) -> int:
            if name == queue and not self.reached.is_set():
                self.reached.set()
                await self._release.wait()
                raise StoreUnavailable("test: this commit never reached the store")
            return await self._remove(name, indexes)

        store.remove = remove  # type: ignore[method-assign]

    def drop(self) -> None:
        """Answer the held commit with a 503 (its worker is dead) and let later commits through."""
        self._store.remove = self._remove  # type: ignore[method-assign]
        self._release.set()


async def length(queue: QueueClient) -> int:
    return int((await queue.attributes())["stream.length"])


async def runs(instance_url: str) -> int:
    """Prompts the instance has run (its history; a graph run again may save nothing new: cached nodes)."""
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.get(f"{instance_url}/history", headers={"Authorization": TOKEN})
    return len(response.json())


@pytest.mark.parametrize("client_committed", [True, False], ids=["result-committed", "result-on-sink"])
async def test_a_worker_killed_between_its_result_put_and_its_commit_is_not_run_again(
        make_live_queue: Callable[..., Awaitable[LiveQueue]], instance_url: Any, procs: Procs,
        client_committed: bool) -> None:
    try:
        await _kill_after_put(make_live_queue, instance_url, procs, client_committed)
    finally:  # the queue service runs in this loop: stop the workers without blocking it
        await asyncio.to_thread(procs.kill_all)


async def _kill_after_put(make_live_queue: Callable[..., Awaitable[LiveQueue]], instance_url: Any, procs: Procs,
                          client_committed: bool) -> None:
    live = await make_live_queue(token=TOKEN)
    gate = CommitGate(live.app[STORE_KEY], SERVICE)
    url, queue_url = await instance_url(), f"http://{live.endpoint}"
    inputs, sink = live.client(SERVICE, token=TOKEN), live.client(SINK, token=TOKEN)
    _, request_id = await inputs.put(json.dumps(tiny_graph("once")), {"task_id": "once"})

    first = procs.worker("worker1", queue_url, url, "--worker-id", "w1")
    await asyncio.wait_for(gate.reached.wait(), 60)  # the result is on the sink, the commit is held
    first.send_signal(signal.SIGKILL)
    await asyncio.to_thread(first.wait, 10)
    gate.drop()
    [result] = await sink.get(0, 10)
    assert result.tags["requestId"] == request_id and result.tags["status"] == "success"
    if client_committed:  # the client took the result before the input came back
        await sink.commit(result.index)

    procs.worker("worker2", queue_url, url, "--worker-id", "w1")  # the same worker, restarted
    await until(lambda: _empty(inputs), timeout_s=60, what="the redelivered input committed")

    assert "was already reported; committing it" in procs.log("worker2")
    assert await runs(url) == 1  # not run again after the redelivery
    left = await sink.get(0, 10)
    assert [frame.index for frame in left] == ([] if client_committed else [result.index])
    assert (await sink.attributes())["stream.lastEntry"] == "1"  # no second result was ever put


async def _empty(queue: QueueClient) -> bool:
    return await length(queue) == 0


async def api_prompt(front_url: str, task_id: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async with httpx.AsyncClient(base_url=front_url, trust_env=False, timeout=30) as http:
        return await http.post("/api_prompt", params={"task_id": task_id}, json=tiny_graph(task_id),
                               headers={"Authorization": TOKEN, **(headers or {})})


async def until_accepted(front_url: str, task_id: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """The client's retry after a 503, as ``Retry-After`` tells it (the store may still be finding its feet)."""
    async with asyncio.timeout(30):
        while (response := await api_prompt(front_url, task_id, headers)).status_code == 503:
            await asyncio.sleep(0.1)
    assert response.status_code == 200, response.text
    return response


async def test_a_redis_stall_longer_than_the_call_timeout_loses_and_duplicates_nothing(
        procs: Procs, tmp_path: Path, instance_url: Any, data_dir: Path) -> None:
    redis = RedisServer(tmp_path / "redis")  # this test's own: it is stopped (SIGSTOP) mid-run
    await asyncio.to_thread(redis.start)
    assert redis.proc is not None
    try:
        install_gate_plugin(data_dir)
        url = await instance_url()
        queue_port, front_port = free_port(), free_port()
        queue_url, front_url = f"http://127.0.0.1:{queue_port}", f"http://127.0.0.1:{front_port}"
        queue = procs.start("queue", "queue", "--redis-url", redis.url, "--port", str(queue_port), "--token", TOKEN,
                            "--redis-call-timeout", "0.5")
        front = procs.start("front", "api", "--queue-url", queue_url, "--port", str(front_port), "--token", TOKEN,
                            "--service", SERVICE, "--dedupe-task-id")
        await asyncio.to_thread(wait_for_port, queue_port, 30, queue)
        await asyncio.to_thread(wait_for_port, front_port, 30, front)
        procs.worker("worker", queue_url, url)
        await submit(front_url, gated_graph("stall", "stalled"), "stalled")
        await wait_running(url, timeout_s=30)

        redis.proc.send_signal(signal.SIGSTOP)
        try:
            open_gate(data_dir, "stall")  # the run ends; its result's put meets the stalled Redis
            await until(lambda: "sink put failed" in procs.log("worker"), what="the result's put answered 503")
            keyed = await api_prompt(front_url, "keyed", {"Idempotency-Key": "keyed-1"})
            by_task_id = await api_prompt(front_url, "by-task-id")  # --dedupe-task-id: the task_id is the key
            for refused in (keyed, by_task_id):
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["type"] == "queue_unavailable"
        finally:
            redis.proc.send_signal(signal.SIGCONT)
        keyed = await until_accepted(front_url, "keyed", {"Idempotency-Key": "keyed-1"})
        by_task_id = await until_accepted(front_url, "by-task-id")

        async with QueueClient(queue_url, SERVICE, token=TOKEN) as inputs, \
                QueueClient(queue_url, SINK, token=TOKEN) as sink:
            await until(lambda: _empty(inputs), timeout_s=60, what="every task reported and committed")
            assert (await inputs.attributes())["stream.lastEntry"] == "3"  # the retries queued nothing
            results = {frame.tags["task_id"]: frame for frame in await sink.get(0, 10)}
            assert sorted(results) == ["by-task-id", "keyed", "stalled"], procs.log("worker")
            assert (await sink.attributes())["stream.lastEntry"] == "3"  # one result per task, never two
        assert results["keyed"].tags["requestId"] == keyed.headers[REQUEST_ID]
        assert results["by-task-id"].tags["requestId"] == by_task_id.headers[REQUEST_ID]
        assert all(frame.tags["status"] == "success" for frame in results.values())
        assert await runs(url) == 3  # each task ran once
    finally:
        if redis.proc.poll() is None:
            redis.proc.send_signal(signal.SIGCONT)
        await asyncio.to_thread(redis.stop)
