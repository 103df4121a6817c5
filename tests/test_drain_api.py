"""SIGTERM drains the API edition: the running task finishes or goes back; one result per task.

``comfyserve api`` (all-in-one) and ``comfyserve worker`` as real processes with real signals.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import httpx

from queue_service.client import QueueClient
from standard.datadir import init_data_dir
from standard.ports import free_port
from support.api import SERVICE, TOKEN, Procs, read_results, results_final, submit
from support.processes import wait_for_port
from support.server import drain_gate_graph, install_gate_plugin, open_gate, runs_of
from support.wait import until

AUTH = {"Authorization": TOKEN}


def gated_data_dir(tmp_path: Path) -> Path:
    data_dir = init_data_dir(tmp_path / "data").root
    install_gate_plugin(data_dir)
    return data_dir


async def exited(proc: subprocess.Popen, timeout_s: float = 30.0) -> int:
    return await asyncio.to_thread(proc.wait, timeout_s)


async def one_result(queue_url: str, task_id: str, status: str = "success") -> None:
    """Exactly one result for ``task_id`` on the sink, and the input queue emptied (committed)."""
    async with QueueClient(queue_url, f"{SERVICE}/sink", token=TOKEN) as sink:
        [frame] = await read_results(sink, 1)
        assert frame.tags["task_id"] == task_id and frame.tags["status"] == status, frame.tags
    await results_final(queue_url, 1)


def api_args(data_dir: Path, port: int, *extra: str) -> list[str]:
    return ["api", "--data-dir", str(data_dir), "--port", str(port), "--token", TOKEN, "--service", SERVICE,
            "--pending-timeout", "300", *extra]


async def test_all_in_one_finishes_the_running_task_and_refuses_new_ones(procs: Procs, tmp_path: Path) -> None:
    data_dir, port = gated_data_dir(tmp_path), free_port()
    base = f"http://127.0.0.1:{port}"
    api = procs.start("api", *api_args(data_dir, port, "--instances", "1", "--shutdown-timeout", "45"))
    await asyncio.to_thread(wait_for_port, port, 30, api)
    await submit(base, drain_gate_graph("g", "finished"), "finished")
    await until(lambda: runs_of(data_dir, "g") == 1, what="the task starting")

    api.send_signal(signal.SIGTERM)
    # The signal is handled when the loop gets to it: a request sent meanwhile may pass the check before
    # the drain begins, and is then accepted and kept on the queue for the next start. From the drain on,
    # every one is refused.
    await until(lambda: "comfyserve: draining: up to 45s" in procs.log("api"), what="the drain beginning")
    async with httpx.AsyncClient(base_url=base, headers=AUTH, trust_env=False) as http:
        resp = await http.post("/api_prompt", params={"task_id": "late"}, json=drain_gate_graph("g", "late"))
    assert resp.status_code == 503 and resp.headers.get("Retry-After", "").isdigit(), resp.text
    assert api.poll() is None  # still draining: the task is running
    open_gate(data_dir, "g")
    assert await exited(api) == 0, procs.log("api")
    assert (data_dir / "output" / "finished_00001_.png").is_file()

    again = procs.start("api2", *api_args(data_dir, port, "--instances", "0"))
    await asyncio.to_thread(wait_for_port, port, 30, again)
    await one_result(base, "finished")
    assert runs_of(data_dir, "g") == 1


async def test_all_in_one_past_the_timeout_hands_the_task_back(procs: Procs, tmp_path: Path) -> None:
    data_dir, port = gated_data_dir(tmp_path), free_port()
    base = f"http://127.0.0.1:{port}"
    api = procs.start("api", *api_args(data_dir, port, "--instances", "1", "--shutdown-timeout", "1"))
    await asyncio.to_thread(wait_for_port, port, 30, api)
    await submit(base, drain_gate_graph("g", "handed"), "handed")
    await until(lambda: runs_of(data_dir, "g") == 1, what="the task starting")

    started = time.monotonic()
    api.send_signal(signal.SIGTERM)
    assert await exited(api) == 0, procs.log("api")
    assert time.monotonic() - started < 20
    assert "giving task handed back" in procs.log("api")
    assert not list((data_dir / "output").glob("handed*"))

    # The next start (its worker has another id: the item must have been released, not leased) runs it once.
    open_gate(data_dir, "g")
    again = procs.start("api2", *api_args(data_dir, port, "--instances", "1"))
    await asyncio.to_thread(wait_for_port, port, 30, again)
    await one_result(base, "handed")
    assert runs_of(data_dir, "g") == 2
    assert (data_dir / "output" / "handed_00001_.png").is_file()


async def test_worker_past_the_timeout_hands_the_task_to_another_worker_at_once(procs: Procs,
                                                                                tmp_path: Path) -> None:
    data_dir, port = gated_data_dir(tmp_path), free_port()
    queue_url = f"http://127.0.0.1:{port}"
    api = procs.start("api", *api_args(data_dir, port, "--instances", "0"))
    (_, first), (_, second) = procs.instances(2, data_dir)
    await asyncio.to_thread(wait_for_port, port, 30, api)
    worker_a = procs.worker("worker_a", queue_url, first, "--shutdown-timeout", "1")
    await submit(queue_url, drain_gate_graph("g", "moved"), "moved")
    await until(lambda: runs_of(data_dir, "g") == 1, what="the task starting on worker A's instance")

    worker_a.send_signal(signal.SIGTERM)
    assert await exited(worker_a) == 0, procs.log("worker_a")
    assert "giving task moved back" in procs.log("worker_a")
    procs.worker("worker_b", queue_url, second)
    # --pending-timeout is 300 s: only a released item reaches worker B this soon.
    await until(lambda: runs_of(data_dir, "g") == 2, timeout_s=20, what="worker B taking the task")
    open_gate(data_dir, "g")
    await one_result(queue_url, "moved")
    assert runs_of(data_dir, "g") == 2


async def test_worker_finishes_its_task_before_it_exits(procs: Procs, tmp_path: Path) -> None:
    data_dir, port = gated_data_dir(tmp_path), free_port()
    queue_url = f"http://127.0.0.1:{port}"
    api = procs.start("api", *api_args(data_dir, port, "--instances", "0"))
    [(_, instance)] = procs.instances(1, data_dir)
    await asyncio.to_thread(wait_for_port, port, 30, api)
    worker = procs.worker("worker", queue_url, instance, "--shutdown-timeout", "45")
    await submit(queue_url, drain_gate_graph("g", "kept"), "kept")
    await until(lambda: runs_of(data_dir, "g") == 1, what="the task starting")
    worker.send_signal(signal.SIGTERM)
    await submit(queue_url, drain_gate_graph("g2", "next"), "next")  # queued meanwhile: not taken
    open_gate(data_dir, "g")
    assert await exited(worker) == 0, procs.log("worker")
    async with QueueClient(queue_url, f"{SERVICE}/sink", token=TOKEN) as sink:
        [frame] = await read_results(sink, 1)
        assert frame.tags["task_id"] == "kept" and frame.tags["status"] == "success"
    assert runs_of(data_dir, "g2") == 0
    await results_final(queue_url, 1, queued=1)  # the worker is gone: "next" waits for the next one
