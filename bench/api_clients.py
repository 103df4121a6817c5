"""API edition figures for clients (issue 15): inline inputs, ``/api_task``, ``/api_events``, each beside its
baseline measured in the same run.

Child processes as deployed: a redis-server, one instance (``standard``), front A (``comfyserve api
--redis-url --instance-url``: the worker) and front B (same Redis, ``--instances 0``: no worker),
plus front C (another service on the same Redis, no worker) holding ``--queued`` tasks. This
process is only the client, on loopback.

* Inline input overhead on front A: one task at a time, ``/api_prompt`` -> sink result latency minus
  the instance's execution time (its history's ``execution_start`` -> ``execution_success``), for the
  same LoadImage -> SaveImage graph whose 1 MB image is (baseline) already in the data dir, sent
  inline as JSON base64 (the body built with the base64 put in as it is, as a client sending a file
  does; and, apart, with the client's ``json.dumps`` of the whole document in the timing), or sent as
  a multipart part; runs interleaved; extra p50 over the baseline. Goal: < 15 ms p50 extra.

* ``GET /api_task`` on front C with ``--queued`` tasks waiting (random task ids, sequential calls),
  p50 / p99, beside two baselines called interleaved with it on the same front: ``GET /healthz``
  (no auth, no store) and ``GET /api/predict/{svc}?_count_=true`` (token + one store call). Goal:
  p99 < 5 ms.
* ``GET /api_events`` on front B for tasks that front A's worker runs: the instance stamps its
  ``execution_start`` event (``timestamp``, ms, wall clock); the client takes the wall clock when
  the relayed event arrives, and again at the first ``executing`` (sent by the instance right after
  ``execution_start``, so its figure is an upper bound). Goal: first ``executing`` p99 < 20 ms.
  Tasks are held behind a gated one until the stream follows them, then run back to back. The same
  again with the stream on front A (the worker's own front); the baseline, in the same run: the
  same stamps read by this client straight off the instance's own ``/ws`` (one hop instead of
  instance -> worker -> Redis -> front -> client).

    .venv/bin/python -m bench.api_clients [--inline-tasks 40] [--queued 10000] [--status-calls 2000]
        [--event-tasks 100] [--skip inline,status,events]
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
import shutil
import statistics
import subprocess
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

from bench.support import pct  # noqa: E402
from queue_service.client import QueueClient  # noqa: E402
from standard.datadir import init_data_dir  # noqa: E402
from standard.ports import free_port  # noqa: E402

TOKEN = "bench-token-0123456789"
SERVICE = "bench"
STATUS_SERVICE = "bench-status"
AUTH = {"Authorization": TOKEN}
MAX_FOLLOWED = 100  # tasks per event stream (the route's cap)

GATE_NODE = REPO_ROOT / "tests" / "custom_nodes" / "gate_node.py"  # TestGate: the tests' own gate node
GATE_TIMEOUT_S = 120.0


def tiny(i: int, prefix: str) -> dict[str, Any]:
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": i}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}


def gated(gate: str) -> dict[str, Any]:
    graph = tiny(0, "gated")
    graph["3"] = {"class_type": "TestGate", "inputs": {"image": ["1", 0], "gate": gate, "timeout_s": GATE_TIMEOUT_S}}
    graph["2"]["inputs"]["images"] = ["3", 0]
    return graph


class Children:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def comfyserve(self, name: str, args: list[str], port: int) -> subprocess.Popen:
        return self.start(name, [sys.executable, "-m", "standard.cli", *args, "--port", str(port)])

    async def ready(self, url: str, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
        async with httpx.AsyncClient(trust_env=False) as http:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"{url} exited with {proc.returncode}; see {self.workdir}")
                try:
                    if (await http.get(url + "/healthz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError(f"{url} never answered")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def noise_png(side: int = 590) -> bytes:
    """About 1 MB: random pixels do not compress."""
    rng = random.Random(7)
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3)).save(out, format="PNG")
    return out.getvalue()


def load_graph(image: str, prefix: str) -> dict[str, Any]:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": image}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}


def inline_body(graph: dict[str, Any], name: str, data: bytes) -> bytes:
    """``{"prompt": graph, "inputs": [{"name", "data"}]}`` with the base64 put in as it is: it needs no JSON
    escaping, so a client need not run 1.4 MB through ``json.dumps`` (2-6 ms here) to send it."""
    head = json.dumps({"prompt": graph, "inputs": [{"name": name, "data": ""}]}).encode()
    cut = head.rindex(b'""') + 1
    return head[:cut] + base64.b64encode(data) + head[cut:]


async def history_stamps(http: httpx.AsyncClient, instance: str, prompt_id: str) -> dict[str, int]:
    for _ in range(200):
        entry = (await http.get(f"{instance}/history/{prompt_id}", headers=AUTH)).json().get(prompt_id)
        if entry:
            return {kind: data["timestamp"] for kind, data in entry["status"]["messages"] if "timestamp" in data}
        await asyncio.sleep(0.01)
    raise RuntimeError(f"prompt {prompt_id} never reached the history")


async def inline_figures(base: str, endpoint: str, instance: str, image: bytes, tasks: int) -> dict[str, list[float]]:
    """Per kind, api_prompt -> sink result minus the instance's execution time, in ms (the first round warms up)."""
    out: dict[str, list[float]] = {"in data dir": [], "inline JSON": [], "inline JSON, client json.dumps": [],
                                   "multipart": []}
    encoded = base64.b64encode(image).decode()
    async with httpx.AsyncClient(base_url=base, trust_env=False, headers=AUTH, timeout=60) as http, \
            QueueClient(endpoint, f"{SERVICE}/sink", token=TOKEN) as sink, sink.watch(window=1) as frames:
        iterator = frames.__aiter__()
        for i in range(tasks + 1):
            for kind in out:
                prefix = f"bench/{kind[:2]}{i}"
                start = time.perf_counter()
                if kind == "in data dir":
                    resp = await http.post("/api_prompt", json=load_graph("bench_ref.png", prefix))
                elif kind == "inline JSON":
                    resp = await http.post("/api_prompt", content=inline_body(load_graph("face.png", prefix),
                                                                              "face.png", image),
                                           headers={"Content-Type": "application/json"})
                elif kind == "inline JSON, client json.dumps":
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
                if i > 0:
                    out[kind].append(latency_ms - (stamps["execution_success"] - stamps["execution_start"]))
    return out


