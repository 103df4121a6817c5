"""Simulated-GPU figures (issue 16): idle gap between tasks, model loads, makespan, GPU-busy fraction.

Each instance runs the plugin nodes of ``bench/gpu_sim_nodes.py`` (a
checkpoint load costs ``--load-s`` unless that checkpoint is the one the
instance holds; sampling costs ``--steps`` x ``--step-s``; every task's start
and end are recorded with microsecond timestamps per instance process). The
workload: ``--clients`` clients each put ``--tasks`` tasks at once, the
``--checkpoints`` checkpoints in equal shares in a random order (``--seed``).
Modes (``--mode``, default all three):

* ``direct``: the floor of the gap, N standalone instances (``comfyserve
  standard``), the tasks queued on them in turn, at once: each instance's own
  queue hands it the next task, no dispatcher in between (and no choice of
  instance: loads and makespan are those of a blind round robin). Each
  instance keeps its state file, as a standalone one does, while the API and
  cluster editions start theirs with ``--no-state-file``: the state file's
  commit and the history entry's JSON between two prompts, on the execution
  thread, add ~0.3 ms of CPU to each gap (more on a loaded machine), so
  ``--server-arg=--no-state-file`` gives the floor comparable with theirs;
* ``api``: the all-in-one API edition, ``comfyserve api --instances N``; each
  client puts its tasks through ``/api_prompt``; every result is read from
  the sink (each task must have exactly one result, a success);
* ``cluster``: the cluster edition, ``comfyserve cluster --instances N``; each
  client is a user putting its tasks through ``/prompt``; every task must be
  in its user's ``/history`` as a success.

Every instance first runs one warm-up task (not counted), so all are up and
none holds a checkpoint of the workload. Printed per mode: idle gap between
back-to-back tasks on an instance (the next task was already accepted when
the previous one ended) p50 / p99; model loads vs the minimum possible (every
checkpoint once, every instance once); makespan (first submission to last
task end) vs the ideal (all sampling plus the minimum loads, packed on N
instances); GPU-busy fraction; per-client completion spread.

``--server-arg`` (repeatable) passes a flag to the server under test;
``--baseline-arg`` (repeatable) first runs the same workload on a server with
those flags (e.g. the scheduler's FIFO mode) and prints each figure against it.

The issue's setting, 4 instances, 3 checkpoints, load 2 s, 3 clients x 30
tasks of 0.5 s sampling, is ``--load-s 2 --steps 20 --step-s 0.025``; the
defaults are the same shape at a fifth of the cost, so a run of the three
modes takes about a minute:

    .venv/bin/python -m bench.gpu_sim [--mode direct,api,cluster] [--instances 4] [--clients 3] [--tasks 30]
        [--checkpoints 3] [--load-s 0.4] [--steps 10] [--step-s 0.01] [--seed 16]
        [--server-arg=--flag=value ...] [--baseline-arg=--flag=value ...]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Run as a script, bench/ is sys.path[0]: its modules (bench/queue.py) must not shadow the stdlib's.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import httpx  # noqa: E402

from bench.api import Children  # noqa: E402
from bench.cluster import ADMIN, Proxy, make_users  # noqa: E402
from bench.gpu_sim_figures import (  # noqa: E402
    WARMUP_CKPT,
    Costs,
    Figures,
    Task,
    checkpoint_names,
    figures,
    install,
    plan,
    read_records,
    task_graph,
)
from queue_service.client import QueueClient  # noqa: E402
from standard.datadir import init_data_dir  # noqa: E402
from standard.ports import free_port  # noqa: E402

TOKEN = "bench-token"
SERVICE = "bench"
POLL_S = 0.02


def now_us() -> int:
    return time.time_ns() // 1000


Submit = Callable[[Task, Costs], Awaitable[None]]


class Run:
    """One mode's run on one data dir: warm-up, submission, waiting for every task's record."""

    def __init__(self, data_dir: Path, args: argparse.Namespace) -> None:
        self.data_dir = data_dir
        self.args = args
        self.costs = Costs(args.load_s, args.steps, args.step_s)
        self.tasks = plan(args.clients, args.tasks, checkpoint_names(args.checkpoints), args.seed)
        self.accepted_us: dict[str, int] = {}

    def pids(self, labels: set[str]) -> set[int]:
        return {r["pid"] for r in read_records(self.data_dir) if r["label"] in labels}

    async def records_of(self, labels: set[str], deadline: float) -> None:
        while not labels <= {r["label"] for r in read_records(self.data_dir)}:
            if time.monotonic() > deadline:
                raise TimeoutError(f"tasks never ran; see the logs in {self.data_dir.parent}")
            await asyncio.sleep(POLL_S)

    async def warm_up(self, submit: Submit, instances: int) -> None:
        """Warm-up tasks, a round of ``instances`` at a time, until every instance process ran one."""
        deadline = time.monotonic() + self.args.timeout
        warm = Costs(0.0, 10, 0.01)  # long enough that a free instance takes the next one
        labels: set[str] = set()
        for round_index in range(20):
            batch = [Task("warmup", f"warmup-{round_index}-{k}", WARMUP_CKPT) for k in range(instances)]
            await asyncio.gather(*(submit(task, warm) for task in batch))
            labels |= {task.label for task in batch}
            await self.records_of(labels, deadline)
            if len(self.pids(labels)) >= instances:
                return
        raise RuntimeError(f"only {len(self.pids(labels))} of {instances} instances ran a warm-up task")

    async def measure(self, submit: Submit) -> tuple[int, list[float]]:
        """Every client puts its tasks at once (clients in parallel); returns (start us, submit seconds)."""
        by_client: dict[str, list[Task]] = {}
        for task in self.tasks:
            by_client.setdefault(task.client, []).append(task)

        async def client(tasks: list[Task]) -> float:
            for task in tasks:
                await submit(task, self.costs)
                self.accepted_us[task.label] = now_us()
            return (now_us() - start_us) / 1e6

        start_us = now_us()
        submit_s = await asyncio.gather(*(client(tasks) for tasks in by_client.values()))
        await self.records_of({task.label for task in self.tasks}, time.monotonic() + self.args.timeout)
        return start_us, list(submit_s)

    def figures(self, start_us: int) -> Figures:
        return figures(read_records(self.data_dir), self.tasks, self.accepted_us, start_us, self.args.instances)


async def run_api(workdir: Path, args: argparse.Namespace, server_args: list[str]) -> Figures:
    data_dir = init_data_dir(workdir / "data").root
    install(data_dir, checkpoint_names(args.checkpoints))
    run = Run(data_dir, args)
    children = Children(workdir)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    try:
        api = children.start("api", ["api", "--data-dir", str(data_dir), "--instances", str(args.instances),
                                     "--token", TOKEN, "--service", SERVICE, *server_args], port)
        await children.ready(base_url, "/healthz", api)
        async with httpx.AsyncClient(base_url=base_url, trust_env=False, headers={"Authorization": TOKEN},
                                     timeout=60) as http:
            async def submit(task: Task, costs: Costs) -> None:
                resp = await http.post("/api_prompt", params={"task_id": task.label},
                                       content=json.dumps(task_graph(task.ckpt, task.label, costs)))
                resp.raise_for_status()

            await run.warm_up(submit, args.instances)
            start_us, submit_s = await run.measure(submit)
        await check_sink(f"127.0.0.1:{port}", {task.label for task in run.tasks})
    finally:
        children.stop()
    print(f"  (submission took {max(submit_s):.2f} s)", flush=True)
    return run.figures(start_us)


async def check_sink(endpoint: str, labels: set[str], timeout_s: float = 60.0) -> None:
    """Every task has exactly one result on the sink, a success (results of the warm-up are skipped)."""
    results: Counter[str] = Counter()
    failed: list[str] = []
    sink = QueueClient(endpoint, f"{SERVICE}/sink", token=TOKEN)
    try:
        async with asyncio.timeout(timeout_s), sink.watch(window=64, auto_commit=True) as frames:
            async for frame in frames:
                label = frame.tags.get("task_id", "")
                if label in labels:
                    results[label] += 1
                    if frame.tags.get("status") != "success":
                        failed.append(label)
                    if set(results) == labels:
                        break
    except TimeoutError:
        pass
    finally:
        await sink.aclose()
    missing, repeated = labels - set(results), [label for label, n in results.items() if n > 1]
    if missing or repeated or failed:
        raise RuntimeError(f"sink: {len(missing)} tasks without a result, {len(repeated)} with more than one, "
                           f"{len(failed)} failed")


async def run_cluster(workdir: Path, args: argparse.Namespace, server_args: list[str]) -> Figures:
    data_dir = init_data_dir(workdir / "data").root
    install(data_dir, checkpoint_names(args.checkpoints))
    run = Run(data_dir, args)
    users = sorted({task.client for task in run.tasks})
    tokens = await make_users(data_dir, users)
    proxy = Proxy(data_dir, args.instances, extra_args=server_args)
    prompt_ids: dict[str, str] = {}
    try:
        async with aiohttp.ClientSession() as session:
            await proxy.wait_ready(session, tokens[ADMIN])

            async def submit(task: Task, costs: Costs) -> None:
                user = task.client if task.client in tokens else users[0]
                graph = task_graph(task.ckpt, task.label, costs)
                async with session.post(proxy.url + "/prompt", json={"prompt": graph},
                                        headers={"Authorization": f"Bearer {tokens[user]}"}) as response:
                    body = await response.json()
                    if response.status != 200:
                        raise RuntimeError(f"/prompt refused the benchmark's graph: {body}")
                    prompt_ids[task.label] = body["prompt_id"]

            await run.warm_up(submit, args.instances)
            start_us, submit_s = await run.measure(submit)
            await check_histories(session, proxy.url, tokens, run.tasks, prompt_ids)
    finally:
        proxy.stop()
    print(f"  (submission took {max(submit_s):.2f} s)", flush=True)
    return run.figures(start_us)


async def check_histories(session: aiohttp.ClientSession, url: str, tokens: dict[str, str], tasks: list[Task],
                          prompt_ids: dict[str, str], timeout_s: float = 60.0) -> None:
    """Every task is in its user's /history as a success (the record is written just before it ends)."""
    deadline = time.monotonic() + timeout_s
    pending = {task.label: task.client for task in tasks}
    while pending:
        for user in sorted(set(pending.values())):
            async with session.get(url + "/history", headers={"Authorization": f"Bearer {tokens[user]}"}) as resp:
                history = await resp.json()
            for label in [label for label, owner in pending.items() if owner == user]:
                entry = history.get(prompt_ids[label])
                if entry and entry.get("status", {}).get("completed") is not None:
                    if entry["status"].get("status_str") != "success":
                        raise RuntimeError(f"task {label} ended {entry['status'].get('status_str')}")
                    del pending[label]
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"{len(pending)} tasks never reached their user's history")
        if pending:
            await asyncio.sleep(0.1)


