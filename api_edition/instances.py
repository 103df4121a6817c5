"""Local instances for ``comfyserve api --instances N``: supervised child processes on loopback.

Each child is ``python -m standard.cli standard --port P --data-dir DIR`` (the embedded
engine), so a crash or a kill -9 of one instance leaves the front, the queue
and the other instances running; the supervisor starts a dead child again and
its worker resumes once it answers ``/readyz``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import signal
import sys
from pathlib import Path

from standard.ports import free_port
from standard.private import TOKEN_ENV, child_environment

log = logging.getLogger("comfyserve.api.instances")

RESTART_DELAY_S = 1.0
PR_SET_PDEATHSIG = 1
STOP_TIMEOUT_S = 15.0


def _load_libc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()  # loaded here, not in the forked child


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when this process dies, even by kill -9 (no orphaned instances)."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class LocalInstance:
    """One supervised child; ``url`` is stable across restarts (same port)."""

    def __init__(self, data_dir: Path, *, token: str | None, port: int | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.token = token
        self.port = port or free_port()
        self.extra_args = extra_args
        self.proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        # The children log at this process's level (the bench runs them quiet).
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        cmd = [sys.executable, "-m", "standard.cli", "--log-level", str(level), "standard",
               "--listen", "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.data_dir),
               *self.extra_args]
        return cmd

    async def _spawn(self) -> asyncio.subprocess.Process:
        # The token goes in the environment: on the command line every local user would see it in ps.
        return await asyncio.create_subprocess_exec(*self.command(), stdin=asyncio.subprocess.DEVNULL,
                                                    env=child_environment({TOKEN_ENV: self.token}),
                                                    preexec_fn=_die_with_parent)

    async def start(self) -> None:
        self.proc = await self._spawn()
        log.info("instance on port %d started (pid %d)", self.port, self.proc.pid)
        self._supervisor = asyncio.create_task(self._supervise(), name=f"instance-{self.port}")

    async def _supervise(self) -> None:
        while True:
            assert self.proc is not None
            code = await self.proc.wait()
            if self._stopping:
                return
            log.warning("instance on port %d exited with %s; restarting in %.0fs", self.port, code, RESTART_DELAY_S)
            await asyncio.sleep(RESTART_DELAY_S)
            if self._stopping:
                return
            self.proc = await self._spawn()

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