async def submit(http: httpx.AsyncClient, graph: dict[str, Any], task_id: str) -> None:
    resp = await http.post("/api_prompt", params={"task_id": task_id}, json=graph, headers=AUTH)
    resp.raise_for_status()


async def timed_get(http: httpx.AsyncClient, path: str, params: dict[str, str], headers: dict[str, str]) -> float:
    started = time.perf_counter()
    resp = await http.get(path, params=params, headers=headers)
    elapsed = (time.perf_counter() - started) * 1000
    resp.raise_for_status()
    return elapsed


async def status_figures(base: str, queued: int, calls: int) -> dict[str, list[float]]:
    async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=60) as http:
        semaphore = asyncio.Semaphore(32)

        async def put(i: int) -> None:
            async with semaphore:
                await submit(http, tiny(i, "q"), f"queued-{i}")

        await asyncio.gather(*(put(i) for i in range(queued)))
        count = (await http.get(f"/api/predict/{STATUS_SERVICE}", params={"_count_": "true"}, headers=AUTH)).text
        assert int(count) == queued, count
        last = (await http.get("/api_task", params={"task_id": f"queued-{queued - 1}"}, headers=AUTH)).json()
        assert last["state"] == "queued" and 0 <= last["position"] < queued, last
        out: dict[str, list[float]] = {"api_task": [], "healthz": [], "queue_count": []}
        for _ in range(50):  # warm-up
            await timed_get(http, "/api_task", {"task_id": "queued-0"}, AUTH)
        for _ in range(calls):
            task = f"queued-{random.randrange(queued)}"
            out["api_task"].append(await timed_get(http, "/api_task", {"task_id": task}, AUTH))
            out["healthz"].append(await timed_get(http, "/healthz", {}, {}))
            out["queue_count"].append(await timed_get(http, f"/api/predict/{STATUS_SERVICE}", {"_count_": "true"},
                                                      AUTH))
        return out