async def run_direct(workdir: Path, args: argparse.Namespace, server_args: list[str]) -> Figures:
    """The floor: N standalone instances (``comfyserve standard``) with every task queued on one of them, in
    turn, at once; each instance's own queue hands it the next task (no dispatcher in between)."""
    data_dir = init_data_dir(workdir / "data").root
    install(data_dir, checkpoint_names(args.checkpoints))
    run = Run(data_dir, args)
    children = Children(workdir)
    prompt_ids: dict[str, tuple[str, str]] = {}
    try:
        urls = []
        for k in range(args.instances):
            port = free_port()
            proc = children.start(f"instance{k}", ["standard", "--data-dir", str(data_dir), "--token", TOKEN,
                                                   *server_args], port)
            urls.append((f"http://127.0.0.1:{port}", proc))
        for url, proc in urls:
            await children.ready(url, "/readyz", proc)
        turn = itertools.count()
        async with httpx.AsyncClient(trust_env=False, headers={"Authorization": TOKEN}, timeout=60) as http:
            async def submit(task: Task, costs: Costs) -> None:
                url = urls[next(turn) % len(urls)][0]
                resp = await http.post(url + "/prompt", json={"prompt": task_graph(task.ckpt, task.label, costs)})
                resp.raise_for_status()
                prompt_ids[task.label] = (url, resp.json()["prompt_id"])

            await run.warm_up(submit, args.instances)
            start_us, submit_s = await run.measure(submit)
            for task in run.tasks:
                url, prompt_id = prompt_ids[task.label]
                for _ in range(100):  # the record is written just before the prompt ends
                    entry = (await http.get(f"{url}/history/{prompt_id}")).json().get(prompt_id)
                    if entry:
                        break
                    await asyncio.sleep(0.05)
                if not entry or entry["status"]["status_str"] != "success":
                    raise RuntimeError(f"task {task.label} did not succeed: {entry}")
    finally:
        children.stop()
    print(f"  (submission took {max(submit_s):.2f} s)", flush=True)
    return run.figures(start_us)


