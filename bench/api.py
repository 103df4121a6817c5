"""API edition figures: throughput vs instances, per-task overhead, gap between tasks on an instance.

Runs, in one run, the API edition as it is deployed: N instances
(``python -m standard``) and ``comfyserve api --instance-url ...`` (queue +
/api_prompt front + one worker per instance) as child processes; this process
is only the client (so its own CPU is not counted against the API process):

* throughput: ``--tasks`` tasks put at once through ``/api_prompt``, time until
  all their results were watched (and committed) on ``svc/sink``, for N = 1, 2, 4;
  scaling ratio = tasks/s at N over tasks/s at N = 1; CPU per task of the API
  process and of the instances;
* overhead per task (N = 1, one task at a time): ``/api_prompt`` -> sink result
  latency minus the instance's own execution time (``execution_start`` ->
  ``execution_success`` in its history, ms timestamps), p50 / p99 (goal p50 < 10 ms);
* gap on an instance (from the throughput run's backlog at N = 1): its
  ``execution_success`` of one task to the ``execution_start`` of the next, p50
  (goal < 5 ms).

The graph is tiny (EmptyImage -> SaveImage, a different colour per task so
ComfyUI-style caching never skips it).

    .venv/bin/python -m bench.api [--tasks 200] [--latency-tasks 100] [--instances 1,2,4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# Run as a script, bench/ is sys.path[0]: its modules (bench/queue.py) must not shadow the stdlib's.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402

from bench.support import cpu_seconds, pct  # noqa: E402
from queue_service.client import DataFrame, QueueClient  # noqa: E402
from standard.ports import free_port  # noqa: E402

TOKEN = "bench-token"
SERVICE = "bench"


def graph(i: int, size: int) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 1,
                                                     "color": i % 0xFFFFFF}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": f"bench/t{i}"}},
    }


class Bench:
    def __init__(self, base_url: str, endpoint: str, instance_urls: list[str], size: int) -> None:
        self.base_url = base_url
        self.instance_urls = instance_urls
        self.size = size
        self.http = httpx.AsyncClient(base_url=base_url, trust_env=False, headers={"Authorization": TOKEN},
                                      limits=httpx.Limits(max_connections=32))
        self.sink = QueueClient(endpoint, f"{SERVICE}/sink", token=TOKEN)
        self.counter = 0

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.sink.aclose()

    async def submit(self) -> str:
        self.counter += 1
        i = self.counter
        resp = await self.http.post("/api_prompt", params={"task_id": f"t{i}"},
                                    content=json.dumps(graph(i, self.size)))
        resp.raise_for_status()
        return f"t{i}"

    async def results(self, count: int) -> list[tuple[float, DataFrame]]:
        got = []
        async with self.sink.watch(window=64) as frames:
            async for frame in frames:
                got.append((time.perf_counter(), frame))
                await self.sink.commit(frame.index)
                if len(got) == count:
                    break
        return got

    async def throughput(self, tasks: int) -> tuple[float, list[DataFrame]]:
        reader = asyncio.create_task(self.results(tasks))
        start = time.perf_counter()
        sem = asyncio.Semaphore(16)

        async def one() -> None:
            async with sem:
                await self.submit()

        await asyncio.gather(*(one() for _ in range(tasks)))
        got = await reader
        elapsed = got[-1][0] - start
        return tasks / elapsed, [frame for _, frame in got]

    async def history(self, prompt_id: str) -> tuple[str, dict[str, Any]]:
        """(instance url, history entry); the result may reach the sink just before the history is written."""
        for _ in range(200):
            for url in self.instance_urls:
                resp = await self.http.get(f"{url}/history/{prompt_id}")
                entry = resp.json().get(prompt_id)
                if entry:
                    return url, entry
            await asyncio.sleep(0.01)
        raise RuntimeError(f"prompt {prompt_id} is in no instance's history")

    @staticmethod
    def stamps(entry: dict[str, Any]) -> dict[str, int]:
        return {kind: data["timestamp"] for kind, data in entry["status"]["messages"] if "timestamp" in data}

    async def overhead(self, tasks: int) -> list[float]:
        out = []
        async with self.sink.watch(window=1) as frames:
            iterator = frames.__aiter__()
            for _ in range(tasks):
                start = time.perf_counter()
                await self.submit()
                frame = await iterator.__anext__()
                latency_ms = (time.perf_counter() - start) * 1000
                await self.sink.commit(frame.index)
                _, entry = await self.history(frame.tags["prompt_id"])
                s = self.stamps(entry)
                out.append(latency_ms - (s["execution_success"] - s["execution_start"]))
        return out

    async def gaps(self, frames: list[DataFrame]) -> list[float]:
        by_instance: dict[str, list[tuple[int, int]]] = {}
        for frame in frames:
            url, entry = await self.history(frame.tags["prompt_id"])
            s = self.stamps(entry)
            by_instance.setdefault(url, []).append((s["execution_start"], s["execution_success"]))
        gaps = []
        for runs in by_instance.values():
            runs.sort()
            gaps += [nxt[0] - prev[1] for prev, nxt in zip(runs, runs[1:], strict=False)]
        return [float(g) for g in gaps]


class Children:
    """The child processes of one run; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], port: int) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", "standard.cli", *args, "--port", str(port)],
                                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    async def ready(self, url: str, path: str, proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
        async with httpx.AsyncClient(trust_env=False, headers={"Authorization": TOKEN}) as http:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"{url} exited with {proc.returncode}; see {self.workdir}")
                try:
                    if (await http.get(url + path)).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError(f"{url}{path} never answered 200")

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


