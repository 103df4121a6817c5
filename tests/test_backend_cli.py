"""``comfyserve standard --backend-url URL`` and ``--comfyui-dir PATH`` as real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from standard.ports import free_port
from support.processes import SHIM_DIR, VENV_BIN, alive, wait_for_port

START_TIMEOUT_S = 20.0
READY_TIMEOUT_S = 45.0


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=30)


def wait_ready(base: str, headers: dict[str, str]) -> dict:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        response = httpx.get(f"{base}/readyz", headers=headers)
        if response.status_code == 200:
            return response.json()
        time.sleep(0.1)
    raise AssertionError(f"{base} not ready after {READY_TIMEOUT_S}s: {response.text}")


def wait_gone(pid: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        time.sleep(0.05)


def test_backend_url_fronts_another_instance(tmp_path: Path, cli_env: dict[str, str]) -> None:
    backend_port, front_port = free_port(), free_port()
    backend = start([sys.executable, "-m", "standard", "--port", str(backend_port),
                     "--data-dir", str(tmp_path / "backend")], cli_env, tmp_path / "backend.log")
    front = start([str(VENV_BIN / "comfyserve"), "standard", "--port", str(front_port),
                   "--data-dir", str(tmp_path / "front"), "--token", "T",
                   "--backend-url", f"http://127.0.0.1:{backend_port}"], cli_env, tmp_path / "front.log")
    try:
        wait_for_port(backend_port, START_TIMEOUT_S, backend)
        wait_for_port(front_port, START_TIMEOUT_S, front)
        base = f"http://127.0.0.1:{front_port}"
        assert httpx.get(f"{base}/healthz").status_code == 200
        assert httpx.get(f"{base}/queue").status_code == 401
        assert httpx.get(f"{base}/queue", headers={"Authorization": "T"}).json() == {
            "queue_running": [], "queue_pending": []}
        assert wait_ready(base, {"Authorization": "T"})["backend"] == f"http://127.0.0.1:{backend_port}"
    finally:
        assert stop(front) == 0
        assert stop(backend) == 0
    assert f"real ComfyUI at http://127.0.0.1:{backend_port}" in (tmp_path / "front.log").read_text()


def test_comfyui_dir_child_lives_and_dies_with_the_server(tmp_path: Path, cli_env: dict[str, str]) -> None:
    port = free_port()
    data = tmp_path / "data"
    proc = start([str(VENV_BIN / "comfyserve"), "standard", "--port", str(port), "--data-dir", str(data),
                  "--token", "T", "--comfyui-dir", str(SHIM_DIR)], cli_env, tmp_path / "server.log")
    try:
        wait_for_port(port, START_TIMEOUT_S, proc)
        base = f"http://127.0.0.1:{port}"
        status = wait_ready(base, {"Authorization": "T"})
        assert status["runtime"] == "comfyui-child"
        assert httpx.get(f"{base}/system_stats", headers={"Authorization": "T"}).status_code == 200
    finally:
        assert stop(proc) == 0
    wait_gone(status["pid"])
    log = (tmp_path / "server.log").read_text()
    assert "starting ComfyUI" in log and "--base-directory" in log
    assert "shim: serving" in log  # the child's output is logged by the supervisor


def test_comfyui_child_does_not_outlive_a_killed_server(tmp_path: Path, cli_env: dict[str, str]) -> None:
    port = free_port()
    proc = start([str(VENV_BIN / "comfyserve"), "standard", "--port", str(port), "--data-dir", str(tmp_path / "d"),
                  "--comfyui-dir", str(SHIM_DIR)], cli_env, tmp_path / "server.log")
    try:
        wait_for_port(port, START_TIMEOUT_S, proc)
        status = wait_ready(f"http://127.0.0.1:{port}", {})
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        wait_gone(status["pid"])
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bad_runtime_flags_exit_2(tmp_path: Path, cli_env: dict[str, str]) -> None:
    empty = tmp_path / "not-comfyui"
    empty.mkdir()
    base = [str(VENV_BIN / "comfyserve"), "standard", "--data-dir", str(tmp_path / "d"), "--port", str(free_port())]
    cases = {
        "no main.py": [*base, "--comfyui-dir", str(empty)],
        "exclude each other": [*base, "--comfyui-dir", str(SHIM_DIR), "--backend-url", "http://127.0.0.1:1"],
        "http:// or https://": [*base, "--backend-url", "ftp://example"],
    }
    for expected, args in cases.items():
        result = subprocess.run(args, env=cli_env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 2, (expected, result.stderr)
        assert expected in result.stderr