MODES = {"direct": run_direct, "api": run_api, "cluster": run_cluster}


def run_dir(root: str, name: str) -> Path:
    """``root/name`` for one run, made new (``root``, a ``--keep`` folder, too if it is missing): a run never
    mixes its records into an earlier run's."""
    path = Path(root) / name
    path.mkdir(parents=True)
    return path


def compare(base: Figures, new: Figures) -> list[str]:
    """The figures against the baseline run's."""
    return [
        f"makespan vs baseline: {base.makespan_s / new.makespan_s:.2f}x faster ({base.makespan_s:.2f} s -> "
        f"{new.makespan_s:.2f} s; goal >= 1.5x)",
        f"model loads vs baseline: {base.loads} -> {new.loads}; GPU busy {base.busy_fraction * 100:.1f}% -> "
        f"{new.busy_fraction * 100:.1f}%",
    ]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="direct,api,cluster", help="comma list of direct, api, cluster")
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--clients", type=int, default=3, help="clients (users in the cluster)")
    parser.add_argument("--tasks", type=int, default=30, help="tasks per client")
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--load-s", type=float, default=0.4, help="seconds to load a checkpoint not in VRAM")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps per task")
    parser.add_argument("--step-s", type=float, default=0.01, help="seconds per sampling step")
    parser.add_argument("--seed", type=int, default=16, help="seed of the tasks' model order")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a run may take")
    parser.add_argument("--keep", default=None, metavar="DIR",
                        help="work in DIR (data dirs, logs; made if missing) and keep it, not a temporary folder")
    parser.add_argument("--server-arg", action="append", default=[], help="flag for the server under test")
    parser.add_argument("--baseline-arg", action="append", default=None,
                        help="run a baseline first, with this flag (repeatable)")
    args = parser.parse_args()
    modes = [m for m in args.mode.split(",") if m]
    if unknown := [m for m in modes if m not in MODES]:
        parser.error(f"unknown mode(s): {', '.join(unknown)}")
    print(f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}; {args.instances} instances, {args.clients} "
          f"clients x {args.tasks} tasks, {args.checkpoints} checkpoints (load {args.load_s} s), sampling "
          f"{args.steps} x {args.step_s} s, seed {args.seed}", flush=True)
    with tempfile.TemporaryDirectory(prefix="comfyserve-bench-gpu-sim-") as scratch:
        tmp = args.keep or scratch
        for mode in modes:
            baseline = None
            if args.baseline_arg is not None:
                print(f"{mode}, baseline ({' '.join(args.baseline_arg)}):", flush=True)
                baseline = await MODES[mode](run_dir(tmp, f"{mode}-baseline"), args, args.baseline_arg)
                print("\n".join(f"  {line}" for line in baseline.lines(goals=False)), flush=True)
            print(f"{mode}{' (' + ' '.join(args.server_arg) + ')' if args.server_arg else ''}:", flush=True)
            result = await MODES[mode](run_dir(tmp, mode), args, args.server_arg)
            print("\n".join(f"  {line}" for line in result.lines(goals=mode != "direct")), flush=True)
            if baseline is not None:
                print("\n".join(f"  {line}" for line in compare(baseline, result)), flush=True)
    print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    asyncio.run(main())
