"""``comfyserve standard --backend-url URL`` and ``--comfyui-dir PATH`` as real processes."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from standard.backend.app import REQUEST_WAIT_S
from standard.ports import free_port
from support.processes import SHIM_DIR, VENV_BIN, alive, own_output, wait_for_port

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


def test_comfyuis_flags_as_users_type_them_and_the_exact_command_line_in_the_log(tmp_path: Path,
                                                                                 cli_env: dict[str, str]) -> None:
    """``--comfyui-args --cpu`` (a value that looks like a flag), a quoted string, and the words after ``--``."""
    port, record = free_port(), tmp_path / "starts.jsonl"
    proc = start([str(VENV_BIN / "comfyserve"), "standard", "--port", str(port), "--data-dir", str(tmp_path / "d"),
                  "--token", "Secret-T0ken", "--comfyui-dir", str(SHIM_DIR), "--comfyui-args", "--cpu",
                  "--comfyui-args", "--preview-method auto", "--", "--front-end-version", "Comfy Org/x@latest"],
                 {**cli_env, "COMFYUI_SHIM_RECORD": str(record)}, tmp_path / "server.log")
    try:
        wait_for_port(port, START_TIMEOUT_S, proc)
        wait_ready(f"http://127.0.0.1:{port}", {"Authorization": "Secret-T0ken"})
    finally:
        assert stop(proc) == 0
    extra = ["--cpu", "--preview-method", "auto", "--front-end-version", "Comfy Org/x@latest"]
    [started] = [json.loads(line) for line in record.read_text().splitlines()]
    assert started["argv"][-len(extra):] == extra
    log = (tmp_path / "server.log").read_text()
    [line] = [line for line in log.splitlines() if "starting ComfyUI: " in line]
    python, main, *argv = shlex.split(line.split("starting ComfyUI: ", 1)[1])  # exact, pasteable
    assert main == str(SHIM_DIR / "main.py") and argv == started["argv"]
    assert "Secret-T0ken" not in log


def test_comfyui_exiting_at_start_is_said_with_its_last_output(tmp_path: Path, cli_env: dict[str, str]) -> None:
    port = free_port()
    proc = start([str(VENV_BIN / "comfyserve"), "standard", "--port", str(port), "--data-dir", str(tmp_path / "d"),
                  "--comfyui-dir", str(SHIM_DIR), "--", "--shim-fail", "Torch not compiled with CUDA enabled"],
                 cli_env, tmp_path / "server.log")
    try:
        wait_for_port(port, START_TIMEOUT_S, proc)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "exited at start" not in (ready := httpx.get(f"{base}/readyz")).text:
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.05)
        assert ready.status_code == 503
        error = ready.json()["error"]
        assert "ComfyUI exited at start with code 3: shim: Torch not compiled with CUDA enabled" in error
        # Said at once: a child known to have failed is not waited for (REQUEST_WAIT_S) before the 503.
        answer = httpx.get(f"{base}/object_info", timeout=REQUEST_WAIT_S / 3)
        assert answer.status_code == 503
        assert "exited at start with code 3: shim: Torch not compiled" in answer.json()["error"]["details"]
    finally:
        assert stop(proc) == 0
    log = (tmp_path / "server.log").read_text()
    said = log.split("exited at start with code 3, before it answered; its last output:", 1)
    assert len(said) == 2, log
    assert "shim: loading" in said[1] and "shim: Torch not compiled with CUDA enabled" in said[1]


def test_comfyui_arguments_without_comfyui_dir_are_refused(tmp_path: Path, cli_env: dict[str, str]) -> None:
    base = [str(VENV_BIN / "comfyserve"), "standard", "--data-dir", str(tmp_path / "d"), "--port", str(free_port())]
    for args in ([*base, "--", "--cpu"], [*base, "--comfyui-args", "--cpu"], [*base, "--comfyui-args", "'--cpu"]):
        result = subprocess.run(args, env=cli_env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 2, result.stderr
        # ours, not argparse's usage
        assert own_output(result.stderr).startswith("comfyserve standard: "), result.stderr
        assert "need --comfyui-dir" in result.stderr or "No closing quotation" in result.stderr, result.stderr