async def event_figures(a: str, b: str, data_dir: Path, tasks: int) -> tuple[list[float], list[float]]:
    """(execution_start latencies, first executing latencies) in ms; tasks put and streamed on ``b``."""
    starts: list[float] = []
    executing: list[float] = []
    batch_no = 0
    async with httpx.AsyncClient(base_url=b, trust_env=False, timeout=120) as http_b, \
            httpx.AsyncClient(base_url=a, trust_env=False, timeout=120) as http_a:
        while len(starts) < tasks:
            batch_no += 1
            gate = f"gate-{batch_no}-{time.monotonic_ns()}"
            await submit(http_a, gated(gate), f"blocker-{gate}")
            size = min(MAX_FOLLOWED, tasks - len(starts))
            ids = [f"ev-{gate}-{i}" for i in range(size)]
            for i, task_id in enumerate(ids):
                await submit(http_b, tiny(random.randrange(2**24), "ev"), task_id)
            pending = set(ids)
            seen_start: dict[str, float] = {}
            async with http_b.stream("GET", "/api_events", params={"task_id": ids}, headers=AUTH) as resp:
                resp.raise_for_status()
                kind = ""
                statuses = 0
                async for line in resp.aiter_lines():
                    if line.startswith("event: "):
                        kind = line[7:]
                        continue
                    if not line.startswith("data: "):
                        continue
                    now_ms = time.time() * 1000
                    data = json.loads(line[6:])
                    task_id = data.get("task_id")
                    if kind == "status":
                        statuses += 1
                        if statuses == len(ids):  # following all of them: let the blocker finish
                            (data_dir / "input" / gate).write_text("open")
                    elif kind == "execution_start":
                        stamp = data["data"]["timestamp"]
                        seen_start[task_id] = stamp
                        starts.append(now_ms - stamp)
                    elif kind == "executing" and task_id in seen_start and task_id in pending:
                        executing.append(now_ms - seen_start[task_id])
                        pending.discard(task_id)
                    elif kind == "result":
                        pending.discard(task_id)
    return starts, executing


async def direct_figures(instance: str, tasks: int) -> tuple[list[float], list[float]]:
    """The baseline: the same stamps read straight off the instance's own ``/ws`` (no worker, store, front)."""
    import aiohttp

    starts: list[float] = []
    executing: list[float] = []
    async with aiohttp.ClientSession(headers=AUTH) as session:
        async with session.ws_connect(f"{instance}/ws?clientId=bench-direct") as ws:
            for _ in range(tasks):
                resp = await session.post(f"{instance}/prompt", json={"prompt": tiny(random.randrange(2**24), "d"),
                                                                       "client_id": "bench-direct"})
                prompt_id = (await resp.json())["prompt_id"]
                stamp = None
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue
                    now_ms = time.time() * 1000
                    event = json.loads(msg.data)
                    data = event.get("data") or {}
                    if data.get("prompt_id") != prompt_id:
                        continue
                    if event["type"] == "execution_start":
                        stamp = data["timestamp"]
                        starts.append(now_ms - stamp)
                    elif event["type"] == "executing" and stamp is not None:
                        executing.append(now_ms - stamp)
                        break
                async for msg in ws:  # to the end of this prompt
                    if msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data)["type"] in (
                            "execution_success", "execution_error"):
                        break
    return starts, executing


