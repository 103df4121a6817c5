"""Cluster edition figures: scheduling makespan and fairness, event relay latency, idle socket memory.

Starts the real proxy (``python -m cluster_proxy --instances N``, which spawns N
embedded-engine instances) on a fresh data dir with two test plugins
(``TestSleep``: a node of known length; ``BenchTick``: progress events whose
value is the instance's ``time.time()`` when it sent them), then:

* makespan: U users x T tasks of S seconds each, all queued at once, on 2 and
  on 4 instances: makespan vs the ideal U*T*S/N (goal within 2%; when N does
  not divide U*T, whole tasks need ceil(U*T/N)*S, also shown), the spread of
  the users' completion times (max/min, 1.0 = all users finish together), and
  how busy the instances were (idle ms per task = the proxy's hand-over cost);
* relay latency: R users connected on /ws; a few of them run BenchTick tasks;
  the time from the instance sending each progress event to the owning user's
  socket receiving it through the proxy, p50/p99 (goal p99 < 10 ms);
* memory: the proxy's RSS before and after W idle logged-in WebSockets.

    .venv/bin/python bench/cluster.py [--users 3] [--tasks 10] [--task-s 1.0] [--relay-users 200] [--idle-ws 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path[0] = str(REPO)  # not bench/ (its queue.py would shadow the stdlib's)

from cluster_proxy.accounts import Accounts  # noqa: E402
from standard.datadir import init_data_dir  # noqa: E402
from standard.ports import free_port  # noqa: E402

SLEEP_NODE = REPO / "tests" / "custom_nodes" / "sleep_node.py"  # TestSleep: the tests' own sleep node
PLUGIN = '''
"""Bench plugin: BenchTick (TestSleep comes from the tests' sleep_node.py, copied beside it)."""
import time

import comfy.utils


class BenchTick:
    """``ticks`` progress events, ``interval_s`` apart; each value is time.time() at sending."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "ticks": ("INT", {"default": 50, "min": 1, "max": 100000}),
                             "interval_s": ("FLOAT", {"default": 0.01, "min": 0.0, "max": 10.0})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "tick"
    CATEGORY = "testing"

    def tick(self, image, ticks, interval_s):
        bar = comfy.utils.ProgressBar(10 ** 10)
        for _ in range(ticks):
            bar.update_absolute(time.time())
            time.sleep(interval_s)
        return (image,)


NODE_CLASS_MAPPINGS = {"BenchTick": BenchTick}
'''
PASSWORD = "bench password"
ADMIN = "bench-admin"


def sleep_graph(color: int, seconds: float) -> dict[str, Any]:
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color}},
            "2": {"class_type": "TestSleep", "inputs": {"image": ["1", 0], "seconds": seconds}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bench"}}}


def tick_graph(color: int, ticks: int, interval_s: float) -> dict[str, Any]:
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color}},
            "2": {"class_type": "BenchTick", "inputs": {"image": ["1", 0], "ticks": ticks, "interval_s": interval_s}},
            "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}


async def make_users(data_dir: Path, names: list[str]) -> dict[str, str]:
    """The users' API tokens by name, and under ``ADMIN`` an admin's (only admins see /cluster/instances)."""
    accounts = await Accounts.open(init_data_dir(data_dir), None)
    try:
        tokens: dict[str, str] = {ADMIN: await accounts.add(ADMIN, PASSWORD, admin=True)}
        for start in range(0, len(names), 16):
            chunk = names[start:start + 16]
            for name, token in zip(chunk, await asyncio.gather(*(accounts.add(n, PASSWORD) for n in chunk))):
                tokens[name] = token
        return tokens
    finally:
        await accounts.aclose()


class Proxy:
    def __init__(self, data_dir: Path, instances: int, extra_args: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(data_dir / f"proxy-{instances}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cluster_proxy", "--data-dir", str(data_dir), "--port", str(self.port),
             "--instances", str(instances), *extra_args],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        self.instances = instances

    async def wait_ready(self, session: aiohttp.ClientSession, token: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                async with session.get(self.url + "/cluster/instances",
                                       headers={"Authorization": f"Bearer {token}"}) as response:
                    if response.status == 200:
                        states = [i["state"] for i in (await response.json())["instances"]]
                        if states.count("up") == self.instances:
                            return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError("the proxy's pool never came up")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def makespan(data_dir: Path, tokens: dict[str, str], users: list[str], instances: int,
                   tasks: int, task_s: float) -> None:
    proxy = Proxy(data_dir, instances)
    try:
        async with aiohttp.ClientSession() as session:
            await proxy.wait_ready(session, tokens[ADMIN])
            headers = {u: {"Authorization": f"Bearer {tokens[u]}"} for u in users}
            # Warm each instance once (first execution imports the engine's nodes).
            await _run_all(session, proxy, headers, users[:1], instances, 0.0, color_base=10_000 * instances)
            started = time.time()
            finished = await _run_all(session, proxy, headers, users, tasks, task_s, color_base=instances)
            ended = max(finished.values())
            busy_s = 0.0
            for user in users:
                async with session.get(proxy.url + "/jobs?status=completed", headers=headers[user]) as response:
                    for job in (await response.json())["jobs"]:
                        if job.get("create_time", 0) / 1000 >= started - 1:
                            busy_s += (job["execution_end_time"] - job["execution_start_time"]) / 1000
        total = ended - started
        ideal = len(users) * tasks * task_s / instances
        whole = -(-len(users) * tasks // instances) * task_s  # whole tasks: ceil(n / N) rounds
        per_user = [finished[u] - started for u in users]
        print(f"makespan {len(users)} users x {tasks} tasks x {task_s:.2f} s on {instances} instances: "
              f"{total:.2f} s, ideal {ideal:.2f} s, +{(total / ideal - 1) * 100:.2f}% "
              f"(goal within 2%; vs whole-task ideal {whole:.2f} s: +{(total / whole - 1) * 100:.2f}%); "
              f"per-user completion {', '.join(f'{t:.2f}' for t in per_user)} s, "
              f"spread max/min {max(per_user) / min(per_user):.3f}; instances busy "
              f"{busy_s / (instances * total) * 100:.1f}% of the makespan, "
              f"{(instances * total - busy_s) / (len(users) * tasks) * 1000:.0f} ms idle per task")
    finally:
        proxy.stop()


async def _run_all(session: aiohttp.ClientSession, proxy: Proxy, headers: dict[str, dict[str, str]],
                   users: list[str], tasks: int, task_s: float, color_base: int) -> dict[str, float]:
    """Queue every task, wait for all; returns each user's completion time (time.time())."""
    ids: dict[str, list[str]] = {u: [] for u in users}
    for index in range(tasks):  # interleaved, as users clicking at the same moment
        for number, user in enumerate(users):
            graph = sleep_graph((color_base * 1000 + number * 100 + index) % 0xFFFFFF, task_s)
            async with session.post(proxy.url + "/prompt", json={"prompt": graph}, headers=headers[user]) as r:
                body = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"/prompt refused the benchmark's graph: {body}")
                ids[user].append(body["prompt_id"])
    finished: dict[str, float] = {}
    while len(finished) < len(users):
        await asyncio.sleep(0.02)
        for user in users:
            if user in finished:
                continue
            async with session.get(proxy.url + "/history", headers=headers[user]) as response:
                history = await response.json()
            if all(pid in history for pid in ids[user]):
                finished[user] = time.time()
    return finished


