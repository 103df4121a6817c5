"""Cluster edition: an instance whose running task reported its last sampler step is about to be free.

Model affinity may leave a busy instance's slot empty (its models are still wanted, the waiting task would
load others): the next task then went out only once the running one had ended, a round trip through the proxy
while the GPU sat idle. The last step (a ComfyUI ``progress`` event of the running prompt with value == max)
makes the slot fillable as if the instance were free; so does value == max - 1 (steps are reported as they
end, so that is when the last step begins). Gated tasks (``support.server``: ``TestGate`` holds its
prompt until the test opens its gate; with ``steps=1`` it first reports progress 1/1, a last step) make each
moment visible without sleeping. A task's models are the model-file names among its inputs: here the
SaveImage prefix, and the gate's name where it ends in ``.safetensors``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import ClientWebSocketResponse

from standard.client import InstanceClient
from support.cluster import INSTANCE_TOKEN, Cluster
from support.server import events_until, gate_inputs, install_gate_plugin, open_gate, runs_of
from support.wait import until

X = "x.safetensors"


def _graph(*gates: tuple[str, int]) -> dict[str, Any]:
    """EmptyImage -> one TestGate per (gate, steps) in a row -> SaveImage (prefix ``X``, a model name)."""
    graph: dict[str, Any] = {"1": {"class_type": "EmptyImage",
                                   "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}}
    previous = "1"
    for number, (gate, steps) in enumerate(gates, start=2):
        graph[str(number)] = {"class_type": "TestGate",
                              "inputs": gate_inputs(gate, [previous, 0], steps=steps, count_runs=True, timeout_s=60)}
        previous = str(number)
    graph["9"] = {"class_type": "SaveImage", "inputs": {"images": [previous, 0], "filename_prefix": X}}
    return graph


def _holding_then_last_step(name: str, steps: int = 1) -> dict[str, Any]:
    """Held at ``<name>-hold``; once that opens, reports step 1 of ``steps`` (1: its last step) and is held
    again at ``<name>-end``."""
    return _graph((f"{name}-hold", 0), (f"{name}-end", steps))


async def _alice_on_one_instance(start_cluster: Any, data_dir: Path, **options: Any) -> tuple[Cluster, Any, Any]:
    """A one-instance cluster with the gate plugin, alice's session and her page's event socket."""
    install_gate_plugin(data_dir)
    cluster: Cluster = await start_cluster(instances=1, **options)
    http = cluster.http("alice")
    return cluster, http, await http.ws_connect("/ws?clientId=tab")


async def _submit(http: Any, graph: dict[str, Any]) -> str:
    response = await http.post("/prompt", json={"prompt": graph, "client_id": "tab"})
    assert response.status == 200, await response.text()
    return (await response.json())["prompt_id"]


async def _nothing_more_goes_out(cluster: Cluster, prompt_id: str) -> None:
    """The scheduler, asked now, hands out nothing: the task still waits in the proxy."""
    assert await cluster.core.scheduler.dispatch() == 0
    assert cluster.run_of(prompt_id) is None
    task = await cluster.core.store.get("alice", prompt_id)
    assert task is not None and task.state == "pending"


async def _last_step_seen(ws: ClientWebSocketResponse, prompt_id: str) -> None:
    """The user got the task's last-step progress: the proxy has handled it (it relays after acting on it)."""
    await _progress_seen(ws, prompt_id)


async def _progress_seen(ws: ClientWebSocketResponse, prompt_id: str) -> None:
    """The user got the task's step-1 progress: the proxy has handled it (it relays after acting on it)."""
    await events_until(ws, lambda e: e["type"] == "progress" and e["data"].get("prompt_id") == prompt_id
                       and e["data"]["value"] == 1)


async def _all_succeed(http: Any, prompt_ids: list[str]) -> None:
    async def done() -> bool:
        return set(prompt_ids) <= set(await (await http.get("/history")).json())

    await until(done, timeout_s=30)
    history = await (await http.get("/history")).json()
    assert {history[p]["status"]["status_str"] for p in prompt_ids} == {"success"}


async def test_the_next_task_is_queued_ahead_once_the_running_one_reports_its_last_step(
        start_cluster, data_dir: Path) -> None:
    cluster, http, ws = await _alice_on_one_instance(start_cluster, data_dir)
    first = await _submit(http, _holding_then_last_step("a"))
    # Needs X (the instance holds it: still wanted) and a model no instance holds: not queued ahead for now.
    second = await _submit(http, _graph(("b.safetensors", 0)))
    await until(lambda: runs_of(data_dir, "a-hold") == 1)
    await _nothing_more_goes_out(cluster, second)
    open_gate(data_dir, "a-hold")  # the first task reports its last step, and is held again
    await _last_step_seen(ws, first)
    await until(lambda: cluster.waiting_on_instance(second))
    assert runs_of(data_dir, "a-end") == 1 and first not in await (await http.get("/history")).json()
    open_gate(data_dir, "a-end")
    open_gate(data_dir, "b.safetensors")
    await _all_succeed(http, [first, second])
    assert runs_of(data_dir, "b.safetensors") == 1
    await ws.close()


