"""Chaos: the all-in-one (queue, front, local instances, workers) killed with tasks in flight and restarted.

The restarted workers are the same consumers of the input queue as before (their ids come from the
deployment and the worker's slot, not from the new ports of the new instances), so they take their
predecessors' pending items back at once instead of waiting out ``--pending-timeout``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from api_edition.app import running
from api_edition.settings import ApiSettings
from queue_service.client import QueueClient
from standard.datadir import init_data_dir
from standard.ports import free_port
from support.api import SERVICE, TOKEN, Procs, read_results, results_final, submit
from support.processes import alive, children_of, wait_for_port
from support.server import gated_graph, install_gate_plugin, runs_of, tiny_graph
from support.wait import until

PENDING_TIMEOUT_S = 60.0
# Half of --pending-timeout, so the items cannot have come back through its expiry. Measured on 2 cores: 1.5-3.5 s
# on a quiet machine, the processes' start-up (Python imports, the engine) being most of it; 7-10 s under load 14.
BACK_WITHIN_S = PENDING_TIMEOUT_S / 2

def descendants(pid: int) -> list[int]:
    found = []
    for child in children_of(pid):
        found += [child, *descendants(child)]
    return found


async def kill_everything(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the all-in-one and every process under it at once, as the OOM killer or a power cut would:
    no drain, no goodbye on the watch sockets, the instances' prompts cut mid-run."""
    doomed = [*descendants(proc.pid), proc.pid]
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):  # one that had just ended by itself
            os.kill(pid, signal.SIGKILL)
    proc.wait(10)
    await until(lambda: not any(alive(pid) for pid in doomed), timeout_s=10, what="every killed process gone")


@pytest.mark.parametrize("store", ["sqlite", "redis"])
@pytest.mark.timeout(180)
async def test_in_flight_tasks_run_again_at_once_after_the_all_in_one_is_killed(
        procs: Procs, tmp_path: Path, store: str, request: pytest.FixtureRequest) -> None:
    data_dir = tmp_path / "data"
    init_data_dir(data_dir)
    install_gate_plugin(data_dir)
    port = free_port()
    # --prefetch 0: the two gated tasks must run at once, one per instance; with a task queued ahead, the
    # worker whose instance is up first could take both (the other's watch opens once its instance is up).
    args = ["api", "--data-dir", str(data_dir), "--port", str(port), "--token", TOKEN, "--service", SERVICE,
            "--instances", "2", "--pending-timeout", str(PENDING_TIMEOUT_S), "--prefetch", "0"]
    if store == "redis":
        args += ["--redis-url", request.getfixturevalue("redis_url")]
    base = f"http://127.0.0.1:{port}"
    gates = ["inflight0", "inflight1"]
    try:
        first = procs.start("api-first", *args)
        wait_for_port(port, timeout_s=30, proc=first)
        for gate in gates:
            await submit(base, gated_graph(gate, gate, count_runs=True, timeout_s=180), gate)
        await submit(base, tiny_graph("queued"), "queued")  # waits behind the two in flight
        await until(lambda: all(runs_of(data_dir, gate) == 1 for gate in gates), timeout_s=60,
                    what="both gated tasks running, one on each instance")
        await kill_everything(first)

        restarted_at = time.monotonic()
        second = procs.start("api-second", *args)
        await until(lambda: all(runs_of(data_dir, gate) == 2 for gate in gates), timeout_s=BACK_WITHIN_S,
                    what="the in-flight tasks running again")
        back_after_s = time.monotonic() - restarted_at
        print(f"in-flight tasks running again {back_after_s:.2f}s after the restart ({store})")
        for gate in gates:
            (data_dir / "input" / gate).write_text("open")
        async with QueueClient(base, f"{SERVICE}/sink", token=TOKEN) as sink:
            frames = await read_results(sink, 3, timeout_s=60)
        await results_final(base, 3)  # exactly one result per task
        assert sorted(f.tags["task_id"] for f in frames) == ["inflight0", "inflight1", "queued"], \
            procs.log("api-second")
        assert all(f.tags["status"] == "success" for f in frames), [f.data for f in frames]
        assert all(runs_of(data_dir, gate) == 2 for gate in gates)  # cut once by the kill, run once more
        async with QueueClient(base, SERVICE, token=TOKEN) as queue:
            assert (await queue.attributes())["stream.length"] == "0"  # 0 lost: every input committed
        assert second.poll() is None
    finally:
        for gate in gates:
            (data_dir / "input" / gate).write_text("open")  # no prompt left holding an instance


async def test_worker_ids_follow_the_deployment_and_slot_not_the_instance_port(instance_url: Any,
                                                                               data_dir: Path) -> None:
    """The same data dir, port and slot give the same consumer id whatever port the instance got this time."""
    settings = ApiSettings(port=free_port(), token=TOKEN, service=SERVICE, instances=0, data_dir=data_dir,
                           sqlite_path=data_dir / "queue.sqlite3")
    a, b, c = [await instance_url() for _ in range(3)]
    names = []
    for deployment, urls in ((settings, (a, b)), (settings, (c, a)), (replace(settings, port=free_port()), (b, c))):
        async with running(replace(deployment, instance_urls=urls)) as live:
            assert live.pool is not None
            names.append([worker.name for worker, _ in live.pool.workers])
    assert names[0] == names[1] and len(set(names[0])) == 2  # stable, and two slots are two consumers
    assert not set(names[2]) & set(names[0])  # another all-in-one on this host and data dir: other consumers


async def test_a_standalone_worker_keeps_its_id_across_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    """``comfyserve worker``: by default the id follows the host and --instance-url; --worker-id (or
    COMFYSERVE_WORKER_ID) pins it where either changes across restarts (a new pod, a new instance port)."""
    from api_edition import worker_command
    from api_edition.worker import Worker

    def worker_for(instance_url: str) -> Worker:
        parser = argparse.ArgumentParser()
        worker_command.add_arguments(parser)
        return Worker(worker_command.settings_from_args(parser.parse_args(
            ["--queue-url", "http://127.0.0.1:1", "--instance-url", instance_url])))

    workers = [worker_for("http://127.0.0.1:8000"), worker_for("http://127.0.0.1:8000"),
               worker_for("http://127.0.0.1:8001")]
    monkeypatch.setenv("COMFYSERVE_WORKER_ID", "gpu-7")
    workers += [worker_for("http://127.0.0.1:8002")]
    try:
        assert workers[0].name == workers[1].name != workers[2].name
        assert workers[3].name == "gpu-7"
    finally:
        for worker in workers:
            await worker.aclose()
