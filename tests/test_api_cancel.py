"""``POST /api_task/cancel``: a queued task is removed, a running one interrupted; one ``cancelled`` result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from support.api import TOKEN, ApiFactory, no_more, read_results, results_final
from support.server import halfway_graph, install_gate_plugin, tiny_graph
from support.wait import until


async def cancel(live, path: str = "/api_task/cancel", **query: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=live.url, trust_env=False) as http:
        return await http.post(path, params=query, headers={"Authorization": TOKEN})


async def status(live, task_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=live.url, trust_env=False) as http:
        resp = await http.get("/api_task", params={"task_id": task_id}, headers={"Authorization": TOKEN})
    return resp.json() if resp.status_code == 200 else {"status_code": resp.status_code}


def is_cancelled(frame) -> bool:
    [event] = json.loads(frame.data)
    return (frame.tags["status"] == "error" and event["type"] == "execution_error"
            and event["data"]["exception_type"] == "cancelled")


async def test_a_queued_task_is_removed_and_gets_a_cancelled_result(api: ApiFactory) -> None:
    live = await api()
    await live.submit(tiny_graph(), task_id="a", user="u1")
    await live.submit(tiny_graph(), task_id="b")
    resp = await cancel(live, task_id="a")
    assert resp.status_code == 200, resp.text
    assert resp.json()["state"] == "cancelled" and resp.json()["cancel_requested"] is True
    again = await cancel(live, task_id="a")  # idempotent
    assert again.status_code == 200 and again.json()["state"] == "cancelled"
    assert again.json()["cancel_requested"] is False
    assert (await status(live, "a"))["state"] == "cancelled"
    queued = await status(live, "b")
    assert (queued["state"], queued["position"]) == ("queued", 0)
    async with live.input() as queue:
        assert (await queue.attributes())["stream.length"] == "1"
    async with live.sink() as sink:
        [frame] = await read_results(sink, 1)
        assert await no_more(sink) == []
    assert is_cancelled(frame) and frame.tags["task_id"] == "a" and frame.tags["user"] == "u1"


async def test_bad_cancels_are_4xx_and_change_nothing(api: ApiFactory) -> None:
    live = await api()
    await live.submit(tiny_graph(), task_id="mine")
    assert (await cancel(live, task_id="nope")).status_code == 404
    assert (await cancel(live, requestId="nope")).status_code == 404
    assert (await cancel(live)).status_code == 400
    # Task ids are per service: the same id under another service's path is not this one.
    other = await cancel(live, "/api/predict/other/api_task/cancel", task_id="mine")
    assert other.status_code == 404 and "per service" in other.json()["error"]["message"]
    async with httpx.AsyncClient(base_url=live.url, trust_env=False) as http:
        assert (await http.post("/api_task/cancel", params={"task_id": "mine"})).status_code == 401
    assert (await status(live, "mine"))["state"] == "queued"
    ours = await cancel(live, "/api/predict/svc/api_task/cancel", task_id="mine")
    assert ours.status_code == 200 and ours.json()["state"] == "cancelled"


async def test_a_running_task_is_interrupted_on_its_instance_and_reported_once(api: ApiFactory, instance_url: Any,
                                                                                data_dir: Path) -> None:
    install_gate_plugin(data_dir)
    live = await api(instance_urls=(await instance_url(),))
    await live.submit(halfway_graph("never", "stuck"), task_id="stuck")

    async def running() -> bool:
        return (await status(live, "stuck")).get("node") == "3"

    await until(running, what="the task running its slow node")
    resp = await cancel(live, task_id="stuck")
    assert resp.status_code == 200 and resp.json()["cancel_requested"] is True
    async with live.sink() as sink:
        [frame] = await read_results(sink, 1)
        assert is_cancelled(frame) and frame.tags["task_id"] == "stuck"
        # The instance is free again: the next task runs.
        await live.submit(tiny_graph("next"), task_id="next")
        [after] = await read_results(sink, 1)
        assert after.tags["task_id"] == "next" and after.tags["status"] == "success"
        await results_final(live.endpoint, 2)
