"""The API edition as users run it: real processes, the official SDK, kill -9 faults."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import httpx

from queue_service.client import QueueClient
from standard.ports import free_port
from support.api import SERVICE, TOKEN, Procs, read_results, requires_sdk, results_final, run_sdk, submit, wait_running
from support.metrics import scrape, value
from support.processes import wait_for_port
from support.server import gated_graph, install_gate_plugin, open_gate, tiny_graph
from support.wait import until


@requires_sdk
async def test_all_in_one_with_the_official_sdk(procs: Procs, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    api = procs.start("api", "api", "--data-dir", str(data_dir), "--port", str(port), "--token", TOKEN,
                      "--service", SERVICE, "--instances", "2")
    wait_for_port(port, timeout_s=30, proc=api)
    base = f"http://127.0.0.1:{port}"
    request_ids = {}
    for i in range(5):
        resp = await submit(base, tiny_graph(f"txt2img_{i}"), f"txt2img_{i}")
        request_ids[f"txt2img_{i}"] = resp.headers["X-Eas-Queueservice-Request-Id"]
    out = await run_sdk(f"127.0.0.1:{port}", {"count": 5})
    results = out["results"]
    assert sorted(r["tags"]["task_id"] for r in results) == sorted(request_ids), procs.log("api")
    for result in results:
        task_id = result["tags"]["task_id"]
        assert result["tags"]["requestId"] == request_ids[task_id]
        outputs = result["data"][-1]
        [image] = outputs["2"]["images"]
        assert image["filename"] == f"{task_id}_00001_.png"
        assert (data_dir / "output" / image["filename"]).is_file()
    assert out["attrs"]["stream.length"] == "0"  # all committed
    api.send_signal(signal.SIGTERM)
    assert api.wait(20) == 0


async def _gated_setup(procs: Procs, tmp_path: Path) -> tuple[Path, str, list[tuple[subprocess.Popen[bytes], str]]]:
    """Front + queue (no local workers), two instances on one data dir with the gate plugin."""
    data_dir = tmp_path / "data"
    from standard.datadir import init_data_dir

    init_data_dir(data_dir)
    install_gate_plugin(data_dir)
    queue_url, instances = procs.split(data_dir, 2)
    return data_dir, queue_url, instances


async def _exactly_one(queue_url: str, task_id: str) -> None:
    async with QueueClient(queue_url, f"{SERVICE}/sink", token=TOKEN) as sink:
        [frame] = await read_results(sink, 1)
        assert frame.tags["task_id"] == task_id and frame.tags["status"] == "success"
    await results_final(queue_url, 1)


async def test_kill_9_worker_mid_task_gives_exactly_one_result(procs: Procs, tmp_path: Path) -> None:
    data_dir, queue_url, [(_, first), (_, second)] = await _gated_setup(procs, tmp_path)
    worker_a = procs.worker("worker_a", queue_url, first)
    await submit(queue_url, gated_graph("g1", "gated"), "gated")
    await wait_running(first)
    os.kill(worker_a.pid, signal.SIGKILL)
    worker_a.wait(10)
    procs.worker("worker_b", queue_url, second)
    await wait_running(second, timeout_s=20)  # the item came back after the dead worker's lease
    open_gate(data_dir, "g1")
    await _exactly_one(queue_url, "gated")


async def test_kill_9_instance_mid_task_moves_the_task(procs: Procs, tmp_path: Path) -> None:
    data_dir, queue_url, [(instance_proc, first), (_, second)] = await _gated_setup(procs, tmp_path)
    procs.worker("worker_a", queue_url, first)
    await submit(queue_url, gated_graph("g2", "moved"), "moved")
    await wait_running(first)
    procs.worker("worker_b", queue_url, second)
    os.kill(instance_proc.pid, signal.SIGKILL)
    await wait_running(second, timeout_s=20)  # worker A gave the task back
    open_gate(data_dir, "g2")
    await _exactly_one(queue_url, "moved")
    assert "giving task moved back" in procs.log("worker_a")


async def test_split_deployment_queue_front_worker_on_redis(procs: Procs, tmp_path: Path, redis_url: str) -> None:
    """comfyserve queue (Redis) + comfyserve api --queue-url (stateless front) + standard + worker."""
    queue_port, front_port = free_port(), free_port()
    queue = procs.start("queue", "queue", "--redis-url", redis_url, "--port", str(queue_port), "--token", TOKEN)
    front = procs.start("front", "api", "--queue-url", f"http://127.0.0.1:{queue_port}", "--port", str(front_port),
                        "--token", TOKEN, "--service", SERVICE)
    [(_, instance)] = procs.instances(1, tmp_path / "data")
    wait_for_port(queue_port, timeout_s=30, proc=queue)
    wait_for_port(front_port, timeout_s=30, proc=front)
    queue_url = f"http://127.0.0.1:{queue_port}"
    metrics_port = free_port()
    worker = procs.worker("worker", queue_url, instance, "--metrics-port", str(metrics_port))
    for i in range(3):
        await submit(f"http://127.0.0.1:{front_port}", tiny_graph(f"split_{i}"), f"split_{i}")
    async with QueueClient(queue_url, f"{SERVICE}/sink", token=TOKEN) as sink:
        frames = await read_results(sink, 3)
    assert sorted(f.tags["task_id"] for f in frames) == [f"split_{i}" for i in range(3)], procs.log("worker")
    assert all((tmp_path / "data" / "output" / f"split_{i}_00001_.png").is_file() for i in range(3))
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

    async def counted() -> bool:  # a result is readable once put; the worker counts it after its input's commit
        return value(await scrape(metrics_url, TOKEN), "comfyserve_api_worker_tasks_total", status="success") == 3

    await until(counted, what="the worker counting its three tasks")
    metrics = await scrape(metrics_url, TOKEN)
    assert value(metrics, "comfyserve_api_worker_task_seconds_count") == 3
    assert value(metrics, "comfyserve_api_worker_tasks_in_flight") == 0
    assert metrics["comfyserve_api_worker_task_seconds"].type == "histogram"
    async with httpx.AsyncClient(trust_env=False) as http:
        health = (await http.get(f"http://127.0.0.1:{metrics_port}/healthz")).json()
    assert health == {"status": "ok", "instance_up": True}
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(20) == 0


async def test_restart_loses_no_queued_task(procs: Procs, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    args = ["api", "--data-dir", str(data_dir), "--port", str(port), "--token", TOKEN, "--service", SERVICE]
    api = procs.start("api1", *args, "--instances", "0")
    wait_for_port(port, proc=api)
    for i in range(3):
        await submit(f"http://127.0.0.1:{port}", tiny_graph(f"kept_{i}"), f"kept_{i}")
    api.send_signal(signal.SIGTERM)
    assert api.wait(20) == 0
    api = procs.start("api2", *args, "--instances", "1")
    wait_for_port(port, proc=api)
    async with QueueClient(f"127.0.0.1:{port}", f"{SERVICE}/sink", token=TOKEN) as sink:
        frames = await read_results(sink, 3)
    assert sorted(f.tags["task_id"] for f in frames) == [f"kept_{i}" for i in range(3)]
