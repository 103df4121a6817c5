"""Shared fixtures: free loopback ports, a real redis-server, fresh data dirs."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from standard.ports import free_port  # noqa: F401 - the tests take it from here

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def wait_for_port(port: int, timeout_s: float = 15.0, proc: subprocess.Popen | None = None) -> None:
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
        proc = subprocess.Popen(["comfyserve", *args, "--port", str(port)], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, timeout_s=port_timeout_s, proc=proc)
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


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """An initialised, empty data dir."""
    from standard.datadir import init_data_dir

    return init_data_dir(tmp_path / "data").root


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
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, proc=self.proc)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session; tests flush what they need."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A flushed database on the session's redis-server."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()
    return redis_server.url


@pytest.fixture
def cli_env() -> dict[str, str]:
    """Environment for running ``comfyserve`` subprocesses from this venv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYSERVE_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env
