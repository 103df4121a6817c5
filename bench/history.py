"""What the durable queue and history cost (standard.state_store): restart time and /prompt write cost.

* restart: ``python -m standard`` started on an empty state file and on one
  holding 1,000 history entries and 100 queued prompts, alternately
  (``--rounds`` each); the time from spawn to ``/readyz`` 200, median of each,
  and the difference (goal < 1 s). The last full start then runs its 100
  prompts: every stored entry and every queued prompt must be in ``/history``
  (nothing lost).
* write cost: two embedded instances in this process, one with a state file
  and one in memory only, given sequential ``POST /prompt`` round trips,
  interleaved; p50/p99 of each and the p99 the state file adds (goal < 1 ms),
  and the ratio durable/in-memory.

    .venv/bin/python -m bench.history [--rounds 3] [--requests 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.support import pct
from standard.ports import free_port

HISTORY_ENTRIES = 1000
QUEUED_PROMPTS = 100


def graph(index: int) -> dict:
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                          "color": index % 0xFFFFFF}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": f"bench{index}"}}}


def fill(state_file: Path) -> None:
    """1,000 finished entries shaped as the engine writes them, and 100 queued prompts."""
    from standard.state_store import StateStore

    store = StateStore.open(state_file, history_max_items=10000)
    now = int(time.time() * 1000)
    for index in range(HISTORY_ENTRIES):
        prompt_id = f"old-{index:04d}"
        entry = {
            "prompt": [index, prompt_id, graph(index), {"client_id": "bench", "create_time": now}, ["2"]],
            "outputs": {"2": {"images": [{"filename": f"bench{index}_00001_.png", "subfolder": "",
                                          "type": "output"}]}},
            "status": {"status_str": "success", "completed": True, "messages": [
                ["execution_start", {"prompt_id": prompt_id, "timestamp": now}],
                ["execution_cached", {"nodes": [], "prompt_id": prompt_id, "timestamp": now}],
                ["execution_success", {"prompt_id": prompt_id, "timestamp": now}]]},
            "meta": {"2": {"node_id": "2", "display_node": "2", "parent_node": None, "real_node_id": "2"}},
        }
        store.finish(prompt_id, entry, (now, now))
    for index in range(QUEUED_PROMPTS):
        number = HISTORY_ENTRIES + index
        store.add_prompt(f"queued-{index:03d}", number, {
            "prompt": graph(number), "extra_data": {"client_id": "bench"}, "outputs_to_execute": ["2"],
            "sensitive": {}})
    store.close()


def start(data_dir: Path, state_dir: Path, port: int, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYSERVE_")}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "standard", "--data-dir", str(data_dir), "--port", str(port),
                                 "--state-dir", str(state_dir)], stdout=out, stderr=subprocess.STDOUT, env=env)


def time_to_ready(proc: subprocess.Popen, port: int, started: float) -> float:
    import httpx

    with httpx.Client(trust_env=False, timeout=5) as http:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the instance exited with {proc.returncode}")
            try:
                if http.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            time.sleep(0.005)


def all_ran(port: int) -> tuple[int, int]:
    """(history entries found, queued prompts finished) once the queue is empty."""
    import httpx

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=30) as http:
        deadline = time.monotonic() + 120
        while http.get("/prompt").json()["exec_info"]["queue_remaining"] and time.monotonic() < deadline:
            time.sleep(0.05)
        history = http.get("/history").json()
    old = sum(1 for key in history if key.startswith("old-"))
    ran = sum(1 for key, entry in history.items() if key.startswith("queued-") and entry["status"]["completed"])
    return old, ran


def restart_figures(rounds: int, workdir: Path) -> dict[str, float]:
    empty, full = [], []
    found = (0, 0)
    for round_index in range(rounds):
        for kind in ("empty", "full"):
            data_dir, state_dir = workdir / f"{kind}-{round_index}", workdir / f"{kind}-{round_index}-state"
            port = free_port()
            if kind == "full":
                fill(state_dir / f"standard-{port}.sqlite3")
            started = time.perf_counter()
            proc = start(data_dir, state_dir, port, workdir / "instances.log")
            try:
                elapsed = time_to_ready(proc, port, started)
                (full if kind == "full" else empty).append(elapsed)
                if kind == "full" and round_index == rounds - 1:
                    found = all_ran(port)
            finally:
                proc.kill()
                proc.wait()
    return {"empty_s": statistics.median(empty), "full_s": statistics.median(full),
            "added_s": statistics.median(full) - statistics.median(empty),
            "history_kept": found[0], "queued_ran": found[1]}


async def write_figures(requests: int, workdir: Path) -> dict[str, float]:
    from standard.datadir import init_data_dir
    from standard.server.app import create_embedded_app
    from standard.settings import StandardSettings

    runners, urls = [], {}
    for kind, state_file in (("memory", None), ("durable", workdir / "w-state" / "standard-1.sqlite3")):
        settings = StandardSettings(data_dir=init_data_dir(workdir / f"w-{kind}").root, state_file=state_file)
        runner = web.AppRunner(create_embedded_app(settings), access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        urls[kind] = f"http://127.0.0.1:{port}/prompt"
    times: dict[str, list[float]] = {"memory": [], "durable": []}
    body = {"prompt": graph(0)}  # the same graph: cached after the first run, so the worker costs little
    try:
        async with aiohttp.ClientSession() as session:
            for kind, url in urls.items():  # warm up: engine loaded, connections open
                for _ in range(20):
                    async with session.post(url, json=body) as resp:
                        assert resp.status == 200, await resp.text()
            for index in range(requests * 2):
                kind = ("memory", "durable")[index % 2]
                started = time.perf_counter()
                async with session.post(urls[kind], json=body) as resp:
                    await resp.read()
                times[kind].append(time.perf_counter() - started)
                assert resp.status == 200
    finally:
        for runner in runners:
            await runner.cleanup()
    figures = {f"{kind}_{name}_ms": pct(values, q) * 1000 for kind, values in times.items()
               for name, q in (("p50", 0.5), ("p99", 0.99))}
    figures["added_p50_ms"] = figures["durable_p50_ms"] - figures["memory_p50_ms"]
    figures["added_p99_ms"] = figures["durable_p99_ms"] - figures["memory_p99_ms"]
    figures["ratio_p50"] = figures["durable_p50_ms"] / figures["memory_p50_ms"]
    return figures


def put_figures(workdir: Path, count: int = 10000) -> dict[str, float]:
    """What a prompt's write costs the event loop itself: ``PromptQueue.put`` with a state store and without."""
    from standard.server.prompt_queue import PromptQueue, QueueItem
    from standard.state_store import StateStore

    async def measure(store: StateStore | None) -> list[float]:
        queue = PromptQueue(history_max_items=10000, store=store)
        spent = []
        for index in range(count):
            item = QueueItem(index, f"p{index}", graph(index), {"client_id": "bench"}, ["2"])
            started = time.perf_counter()
            queue.put(item)
            spent.append(time.perf_counter() - started)
            if index % 100 == 99:
                await queue.flush()  # as a server would: the writer keeps up between requests
        return spent

    store = StateStore.open(workdir / "put-state" / "standard-1.sqlite3", history_max_items=10000)
    try:
        durable = asyncio.run(measure(store))
    finally:
        store.close()
    memory = asyncio.run(measure(None))
    return {f"{kind}_{name}_us": pct(values, q) * 1e6 for kind, values in (("memory", memory), ("durable", durable))
            for name, q in (("p50", 0.5), ("p99", 0.99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--only", choices=("restart", "write"), default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-history-") as tmp:
        workdir = Path(tmp)
        if args.only != "write":
            print_restart(restart_figures(args.rounds, workdir))
        if args.only != "restart":
            put = put_figures(workdir)
            print(f"on the event loop, per prompt (PromptQueue.put): in memory p50 {put['memory_p50_us']:.1f} us "
                  f"p99 {put['memory_p99_us']:.1f} us; with the state file p50 {put['durable_p50_us']:.1f} us "
                  f"p99 {put['durable_p99_us']:.1f} us")
            print_write(asyncio.run(write_figures(args.requests, workdir)), args.requests)
        print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} cores)")


def print_restart(restart: dict[str, float]) -> None:
    print(f"restart to ready: empty {restart['empty_s']:.3f} s, with {HISTORY_ENTRIES} history entries + "
          f"{QUEUED_PROMPTS} queued prompts {restart['full_s']:.3f} s: +{restart['added_s']:.3f} s (goal < 1 s)")
    print(f"nothing lost: {restart['history_kept']}/{HISTORY_ENTRIES} history entries served, "
          f"{restart['queued_ran']}/{QUEUED_PROMPTS} queued prompts ran after the restart")


def print_write(write: dict[str, float], requests: int) -> None:
    print(f"POST /prompt, {requests} each, interleaved: in memory p50 {write['memory_p50_ms']:.3f} ms "
          f"p99 {write['memory_p99_ms']:.3f} ms; durable p50 {write['durable_p50_ms']:.3f} ms "
          f"p99 {write['durable_p99_ms']:.3f} ms")
    print(f"added by the state file: p50 {write['added_p50_ms']:+.3f} ms, p99 {write['added_p99_ms']:+.3f} ms "
          f"(goal < 1 ms); ratio durable/in-memory p50 {write['ratio_p50']:.2f}")


if __name__ == "__main__":
    main()