def line(name: str, values: list[float]) -> str:
    return f"{name}: p50 {statistics.median(values):.2f} ms, p99 {pct(values, 0.99):.2f} ms (n={len(values)})"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inline-tasks", type=int, default=40)
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--status-calls", type=int, default=2000)
    parser.add_argument("--event-tasks", type=int, default=100)
    parser.add_argument("--skip", default="", help="comma-separated figures not to measure: inline,status,events")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    logging.basicConfig(level=logging.WARNING)
    print(f"cpus: {os.cpu_count()}  load: {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="comfyserve-bench-tasks-") as tmp:
        work = Path(tmp)
        children = Children(work)
        try:
            redis_port = free_port()
            children.start("redis", ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no",
                                     "--dir", str(work)])
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
            data_dir = work / "data"
            init_data_dir(data_dir)
            image = noise_png()
            (data_dir / "input" / "bench_ref.png").write_bytes(image)
            shutil.copyfile(GATE_NODE, data_dir / "custom_nodes" / "test_gate.py")
            ports = {name: free_port() for name in ("instance", "a", "b", "c")}
            instance = children.comfyserve("instance", ["standard", "--data-dir", str(data_dir), "--token", TOKEN],
                                           ports["instance"])
            common = ["--token", TOKEN, "--redis-url", redis_url, "--data-dir", str(data_dir), "--max-length",
                      str(args.queued + 1000)]
            url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
            await children.ready(url["instance"], instance)
            procs = {
                "a": children.comfyserve("front-a", ["api", *common, "--service", SERVICE, "--instance-url",
                                                     url["instance"]], ports["a"]),
                "b": children.comfyserve("front-b", ["api", *common, "--service", SERVICE, "--instances", "0"],
                                         ports["b"]),
                "c": children.comfyserve("front-c", ["api", *common, "--service", STATUS_SERVICE, "--instances",
                                                     "0"], ports["c"]),
            }
            for name, proc in procs.items():
                await children.ready(url[name], proc)
            if "inline" not in skip:
                inline = await inline_figures(url["a"], f"127.0.0.1:{ports['a']}", url["instance"], image,
                                              args.inline_tasks)
                reference = statistics.median(inline["in data dir"])
                print(f"1 MB image ({len(image)} bytes) on front A, api_prompt -> sink result minus execution:")
                for kind, values in inline.items():
                    extra = "" if kind == "in data dir" else (
                        f"; extra p50 over it: {statistics.median(values) - reference:+.1f} ms (goal < 15 ms), "
                        f"p50 ratio to it: {statistics.median(values) / reference:.2f}x")
                    print("  " + line(kind, values) + extra, flush=True)
            if "status" not in skip:
                status = await status_figures(url["c"], args.queued, args.status_calls)
                print(f"GET /api_task with {args.queued} tasks queued (Redis, front without workers):", flush=True)
                for name in ("api_task", "healthz", "queue_count"):
                    print("  " + line(name, status[name]))
                p99 = pct(status["api_task"], 0.99)
                print(f"  ratio p99 api_task / healthz: {p99 / pct(status['healthz'], 0.99):.2f}x, "
                      f"/ queue _count_: {p99 / pct(status['queue_count'], 0.99):.2f}x (goal p99 < 5 ms)", flush=True)
            if "events" in skip:
                return
            starts, executing = await direct_figures(url["instance"], args.event_tasks)
            print("baseline: the instance's own /ws, straight to this client (instance stamp -> client receipt):")
            print("  " + line("execution_start", starts))
            print("  " + line("first executing (upper bound)", executing), flush=True)
            base_p99 = pct(executing, 0.99)
            for name, where in (("b", "front B, tasks run by front A's worker"), ("a", "front A, its own worker")):
                starts, executing = await event_figures(url["a"], url[name], data_dir, args.event_tasks)
                print(f"GET /api_events on {where} (instance stamp -> client receipt):")
                print("  " + line("execution_start", starts))
                print("  " + line("first executing (upper bound)", executing) + " (goal p99 < 20 ms); "
                      f"p99 ratio to the baseline: {pct(executing, 0.99) / max(base_p99, 0.5):.1f}x", flush=True)
        finally:
            children.stop()


if __name__ == "__main__":
    from standard.cli import use_event_loop

    print(f"event loop: {use_event_loop('auto')} (as comfyserve's default)")
    asyncio.run(main())
