"""SIGTERM drains ``comfyserve cluster``: no new prompts; running tasks finish or go back to the
store; queued ones wait there for the next start. Real processes, real signals."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from standard.client import InstanceClient
from standard.datadir import init_data_dir
from standard.ports import free_port
from support.processes import VENV_BIN, wait_for_port
from support.server import drain_gate_graph, install_gate_plugin, open_gate, prompt_uuid, runs_of
from support.wait import until

PASSWORD = "long enough pw"
INSTANCE_TOKEN = "drain-instance-token"


class Proxies:
    """``comfyserve cluster`` processes of one test on one data dir and port; none outlive it."""

    def __init__(self, data_dir: Path, env: dict[str, str], logs: Path) -> None:
        self.data_dir, self.env, self.logs = data_dir, env, logs
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, *extra: str) -> subprocess.Popen:
        """A proxy with one spawned instance, unless ``extra`` names instances."""
        pool = () if "--instance-url" in extra else ("--instances", "1")
        with (self.logs / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen([str(VENV_BIN / "comfyserve"), "cluster", "--data-dir", str(self.data_dir),
                                     "--port", str(self.port), *pool, *extra],
                                    env={**self.env, "COMFYSERVE_INSTANCE_TOKEN": INSTANCE_TOKEN},
                                    stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        wait_for_port(self.port, timeout_s=30, proc=proc)
        return proc

    def instance(self, name: str) -> tuple[subprocess.Popen, str]:
        """An instance of its own (``comfyserve standard`` on the shared data dir)."""
        port = free_port()
        with (self.logs / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen([str(VENV_BIN / "comfyserve"), "standard", "--data-dir", str(self.data_dir),
                                     "--port", str(port)], env={**self.env, "COMFYSERVE_TOKEN": INSTANCE_TOKEN},
                                    stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        wait_for_port(port, timeout_s=30, proc=proc)
        return proc, f"http://127.0.0.1:{port}"

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def add_user(self, name: str) -> str:
        done = subprocess.run([str(VENV_BIN / "comfyserve"), "users", "add", name, "--password", PASSWORD,
                               "--data-dir", str(self.data_dir)], env=self.env, capture_output=True, text=True,
                              timeout=30, check=True)
        return done.stdout.strip().splitlines()[-1]

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def proxies(tmp_path: Path, cli_env: dict[str, str]) -> Iterator[Proxies]:
    data_dir = init_data_dir(tmp_path / "data").root
    install_gate_plugin(data_dir)
    logs = tmp_path / "logs"
    logs.mkdir()
    p = Proxies(data_dir, cli_env, logs)
    yield p
    p.stop_all()


async def exited(proc: subprocess.Popen, timeout_s: float = 30.0) -> int:
    return await asyncio.to_thread(proc.wait, timeout_s)


async def finished(client: InstanceClient, prompt_id: str) -> dict:
    entry: dict = {}

    async def recorded() -> bool:
        entry.update(await client.history_entry(prompt_id) or {})
        return bool(entry)

    await until(recorded, timeout_s=40, what=f"prompt {prompt_id} in the history")
    return entry


def outputs(proxies: Proxies, user: str, prefix: str) -> list[str]:
    return sorted(p.name for p in (proxies.data_dir / "users" / user / "output").glob(f"{prefix}_*"))


async def test_running_task_finishes_queued_task_waits_in_the_store(proxies: Proxies) -> None:
    token = proxies.add_user("ann")
    proxy = proxies.start("proxy1", "--shutdown-timeout", "45")
    async with InstanceClient(proxies.url, token) as ann:
        await ann.submit(drain_gate_graph("g1", "first"), prompt_id=prompt_uuid("first"))
        await until(lambda: runs_of(proxies.data_dir, "g1") == 1, what="the first task starting")
        # one instance: the second waits
        await ann.submit(drain_gate_graph("g2", "second"), prompt_id=prompt_uuid("second"))

        proxy.send_signal(signal.SIGTERM)
        async with httpx.AsyncClient(base_url=proxies.url, headers={"Authorization": token},
                                     trust_env=False) as http:
            async def refused() -> bool:
                resp = await http.post("/prompt", json={"prompt": drain_gate_graph("g3", "late")})
                return resp.status_code == 503 and resp.headers.get("Retry-After", "").isdigit()

            await until(refused, what="POST /prompt answering 503")
            ready = await http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["draining"] is True
        assert proxy.poll() is None
        open_gate(proxies.data_dir, "g1")
        assert await exited(proxy) == 0, proxies.log("proxy1")
    assert outputs(proxies, "ann", "first") == ["first_00001_.png"]
    assert runs_of(proxies.data_dir, "g2") == 0

    open_gate(proxies.data_dir, "g2")
    proxies.start("proxy2")
    async with InstanceClient(proxies.url, token) as ann:
        assert (await finished(ann, prompt_uuid("second")))["status"]["status_str"] == "success"
        assert (await ann.history_entry(prompt_uuid("first")))["status"]["status_str"] == "success"
        assert await ann.history_entry(prompt_uuid("late")) is None
    assert runs_of(proxies.data_dir, "g1") == 1 and runs_of(proxies.data_dir, "g2") == 1


async def test_past_the_timeout_the_running_task_is_handed_back_and_runs_once_more(proxies: Proxies) -> None:
    token = proxies.add_user("ann")
    proxy = proxies.start("proxy1", "--shutdown-timeout", "1")
    async with InstanceClient(proxies.url, token) as ann:
        await ann.submit(drain_gate_graph("g", "cut"), prompt_id=prompt_uuid("cut"))
        await until(lambda: runs_of(proxies.data_dir, "g") == 1, what="the task starting")
        started = time.monotonic()
        proxy.send_signal(signal.SIGTERM)
        assert await exited(proxy) == 0, proxies.log("proxy1")
    assert time.monotonic() - started < 20
    assert "handed back" in proxies.log("proxy1")
    assert outputs(proxies, "ann", "cut") == []

    open_gate(proxies.data_dir, "g")
    proxies.start("proxy2")
    async with InstanceClient(proxies.url, token) as ann:
        entry = await finished(ann, prompt_uuid("cut"))
        assert entry["status"]["status_str"] == "success"
        assert list(await ann.history()) == [prompt_uuid("cut")]
    assert runs_of(proxies.data_dir, "g") == 2
    assert outputs(proxies, "ann", "cut") == ["cut_00001_.png"]


async def test_a_handed_back_task_is_not_a_lost_attempt(proxies: Proxies) -> None:
    """Handed back by one proxy, then its instance dies under the next: it is still retried, not failed."""
    token = proxies.add_user("ann")
    instances = dict(proxies.instance(f"instance{i}") for i in range(2))
    urls = [arg for url in instances.values() for arg in ("--instance-url", url)]
    fast_loss = ("--health-interval", "0.2", "--instance-lost-after", "1")
    proxy = proxies.start("proxy1", *urls, *fast_loss, "--shutdown-timeout", "0")
    async with InstanceClient(proxies.url, token) as ann:
        await ann.submit(drain_gate_graph("g", "tough"), prompt_id=prompt_uuid("tough"))
        await until(lambda: runs_of(proxies.data_dir, "g") == 1, what="the task starting")
    proxy.send_signal(signal.SIGTERM)
    assert await exited(proxy) == 0, proxies.log("proxy1")

    proxies.start("proxy2", *urls, *fast_loss)
    await until(lambda: runs_of(proxies.data_dir, "g") == 2, what="the handed-back task starting again")
    running: list[subprocess.Popen] = []

    async def find_running() -> bool:
        async with httpx.AsyncClient(headers={"Authorization": INSTANCE_TOKEN}, trust_env=False) as http:
            for proc, url in instances.items():
                if (await http.get(f"{url}/queue")).json()["queue_running"]:
                    running.append(proc)
                    return True
        return False

    await until(find_running, what="an instance running the task")
    running[0].send_signal(signal.SIGKILL)
    await until(lambda: runs_of(proxies.data_dir, "g") == 3, what="the task retried on the other instance")
    open_gate(proxies.data_dir, "g")
    async with InstanceClient(proxies.url, token) as ann:
        entry = await finished(ann, prompt_uuid("tough"))
    assert entry["status"]["status_str"] == "success", entry
    assert entry["cluster"]["attempts"] == 3
    assert outputs(proxies, "ann", "tough") == ["tough_00001_.png"]