async def relay_latency(data_dir: Path, tokens: dict[str, str], users: list[str], runners: int,
                        ticks: int) -> None:
    proxy = Proxy(data_dir, 2)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await proxy.wait_ready(session, tokens[ADMIN])
            latencies: list[float] = []
            sockets = {}
            for user in users:
                ws = await session.ws_connect(f"{proxy.url}/ws?clientId={user}-tab",
                                              headers={"Authorization": f"Bearer {tokens[user]}"})
                await ws.receive()
                sockets[user] = ws
            for round_index in range(3):
                active = users[round_index * runners:(round_index + 1) * runners]
                readers = [asyncio.create_task(_read_ticks(sockets[u], latencies, ticks)) for u in active]
                for number, user in enumerate(active):
                    graph = tick_graph(round_index * 1000 + number, ticks, 0.01)
                    async with session.post(proxy.url + "/prompt", json={"prompt": graph, "client_id": f"{user}-tab"},
                                            headers={"Authorization": f"Bearer {tokens[user]}"}) as response:
                        assert response.status == 200, await response.text()
                await asyncio.gather(*readers)
            for ws in sockets.values():
                await ws.close()
        p50, p99 = _percentiles(latencies)
        print(f"relay latency instance -> proxy -> user, {len(users)} users connected, {len(latencies)} events: "
              f"p50 {p50:.2f} ms, p99 {p99:.2f} ms (goal p99 < 10 ms)")
    finally:
        proxy.stop()
    await direct_latency(data_dir, runners * 3, ticks)