async def run_n(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    run_dir = workdir / f"n{n}"
    run_dir.mkdir()
    children = Children(run_dir)
    try:
        urls, instances = [], []
        for k in range(n):
            port = free_port()
            instances.append(children.start(f"instance{k}", ["standard", "--data-dir", str(run_dir / f"i{k}"),
                                                             "--token", TOKEN], port))
            urls.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(urls, instances, strict=True):
            await children.ready(url, "/readyz", proc)
        port = free_port()
        api = children.start("api", ["api", "--data-dir", str(run_dir / "api"), "--token", TOKEN, "--service",
                                     SERVICE, "--max-length", "100000", "--instance-token", TOKEN,
                                     *(part for url in urls for part in ("--instance-url", url))], port)
        await children.ready(f"http://127.0.0.1:{port}", "/healthz", api)
        bench = Bench(f"http://127.0.0.1:{port}", f"127.0.0.1:{port}", urls, args.size)
        try:
            await asyncio.wait_for(bench.throughput(2 * n), 60)  # warm-up: workers connected, caches primed
            api_cpu, instances_cpu = cpu_seconds(api.pid), sum(cpu_seconds(p.pid) for p in instances)
            rate, frames = await bench.throughput(args.tasks)
            out: dict[str, Any] = {
                "n": n, "tasks_per_s": rate,
                "api_cpu_ms_per_task": (cpu_seconds(api.pid) - api_cpu) * 1000 / args.tasks,
                "instances_cpu_ms_per_task":
                    (sum(cpu_seconds(p.pid) for p in instances) - instances_cpu) * 1000 / args.tasks,
            }
            if n == 1:
                out["gaps_ms"] = await bench.gaps(frames)
                out["overhead_ms"] = await bench.overhead(args.latency_tasks)
            return out
        finally:
            await bench.aclose()
    finally:
        children.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--latency-tasks", type=int, default=100)
    parser.add_argument("--instances", default="1,2,4")
    parser.add_argument("--size", type=int, default=16, help="image side in pixels")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"cpus: {os.cpu_count()}  load: {os.getloadavg()[0]:.1f}  tasks: {args.tasks}  "
          f"graph: EmptyImage {args.size}px -> SaveImage", flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="comfyserve-bench-api-") as tmp:
        for n in (int(x) for x in args.instances.split(",")):
            result = await run_n(n, args, Path(tmp))
            runs.append(result)
            print(f"N={n}: {result['tasks_per_s']:.1f} tasks/s (load {os.getloadavg()[0]:.1f}; CPU per task: "
                  f"API process {result['api_cpu_ms_per_task']:.1f} ms, instances "
                  f"{result['instances_cpu_ms_per_task']:.1f} ms)", flush=True)
    base = runs[0]["tasks_per_s"]
    print("scaling vs N=1: " + ", ".join(f"N={r['n']}: {r['tasks_per_s'] / base:.2f}x" for r in runs))
    first = runs[0]
    if "overhead_ms" in first:
        o = first["overhead_ms"]
        print(f"overhead per task (api_prompt -> sink result minus execution), N=1 sequential: "
              f"p50 {statistics.median(o):.1f} ms, p99 {pct(o, 0.99):.1f} ms (goal p50 < 10 ms)")
        g = first["gaps_ms"]
        print(f"gap between tasks on an instance (backlog): p50 {statistics.median(g):.1f} ms, "
              f"p90 {pct(g, 0.9):.1f} ms (goal p50 < 5 ms; ms-resolution timestamps)")


if __name__ == "__main__":
    from standard.cli import use_event_loop

    print(f"event loop: {use_event_loop('auto')} (as comfyserve's default)")
    asyncio.run(main())
