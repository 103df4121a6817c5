"""``comfyserve cluster`` / ``python -m cluster_proxy`` as a user starts it: real processes only."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from standard.client import InstanceClient
from standard.ports import free_port
from support.cluster import graph, write_sleep_plugin
from support.processes import wait_for_port


def _users(cli_env: dict[str, str], data_dir: Path, *args: str) -> str:
    done = subprocess.run(["comfyserve", "users", *args, "--data-dir", str(data_dir)], env=cli_env,
                          capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture
def cluster_process(tmp_path: Path, cli_env: dict[str, str]) -> Iterator[tuple[str, Path, subprocess.Popen]]:
    data_dir = tmp_path / "data"
    write_sleep_plugin(data_dir)
    port = free_port()
    log = (tmp_path / "proxy.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "cluster_proxy", "--data-dir", str(data_dir), "--port", str(port),
                             "--instances", "2"], env=cli_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port, timeout_s=30, proc=proc)
        deadline = time.monotonic() + 30
        while httpx.get(url + "/readyz", trust_env=False).json().get("instances_up") != 2:
            assert time.monotonic() < deadline, "the spawned instances never came up"
            time.sleep(0.1)
        yield url, data_dir, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_help_names_every_flag(cli_env: dict[str, str]) -> None:
    for command in (["comfyserve", "cluster", "--help"], [sys.executable, "-m", "cluster_proxy", "--help"]):
        out = subprocess.run(command, env=cli_env, capture_output=True, text=True, timeout=30, check=True).stdout
        for flag in ("--data-dir", "--port", "--instances", "--instance-url", "--redis-url", "--secret-key",
                     "--prefetch", "--affinity-wait"):
            assert flag in out
        assert "COMFYSERVE_INSTANCES" in out


def test_bad_flags_exit_with_a_message(cli_env: dict[str, str], tmp_path: Path) -> None:
    done = subprocess.run(["comfyserve", "cluster", "--data-dir", str(tmp_path), "--instance-url", "ftp://x"],
                          env=cli_env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--instance-url" in done.stderr
    done = subprocess.run(["comfyserve", "cluster"], env=cli_env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--data-dir" in done.stderr


async def test_spawned_instances_run_users_work_and_stop_with_the_proxy(cluster_process, cli_env) -> None:
    url, data_dir, proc = cluster_process
    tokens = {name: _users(cli_env, data_dir, "add", name, "--password", "long enough pw",
                           *(["--admin"] if name == "ann" else [])) for name in ("ann", "ben")}  # ann sees URLs
    for name, token in tokens.items():
        async with InstanceClient(url, token) as client:  # the raw per-user token, as scripts send it
            results = [await client.run(graph(name, color=i, seconds=0.1), timeout_s=30) for i in range(2)]
            assert all(r.ok for r in results)
            assert list(await client.history()) == [r.prompt_id for r in results]
    for name in tokens:
        assert sorted(p.name for p in (data_dir / "users" / name / "output").iterdir()) == [
            f"{name}_00001_.png", f"{name}_00002_.png"]
    instances = httpx.get(url + "/cluster/instances", headers={"Authorization": f"Bearer {tokens['ann']}"},
                          trust_env=False).json()["instances"]
    assert [i["state"] for i in instances] == ["up", "up"]
    assert sum(i["tasks_run"] for i in instances) == 4
    ports = [int(i["url"].rsplit(":", 1)[1]) for i in instances]
    proc.terminate()
    proc.wait(timeout=30)
    for port in ports:  # the spawned instances went with it
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", trust_env=False, timeout=2)


def _pid_listening_on(port: int) -> int:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"standard" in cmdline and str(port).encode() in cmdline:
                return int(proc.name)
    raise AssertionError(f"no instance process on port {port}")


def test_a_spawned_instance_that_dies_is_restarted_and_none_outlive_the_proxy(cluster_process, cli_env) -> None:
    import os
    import signal

    url, data_dir, proc = cluster_process
    token = _users(cli_env, data_dir, "add", "ann", "--password", "long enough pw", "--admin")
    headers = {"Authorization": token}

    def states() -> list[str]:
        instances = httpx.get(url + "/cluster/instances", headers=headers, trust_env=False).json()["instances"]
        return [i["state"] for i in instances]

    instances = httpx.get(url + "/cluster/instances", headers=headers, trust_env=False).json()["instances"]
    ports = [int(i["url"].rsplit(":", 1)[1]) for i in instances]
    os.kill(_pid_listening_on(ports[0]), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while "down" not in states():
        assert time.monotonic() < deadline, "the dead instance never left the pool"
        time.sleep(0.05)
    deadline = time.monotonic() + 30
    while states() != ["up", "up"]:
        assert time.monotonic() < deadline, "the restarted instance never rejoined"
        time.sleep(0.1)

    async def run_work() -> list[bool]:  # the work goes on
        async with InstanceClient(url, token) as client:
            return [(await client.run(graph("ann", color=i, seconds=0.2), timeout_s=30)).ok for i in range(4)]

    assert asyncio.run(run_work()) == [True] * 4
    instances = httpx.get(url + "/cluster/instances", headers=headers, trust_env=False).json()["instances"]
    assert [i["state"] for i in instances] == ["up", "up"] and sum(i["tasks_run"] for i in instances) == 4
    pids = [_pid_listening_on(port) for port in ports]
    proc.kill()  # no chance to clean up: the instances must still go
    proc.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() and b"zombie" not in _state(pid) for pid in pids):
        assert time.monotonic() < deadline, "spawned instances outlived a killed proxy"
        time.sleep(0.1)


def _state(pid: int) -> bytes:
    try:
        status = Path(f"/proc/{pid}/status").read_bytes()
    except OSError:
        return b"zombie"
    return b"zombie" if b"State:\tZ" in status else b"alive"


async def test_users_live_in_redis_without_a_data_dir(start_cluster, cli_env, redis_url, tmp_path) -> None:
    """``users add NAME --redis-url URL`` alone: a proxy on that Redis takes the token and makes the folders."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    async def users(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec("comfyserve", "users", *args, "--redis-url", redis_url,
                                                    env=cli_env, cwd=cwd, stdin=subprocess.DEVNULL,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        return proc.returncode or 0, out.decode(), err.decode()

    code, out, err = await users("add", "cleo", "--password", "long enough pw")
    assert code == 0, err
    token = out.strip().splitlines()[-1]
    assert list(cwd.iterdir()) == []  # no data dir made in the working directory
    assert (await users("list"))[1].split() == ["cleo"]
    code, _, err = await users("remove", "cleo")  # it moves the user's files: that needs the data dir
    assert code == 2 and "--data-dir" in err
    cluster = await start_cluster(instances=1, users=(), redis_url=redis_url)
    async with InstanceClient(cluster.url, token) as client:
        assert (await client.run(graph("cleo"), timeout_s=30)).ok
    assert [p.name for p in (cluster.user_dir("cleo") / "output").iterdir()] == ["cleo_00001_.png"]


def test_prefetch_and_affinity_flags_read_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from cluster_proxy import command
    from standard.cli import main

    def settings(*flags: str) -> Any:
        parser = argparse.ArgumentParser()
        command.add_arguments(parser)
        return command.settings_from_args(parser.parse_args(["--data-dir", str(tmp_path), *flags]))

    assert (settings().prefetch, settings().affinity_wait_s) == (1, 10.0)
    monkeypatch.setenv("COMFYSERVE_PREFETCH", "0")
    monkeypatch.setenv("COMFYSERVE_AFFINITY_WAIT", "0")
    assert (settings().prefetch, settings().affinity_wait_s) == (0, 0.0)  # today's FIFO dispatch
    assert settings("--prefetch", "2", "--affinity-wait", "1.5").prefetch == 2
    assert main(["cluster", "--data-dir", str(tmp_path), "--prefetch", "-1"]) == 2
    assert "--prefetch must not be negative" in capsys.readouterr().err
