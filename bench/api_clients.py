"""API edition figures for clients (issue 15): inline inputs, /api_task status, SSE latency — in one run.

Child processes as deployed: one instance (``python -m standard.cli standard``) and ``comfyserve api
--instance-url`` sharing one data dir; this process is only the client.

* inline input overhead: one task at a time, ``/api_prompt`` -> sink result latency minus the
  instance's execution time (its history's ``execution_start`` -> ``execution_success``), for the same
  LoadImage -> SaveImage graph whose 1 MB image is (a) already in the data dir, (b) sent inline as JSON
  base64, (c) sent as a multipart part; runs interleaved a, b, c, a, b, c...; extra p50 of b and c over a
  (goal < 15 ms);
* ``GET /api_task`` latency with 10k tasks queued (a second front without workers), p50 / p99 (goal p99
  < 5 ms), client-side on loopback;
* SSE: the instance's ``execution_start`` timestamp (ms) to the client's receipt of that event on
  ``/api_events``, and to the receipt of the first ``executing`` (goal p99 < 20 ms).

    .venv/bin/python -m bench.api_clients [--tasks 40] [--queued 10000] [--status-calls 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from bench.api import SERVICE, TOKEN, Children  # noqa: E402
from bench.support import pct  # noqa: E402
from queue_service.client import QueueClient  # noqa: E402
from standard.ports import free_port  # noqa: E402


def noise_png(side: int = 590) -> bytes:
    """About 1 MB: random pixels do not compress."""
    rng = random.Random(7)
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3)).save(out, format="PNG")
    return out.getvalue()


def load_graph(image: str, prefix: str) -> dict[str, Any]:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": image}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}


def big_graph(prefix: str) -> dict[str, Any]:
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1,
                                                         "color": random.randrange(1 << 24)}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}


async def history_stamps(http: httpx.AsyncClient, instance: str, prompt_id: str) -> dict[str, int]:
    for _ in range(200):
        entry = (await http.get(f"{instance}/history/{prompt_id}")).json().get(prompt_id)
        if entry:
            return {kind: data["timestamp"] for kind, data in entry["status"]["messages"] if "timestamp" in data}
        await asyncio.sleep(0.01)
    raise RuntimeError(f"prompt {prompt_id} never reached the history")


async def inline_overhead(base: str, endpoint: str, instance: str, image: bytes, tasks: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"in data dir": [], "inline JSON": [], "multipart": []}
    encoded = base64.b64encode(image).decode()
    async with httpx.AsyncClient(base_url=base, trust_env=False, headers={"Authorization": TOKEN},
                                 timeout=60) as http, QueueClient(endpoint, f"{SERVICE}/sink", token=TOKEN) as sink:
        async with sink.watch(window=1) as frames:
            iterator = frames.__aiter__()
            for i in range(tasks):
                for kind in out:
                    prefix = f"bench/{kind[:2]}{i}"
                    start = time.perf_counter()
                    if kind == "in data dir":
                        resp = await http.post("/api_prompt", json=load_graph("bench_ref.png", prefix))
                    elif kind == "inline JSON":
                        resp = await http.post("/api_prompt", json={"prompt": load_graph("face.png", prefix),
                                                                    "inputs": [{"name": "face.png", "data": encoded}]})
                    else:
                        resp = await http.post("/api_prompt", files={
                            "prompt": (None, json.dumps(load_graph("face.png", prefix))),
                            "f": ("face.png", image, "image/png")})
                    resp.raise_for_status()
                    frame = await iterator.__anext__()
                    latency_ms = (time.perf_counter() - start) * 1000
                    await sink.commit(frame.index)
                    assert frame.tags["status"] == "success", frame.data[:500]
                    stamps = await history_stamps(http, instance, frame.tags["prompt_id"])
                    if i > 0:  # the first round warms caches
                        out[kind].append(latency_ms - (stamps["execution_success"] - stamps["execution_start"]))
    return out


async def sse_latency(base: str, tasks: int) -> tuple[list[float], list[float]]:
    """(execution_start stamp -> its receipt, execution_start stamp -> first executing receipt), in ms."""
    starts, executing = [], []
    async with httpx.AsyncClient(base_url=base, trust_env=False, headers={"Authorization": TOKEN},
                                 timeout=60) as http:
        for i in range(tasks):
            # A slower task first, so the stream is open before ours starts.
            (await http.post("/api_prompt", params={"task_id": f"slow{i}"}, json=big_graph(f"bench/s{i}"))
             ).raise_for_status()
            (await http.post("/api_prompt", params={"task_id": f"sse{i}"}, json=big_graph(f"bench/e{i}"))
             ).raise_for_status()
            start_stamp: int | None = None
            async with http.stream("GET", "/api_events", params={"task_id": f"sse{i}"}) as resp:
                kind = ""
                async for line in resp.aiter_lines():
                    now_ms = time.time() * 1000
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: ") and kind == "status" and json.loads(line[6:])["state"] != "queued":
                        break  # our task started before the stream was open: not counted
                    elif line.startswith("data: ") and kind == "execution_start":
                        start_stamp = json.loads(line[6:])["data"]["timestamp"]
                        starts.append(now_ms - start_stamp)
                    elif line.startswith("data: ") and kind == "executing" and start_stamp is not None:
                        executing.append(now_ms - start_stamp)
                        break
    return starts, executing


async def status_latency(base: str, queued: int, calls: int) -> list[float]:
    async with httpx.AsyncClient(base_url=base, trust_env=False, headers={"Authorization": TOKEN},
                                 limits=httpx.Limits(max_connections=16), timeout=60) as http:
        sem = asyncio.Semaphore(16)
        body = json.dumps(big_graph("bench/q")).encode()

        async def put(i: int) -> None:
            async with sem:
                (await http.post("/api_prompt", params={"task_id": f"q{i}"}, content=body)).raise_for_status()

        await asyncio.gather(*(put(i) for i in range(queued)))
        out = []
        for _ in range(calls):
            i = random.randrange(queued)
            start = time.perf_counter()
            resp = await http.get("/api_task", params={"task_id": f"q{i}"})
            out.append((time.perf_counter() - start) * 1000)
            assert resp.json()["state"] == "queued"
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--status-calls", type=int, default=1000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"cpus: {os.cpu_count()}  load: {os.getloadavg()[0]:.1f}", flush=True)
    image = noise_png()
    with tempfile.TemporaryDirectory(prefix="comfyserve-bench-clients-") as tmp:
        workdir = Path(tmp)
        data = workdir / "data"
        children = Children(workdir)
        try:
            iport, aport, qport = free_port(), free_port(), free_port()
            instance = children.start("instance", ["standard", "--data-dir", str(data), "--token", TOKEN], iport)
            instance_url = f"http://127.0.0.1:{iport}"
            await children.ready(instance_url, "/readyz", instance)
            (data / "input" / "bench_ref.png").write_bytes(image)
            api = children.start("api", ["api", "--data-dir", str(data), "--token", TOKEN, "--service", SERVICE,
                                         "--instance-url", instance_url, "--instance-token", TOKEN], aport)
            base = f"http://127.0.0.1:{aport}"
            await children.ready(base, "/healthz", api)
            overhead = await inline_overhead(base, f"127.0.0.1:{aport}", instance_url, image, args.tasks)
            reference = statistics.median(overhead["in data dir"])
            print(f"1 MB image ({len(image)} bytes), api_prompt -> sink result minus execution, sequential:")
            for kind, values in overhead.items():
                extra = "" if kind == "in data dir" else f", extra p50 {statistics.median(values) - reference:+.1f} ms"
                print(f"  {kind:12}: p50 {statistics.median(values):.1f} ms, p99 {pct(values, 0.99):.1f} ms{extra}")
            starts, executing = await sse_latency(base, args.tasks)
            if starts:
                print(f"SSE ({len(starts)} tasks): instance execution_start -> client: p50 "
                      f"{statistics.median(starts):.1f} ms, p99 {pct(starts, 0.99):.1f} ms; -> first executing: p50 "
                      f"{statistics.median(executing):.1f} ms, p99 {pct(executing, 0.99):.1f} ms (goal p99 < 20 ms)")
            queue_only = children.start("front", ["api", "--data-dir", str(workdir / "q"), "--token", TOKEN,
                                                  "--service", SERVICE, "--instances", "0",
                                                  "--max-length", str(args.queued * 2)], qport)
            qbase = f"http://127.0.0.1:{qport}"
            await children.ready(qbase, "/healthz", queue_only)
            status = await status_latency(qbase, args.queued, args.status_calls)
            print(f"GET /api_task with {args.queued} tasks queued ({args.status_calls} calls): p50 "
                  f"{statistics.median(status):.2f} ms, p99 {pct(status, 0.99):.2f} ms (goal p99 < 5 ms)")
        finally:
            children.stop()


if __name__ == "__main__":
    from standard.cli import use_event_loop

    print(f"event loop: {use_event_loop('auto')} (as comfyserve's default)")
    asyncio.run(main())
