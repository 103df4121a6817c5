"""Real processes for the tests: paths, waiting for a port, ``comfyserve`` and redis-server, /proc."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from standard.ports import free_port

TESTS_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = TESTS_DIR.parent
VENV_BIN = Path(sys.executable).parent
SHIM_DIR = TESTS_DIR / "comfyui_shim"
START_TIMEOUT_S = 20.0
# asyncio's debug mode (children run under -X dev) warns of any callback over 0.1 s: on a loaded machine
# such a line can come first in a child's stderr.
_SLOW_CALLBACK = re.compile(r"^.* WARNING asyncio: Executing .*\n?", re.MULTILINE)


def own_output(stderr: str) -> str:
    """A child's stderr without asyncio's slow-callback warnings, so a test can check what it said first."""
    return _SLOW_CALLBACK.sub("", stderr)


def wait_for_port(port: int, timeout_s: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    """Until something accepts on ``127.0.0.1:port``; fails at once if ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s}s")


def start_listening(command: list[str], port: int, *, env: dict[str, str] | None = None,
                    output: IO[bytes] | int = subprocess.DEVNULL, timeout_s: float = 15.0) -> subprocess.Popen:
    """``command`` as a child process (stdout and stderr to ``output``), returned once it accepts on
    ``127.0.0.1:port``; a child that exits first fails at once, and one that never listens is killed."""
    proc = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout_s=timeout_s, proc=proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def http_status(url: str, headers: dict[str, str] | None = None) -> int:
    """The status of a GET from the test itself (0 when nothing answers)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@contextlib.contextmanager
def comfyserve_process(args: list[str], env: dict[str, str], log_path: Path, *,
                       ready_headers: dict[str, str] | None = None, port_timeout_s: float = 20.0,
                       ready_timeout_s: float = 20.0,
                       stop_timeout_s: float = 20.0) -> Iterator[tuple[subprocess.Popen, int]]:
    """``comfyserve ARGS --port P`` as a real process, yielded once its ``/readyz`` answers 200; then stopped."""
    port = free_port()
    with log_path.open("wb") as log:
        proc = start_listening(["comfyserve", *args, "--port", str(port)], port, env=env, output=log,
                               timeout_s=port_timeout_s)
        try:
            deadline = time.monotonic() + ready_timeout_s
            while http_status(f"http://127.0.0.1:{port}/readyz", ready_headers) != 200:
                assert time.monotonic() < deadline, f"comfyserve {args[0]} never became ready"
                time.sleep(0.1)
            yield proc, port
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_cli(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """A command with its output captured as text (read by ``stop_cli``)."""
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_cli(proc: subprocess.Popen) -> tuple[int, str, str]:
    """SIGTERM (if still running), then its exit code, stdout and stderr."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=20)
    return proc.returncode, out, err


class RedisServer:
    """A real redis-server process on a loopback port (AOF on, so restarts keep data)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (scripts/setup.sh --test installs it)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = start_listening(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)], self.port)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()


def redis_command_calls(url: str) -> dict[str, int]:
    """Calls per command a Redis server ran so far (``cmdstat_<name>``; a script's commands count under
    their own names): how many store round trips a request costs, seen from the server."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        return {name: int(entry["calls"]) for name, entry in client.info("commandstats").items()}
    finally:
        client.close()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def children_of(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc, as ``ps`` reads it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def wait_for_child(pid: int, marker: bytes, timeout_s: float = 20.0) -> int:
    """The child of ``pid`` whose command line contains ``marker``, once it exists."""
    deadline = time.monotonic() + timeout_s
    while True:
        for child in children_of(pid):
            try:
                if marker in Path(f"/proc/{child}/cmdline").read_bytes():
                    return child
            except OSError:
                continue
        assert time.monotonic() < deadline, f"no child of {pid} with {marker!r} in its command line"
        time.sleep(0.05)


def environ(pid: int) -> dict[str, str]:
    """The environment ``pid`` was started with."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode("utf-8", "replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)