async def test_the_step_before_the_last_counts_and_an_earlier_one_does_not(start_cluster, data_dir: Path) -> None:
    """Progress 1 of 2 (the last step has begun) fills the slot; progress 1 of 3 does not."""
    cluster, http, ws = await _alice_on_one_instance(start_cluster, data_dir)
    first = await _submit(http, _holding_then_last_step("a", steps=3))
    second = await _submit(http, _graph(("b.safetensors", 0)))
    open_gate(data_dir, "a-hold")
    await _progress_seen(ws, first)
    await _nothing_more_goes_out(cluster, second)
    open_gate(data_dir, "a-end")
    open_gate(data_dir, "b.safetensors")
    await _all_succeed(http, [first, second])
    third = await _submit(http, _holding_then_last_step("c", steps=2))
    fourth = await _submit(http, _graph(("d.safetensors", 0)))
    open_gate(data_dir, "c-hold")
    await _progress_seen(ws, third)
    await until(lambda: cluster.waiting_on_instance(fourth))
    open_gate(data_dir, "c-end")
    open_gate(data_dir, "d.safetensors")
    await _all_succeed(http, [third, fourth])
    await ws.close()


async def test_with_prefetch_0_the_last_step_queues_nothing_ahead(start_cluster, data_dir: Path) -> None:
    cluster, http, ws = await _alice_on_one_instance(start_cluster, data_dir, prefetch=0)
    first = await _submit(http, _holding_then_last_step("a"))
    second = await _submit(http, _graph(("b.safetensors", 0)))
    open_gate(data_dir, "a-hold")
    await _last_step_seen(ws, first)
    await _nothing_more_goes_out(cluster, second)
    open_gate(data_dir, "a-end")
    open_gate(data_dir, "b.safetensors")
    await _all_succeed(http, [first, second])
    await ws.close()


async def test_the_last_step_of_the_task_before_does_not_count_for_the_one_running_now(
        start_cluster, data_dir: Path) -> None:
    cluster, http, ws = await _alice_on_one_instance(start_cluster, data_dir)
    first = await _submit(http, _holding_then_last_step("a"))
    second = await _submit(http, _graph(("b.safetensors", 0)))  # reports no step
    third = await _submit(http, _graph(("b.safetensors", 0), ("c.safetensors", 0)))
    open_gate(data_dir, "a-hold")
    await _last_step_seen(ws, first)
    await until(lambda: cluster.waiting_on_instance(second))
    open_gate(data_dir, "a-end")  # the second runs now; the first's last step says nothing about it
    await until(lambda: runs_of(data_dir, "b.safetensors") == 1)
    await _nothing_more_goes_out(cluster, third)
    open_gate(data_dir, "b.safetensors")
    open_gate(data_dir, "c.safetensors")
    await _all_succeed(http, [first, second, third])
    await ws.close()


async def test_another_clients_prompt_reporting_its_last_step_on_the_instance_does_not_count(
        start_cluster, data_dir: Path) -> None:
    cluster, http, ws = await _alice_on_one_instance(start_cluster, data_dir)
    (url,) = cluster.pool.instances
    async with InstanceClient(url, INSTANCE_TOKEN) as direct:
        # Someone else's prompt on the instance, without a client id: its events reach every socket there,
        # the proxy's too. Ours wait behind it in the instance's queue.
        other = await direct.submit(_holding_then_last_step("p"))
        await until(lambda: runs_of(data_dir, "p-hold") == 1)
        first = await _submit(http, _graph(("a", 0)))
        await until(lambda: cluster.run_of(first) is not None)
        second = await _submit(http, _graph(("b.safetensors", 0)))
        open_gate(data_dir, "p-hold")  # the other prompt reports its last step (value == max)
        await until(lambda: runs_of(data_dir, "p-end") == 1)
        open_gate(data_dir, "p-end")
        # Ours starts after it on the same socket: the other's progress has been through the proxy by then.
        await events_until(ws, lambda e: e["type"] == "executing" and e["data"].get("prompt_id") == first)
        await _nothing_more_goes_out(cluster, second)
        open_gate(data_dir, "a")
        open_gate(data_dir, "b.safetensors")
        await _all_succeed(http, [first, second])
        assert await direct.history_entry(other) is not None
    await ws.close()
