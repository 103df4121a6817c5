"""Embedded engine figures: start-to-ready time, and tasks/s on a tiny graph.

    .venv/bin/python -m bench.engine [--tasks 200]

Prints absolute figures and, as the same-run baseline, the engine's own
in-process execution rate (no HTTP, no queue): the ratio shows what the
server around it costs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from standard.ports import free_port  # noqa: E402


def tiny_graph(index: int) -> dict:
    # a different color each time: ComfyUI's cache would otherwise skip the work
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                          "color": index % 0xFFFFFF}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bench"}}}


def in_process_rate(tasks: int) -> float:
    """Tasks/s of PromptExecutor.execute alone on a fresh data dir."""
    from standard.datadir import init_data_dir
    from standard.engine import NodeRegistry, PromptExecutor, validate_prompt

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = init_data_dir(tmp)
        registry = NodeRegistry(data_dir, data_dir.workdirs())
        registry.load()
        executor = PromptExecutor(registry, lambda *a: None)
        started = time.perf_counter()
        for index in range(tasks):
            graph = tiny_graph(index)
            valid, _, outputs, _ = validate_prompt(registry, str(index), graph, None)
            assert valid
            executor.execute(graph, str(index), {}, outputs)
            assert executor.success
        return tasks / (time.perf_counter() - started)


async def server_figures(tasks: int) -> tuple[float, float]:
    """(seconds from process start to /readyz 200, tasks/s through HTTP)."""
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "standard", "--port", str(port), "--data-dir", tmp],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                while True:
                    try:
                        if (await client.get("/readyz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.perf_counter() - started > 60:
                        raise RuntimeError("instance never became ready")
                    await asyncio.sleep(0.005)
                ready_s = time.perf_counter() - started
                began = time.perf_counter()
                ids = []
                for index in range(tasks):
                    resp = await client.post("/prompt", json={"prompt": tiny_graph(index)})
                    ids.append(resp.json()["prompt_id"])
                while True:
                    queue = (await client.get("/prompt")).json()
                    if queue["exec_info"]["queue_remaining"] == 0:
                        break
                    await asyncio.sleep(0.01)
                rate = tasks / (time.perf_counter() - began)
                history = (await client.get("/history", params={"max_items": tasks})).json()
                assert all(history[i]["status"]["status_str"] == "success" for i in ids)
                return ready_s, rate
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    args = parser.parse_args()
    baseline = in_process_rate(args.tasks)
    ready_s, rate = asyncio.run(server_figures(args.tasks))
    print(f"start to ready: {ready_s:.2f} s (goal < 2 s)")
    print(f"tiny graph (EmptyImage 64x64 -> SaveImage), {args.tasks} tasks:")
    print(f"  through HTTP /prompt:  {rate:8.1f} tasks/s")
    print(f"  engine in-process:     {baseline:8.1f} tasks/s (baseline, same run)")
    print(f"  ratio server/engine:   {rate / baseline:8.2f}")


if __name__ == "__main__":
    main()
