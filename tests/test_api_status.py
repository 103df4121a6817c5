"""``GET /api_task``: queued (position), running (worker, node, progress), succeeded/failed with the result, 404."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from support.api import TOKEN, ApiFactory, read_results
from support.processes import redis_command_calls
from support.server import halfway_graph, install_gate_plugin, open_gate, tiny_graph
from support.wait import until


async def task(live, **query: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=live.url, trust_env=False) as http:
        return await http.get("/api_task", params=query, headers={"Authorization": TOKEN})


async def state(live, task_id: str) -> dict[str, Any]:
    resp = await task(live, task_id=task_id)
    assert resp.status_code == 200, resp.text
    return resp.json()


async def test_queued_tasks_answer_their_position_by_task_id_or_request_id(api: ApiFactory) -> None:
    live = await api()
    request_ids = []
    for name in ("a", "b", "c"):
        resp = await live.submit(tiny_graph(), task_id=name)
        request_ids.append(resp.headers["X-Eas-Queueservice-Request-Id"])
    assert await state(live, "c") == {"request_id": request_ids[2], "task_id": "c", "state": "queued", "position": 2}
    assert (await state(live, "a"))["position"] == 0
    by_request = await task(live, requestId=request_ids[1])
    assert by_request.json() == {"request_id": request_ids[1], "task_id": "b", "state": "queued", "position": 1}
    # A task_id used again names the newest task with it.
    again = await live.submit(tiny_graph(), task_id="a")
    assert (await state(live, "a"))["request_id"] == again.headers["X-Eas-Queueservice-Request-Id"]
    assert (await state(live, "a"))["position"] == 3
    assert (await task(live, task_id="nope")).status_code == 404
    assert (await task(live, requestId="nope")).status_code == 404
    assert (await task(live)).status_code == 400
    async with httpx.AsyncClient(base_url=live.url, trust_env=False) as http:
        assert (await http.get("/api_task", params={"task_id": "a"})).status_code == 401


async def test_failed_task_answers_failed_with_its_error_until_the_result_is_taken(api: ApiFactory,
                                                                                   instance_url: Any) -> None:
    live = await api(instance_urls=(await instance_url(),))
    graph = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
    assert (await live.submit(graph, task_id="bad")).status_code == 200

    async def failed() -> bool:
        return (await task(live, task_id="bad")).json().get("state") == "failed"

    await until(failed, what="the task failed")
    answer = await state(live, "bad")
    assert answer["tags"]["status"] == "error" and answer["result"][0]["type"] == "execution_error"
    async with live.sink() as sink:
        await read_results(sink, 1)
    assert (await task(live, task_id="bad")).status_code == 404


async def test_two_fronts_on_one_redis_answer_alike(api: ApiFactory, instance_url: Any, data_dir: Path,
                                                    redis_url: str) -> None:
    install_gate_plugin(data_dir)
    working = await api(redis_url=redis_url, instance_urls=(await instance_url(),))
    other = await api(redis_url=redis_url)
    assert (await other.submit(halfway_graph("g1", "first"), task_id="first")).status_code == 200
    assert (await other.submit(tiny_graph("second"), task_id="second")).status_code == 200

    async def halfway() -> bool:
        answer = (await task(working, task_id="first")).json()
        return answer.get("progress") == {"value": 1, "max": 4}

    await until(halfway, what="the running task's progress")
    for front in (working, other):
        running = await state(front, "first")
        assert running["state"] == "running" and running["node"] == "3"
        assert running["instance"] == working.settings.instance_urls[0] and running["worker"].startswith("worker-")
        queued = await state(front, "second")
        assert (queued["state"], queued["position"]) == ("queued", 0)
    open_gate(data_dir, "g1")

    async def both_done() -> bool:
        return all([(await task(front, task_id=name)).json().get("state") == "succeeded"
                    for front in (working, other) for name in ("first", "second")])

    await until(both_done, what="both tasks succeeded")
    done = await state(other, "first")
    assert done["result"][-1]["2"]["images"][0]["filename"].startswith("first_")
    assert "node" not in done and "progress" not in done
    async with other.sink() as sink:
        await read_results(sink, 2)
    for front in (working, other):
        assert (await task(front, task_id="first")).status_code == 404


async def test_status_is_one_store_round_trip_on_redis(api: ApiFactory, redis_url: str) -> None:
    """/api_task p99 goal (< 5 ms with 10k tasks queued): each answer, by task_id or requestId, is one command
    (one script) on Redis, not an index lookup, an input lookup, a position and a sink lookup in turn."""
    live = await api(redis_url=redis_url)
    request_ids = [(await live.submit(tiny_graph(), task_id=name)).headers["X-Eas-Queueservice-Request-Id"]
                   for name in ("a", "b")]
    calls = 30
    before = redis_command_calls(redis_url)
    for _ in range(calls // 2):
        assert (await state(live, "b"))["position"] == 1
        assert (await task(live, requestId=request_ids[0])).json()["position"] == 0
    after = redis_command_calls(redis_url)

    def delta(name: str) -> int:
        return after.get(f"cmdstat_{name}", 0) - before.get(f"cmdstat_{name}", 0)

    # One script per answer; no item reads (HMGET) beside it. Slack: the submissions' background index tidying.
    assert delta("evalsha") <= calls + 2
    assert delta("hmget") <= 2


async def test_tasks_queued_by_a_stateless_front_are_found_by_task_id(api: ApiFactory) -> None:
    queue_side = await api()
    front = await api(queue_url=queue_side.url, sqlite_path=None)
    resp = await front.submit(tiny_graph(), task_id="via-front")
    assert resp.status_code == 200, resp.text
    answer = await state(queue_side, "via-front")
    assert answer["state"] == "queued" and answer["request_id"] == resp.headers["X-Eas-Queueservice-Request-Id"]
    assert (await task(front, task_id="via-front")).status_code == 501  # the stateless front has no store
