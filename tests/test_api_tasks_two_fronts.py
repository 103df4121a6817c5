"""Status, cancel and events of tasks across two ``comfyserve api`` fronts on one Redis, as deployed.

Real processes: two instances, front A running their workers, front B with none; clients talk to
B (and A), and the official eas-prediction SDK reads the sink: one result per task, as before.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from standard.datadir import init_data_dir
from standard.ports import free_port
from support.api import SERVICE, TOKEN, Procs, requires_sdk, run_sdk, submit
from support.processes import wait_for_port
from support.server import open_gate, tiny_graph
from support.wait import until

# Reports progress 1/2, then holds its prompt until input/<gate> exists, checking for an interrupt.
HOLD_PLUGIN = '''
import os
import time

import comfy.model_management
import comfy.utils
import folder_paths


class TestHold:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "gate": ("STRING", {"default": "gate"})}}
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "testing"
    def run(self, image, gate):
        comfy.utils.ProgressBar(2).update_absolute(1, 2)
        path = os.path.join(folder_paths.get_input_directory(), gate)
        deadline = time.monotonic() + 60
        while not os.path.exists(path) and time.monotonic() < deadline:
            comfy.model_management.throw_exception_if_processing_interrupted()
            time.sleep(0.005)
        return (image,)

NODE_CLASS_MAPPINGS = {"TestHold": TestHold}
'''


def hold_graph(gate: str, prefix: str) -> dict[str, Any]:
    graph = tiny_graph(prefix)
    graph["3"] = {"class_type": "TestHold", "inputs": {"image": ["1", 0], "gate": gate}}
    graph["2"]["inputs"]["images"] = ["3", 0]
    return graph


async def status(base: str, task_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base, trust_env=False) as http:
        resp = await http.get("/api_task", params={"task_id": task_id}, headers={"Authorization": TOKEN})
    assert resp.status_code == 200, resp.text
    return resp.json()


async def cancel(base: str, task_id: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base, trust_env=False) as http:
        return await http.post("/api_task/cancel", params={"task_id": task_id}, headers={"Authorization": TOKEN})


async def sse(base: str, task_id: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=60.0) as http:
        async with http.stream("GET", "/api_events", params={"task_id": task_id},
                               headers={"Authorization": TOKEN}) as resp:
            assert resp.status_code == 200
            kind = ""
            async for line in resp.aiter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    yield kind, json.loads(line[6:])


@requires_sdk
async def test_a_task_run_behind_one_front_is_followed_and_cancelled_from_another(procs: Procs, tmp_path: Path,
                                                                                  redis_url: str) -> None:
    data_dir = tmp_path / "data"
    init_data_dir(data_dir)
    (data_dir / "custom_nodes" / "test_hold.py").write_text(HOLD_PLUGIN)
    (one, url_one), (two, url_two) = procs.instances(2, data_dir)
    port_a, port_b = free_port(), free_port()
    common = ("--token", TOKEN, "--service", SERVICE, "--redis-url", redis_url, "--pending-timeout", "2",
              "--data-dir", str(data_dir))
    front_a = procs.start("front-a", "api", "--port", str(port_a), "--instance-url", url_one, "--instance-url",
                          url_two, *common)
    front_b = procs.start("front-b", "api", "--port", str(port_b), "--instances", "0", *common)
    wait_for_port(port_a, timeout_s=30, proc=front_a)
    wait_for_port(port_b, timeout_s=30, proc=front_b)
    a, b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"

    # Both instances get a held task, put through B; a third waits in the queue.
    await submit(b, hold_graph("never", "stuck"), "stuck")
    await submit(b, hold_graph("gate-other", "other"), "other")

    async def both_running() -> bool:
        views = [await status(b, t) for t in ("stuck", "other")]
        return all(v["state"] == "running" and v.get("progress") == {"value": 1, "max": 2} for v in views)

    await until(both_running, timeout_s=60, what="both tasks running on front A's workers, seen from B")
    stuck = await status(b, "stuck")
    assert stuck["node"] == "3" and stuck["instance"] in (url_one, url_two) and stuck["worker"]
    await submit(b, tiny_graph("waiting"), "waiting")
    waiting = await status(a, "waiting")  # next in line, or held ahead by a worker (--prefetch): queued either way
    assert (waiting["state"], waiting.get("position")) == ("queued", 0), waiting

    # A stream on B follows the running task; a cancel on A of the queued one, on B of the running one.
    events = sse(b, "stuck")
    first = await anext(events)
    assert first[0] == "status" and first[1]["state"] == "running"
    resp = await cancel(a, "waiting")
    assert resp.status_code == 200 and resp.json()["cancel_requested"] is True, resp.text

    async def waiting_cancelled() -> bool:  # queued ahead: its worker takes it off the instance's queue
        return (await status(a, "waiting"))["state"] == "cancelled"

    await until(waiting_cancelled, what="the queued task cancelled")
    resp = await cancel(b, "stuck")
    assert resp.status_code == 200, resp.text
    seen = []
    async with asyncio.timeout(30):
        async for kind, data in events:
            seen.append((kind, data))
    assert seen[-1][0] == "result" and seen[-1][1]["state"] == "cancelled"
    assert "execution_interrupted" in [kind for kind, _ in seen]
    # Only that prompt was interrupted: the other task, on the other instance, finishes normally.
    open_gate(data_dir, "gate-other")

    async def other_done() -> bool:
        return (await status(a, "other"))["state"] == "succeeded"

    await until(other_done, timeout_s=30, what="the other task to succeed")
    for base in (a, b):  # idempotent, from either front
        again = await cancel(base, "stuck")
        assert again.status_code == 200 and again.json()["state"] == "cancelled"
    assert (await status(a, "stuck"))["state"] == (await status(b, "stuck"))["state"] == "cancelled"

    # The documented platform read, unchanged: one sink item per task, with its task_id tag.
    out = await run_sdk(f"127.0.0.1:{port_b}", {"count": 3})
    by_task = {r["tags"]["task_id"]: r for r in out["results"]}
    assert sorted(by_task) == ["other", "stuck", "waiting"], procs.log("front-a")
    assert by_task["other"]["tags"]["status"] == "success"
    assert by_task["other"]["data"][-1]["2"]["images"][0]["filename"].startswith("other_")
    for task in ("stuck", "waiting"):
        [event] = by_task[task]["data"]
        assert event["data"]["exception_type"] == "cancelled"
    assert out["attrs"]["stream.length"] == "0"
    for proc in (one, two):
        assert proc.poll() is None