def _percentiles(latencies: list[float]) -> tuple[float, float]:
    latencies = sorted(latencies)
    return statistics.median(latencies) * 1000, latencies[max(int(len(latencies) * 0.99) - 1, 0)] * 1000


async def direct_latency(data_dir: Path, tasks: int, ticks: int) -> None:
    """The same events straight from an instance (no proxy): what the instance itself takes."""
    port = free_port()
    with open(data_dir / "direct.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "standard", "--data-dir", str(data_dir), "--port", str(port),
                                 "--token", "bench"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        url, headers = f"http://127.0.0.1:{port}", {"Authorization": "bench"}
        try:
            async with aiohttp.ClientSession() as session:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        async with session.get(url + "/readyz", headers=headers) as response:
                            if response.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    assert time.monotonic() < deadline, "the instance never became ready"
                    await asyncio.sleep(0.1)
                latencies: list[float] = []
                ws = await session.ws_connect(f"{url}/ws?clientId=direct", headers=headers)
                await ws.receive()
                for index in range(tasks):
                    reader = asyncio.create_task(_read_ticks(ws, latencies, ticks))
                    graph = tick_graph(50_000 + index, ticks, 0.01)
                    async with session.post(url + "/prompt", json={"prompt": graph, "client_id": "direct"},
                                            headers=headers) as response:
                        assert response.status == 200, await response.text()
                    await reader
                await ws.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    p50, p99 = _percentiles(latencies)
    print(f"same events straight from an instance (no proxy), {len(latencies)} events: "
          f"p50 {p50:.2f} ms, p99 {p99:.2f} ms")


async def _read_ticks(ws: aiohttp.ClientWebSocketResponse, latencies: list[float], ticks: int) -> None:
    seen = 0
    while seen < ticks:
        msg = await ws.receive(timeout=120)
        if msg.type != aiohttp.WSMsgType.TEXT:
            continue
        now = time.time()
        event = msg.json()
        if event["type"] == "progress" and event["data"]["max"] == 10 ** 10:
            latencies.append(now - event["data"]["value"])
            if os.environ.get("BENCH_DEBUG") and latencies[-1] > 0.02:
                print(f"slow event {seen}: {latencies[-1] * 1000:.1f} ms", flush=True)
            seen += 1


async def idle_memory(data_dir: Path, tokens: dict[str, str], users: list[str], count: int) -> None:
    proxy = Proxy(data_dir, 1)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await proxy.wait_ready(session, tokens[ADMIN])
            await asyncio.sleep(1.0)
            before = proxy.rss_mb()
            sockets = []
            for index in range(count):
                user = users[index % len(users)]
                ws = await session.ws_connect(f"{proxy.url}/ws?clientId=idle-{index}",
                                              headers={"Authorization": f"Bearer {tokens[user]}"})
                await ws.receive()
                sockets.append(ws)
            await asyncio.sleep(2.0)
            after = proxy.rss_mb()
            for ws in sockets:
                await ws.close()
        print(f"proxy memory: {before:.1f} MB idle, {after:.1f} MB with {count} idle logged-in sockets "
              f"(+{(after - before) * 1024 / count:.1f} KB per socket)")
    finally:
        proxy.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--task-s", type=float, default=1.0)
    parser.add_argument("--instances", default="2,4")
    parser.add_argument("--relay-users", type=int, default=200)
    parser.add_argument("--relay-runners", type=int, default=4)
    parser.add_argument("--ticks", type=int, default=100)
    parser.add_argument("--idle-ws", type=int, default=1000)
    parser.add_argument("--skip", default="", help="comma list of makespan,relay,memory to skip")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 8192)), hard))
    skip = set(args.skip.split(","))
    with tempfile.TemporaryDirectory(prefix="comfyserve-bench-cluster-") as tmp:
        data_dir = Path(tmp) / "data"
        init_data_dir(data_dir)
        (data_dir / "custom_nodes" / "bench_nodes.py").write_text(PLUGIN)
        shutil.copyfile(SLEEP_NODE, data_dir / "custom_nodes" / "sleep_node.py")
        names = [f"user{i:03}" for i in range(max(args.users, args.relay_users, 1))]
        tokens = await make_users(data_dir, names)
        print(f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")
        if "makespan" not in skip:
            for instances in [int(n) for n in args.instances.split(",")]:
                await makespan(data_dir, tokens, names[:args.users], instances, args.tasks, args.task_s)
        if "relay" not in skip:
            await relay_latency(data_dir, tokens, names[:args.relay_users], args.relay_runners, args.ticks)
        if "memory" not in skip:
            await idle_memory(data_dir, tokens, names[:args.relay_users], args.idle_ws)
        print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
