"""``--comfyui-dir``: ComfyUI's ``main.py`` as a supervised child on a loopback port.

The data dir is mapped onto ComfyUI's own flags (``--base-directory`` and the
input/output/user directories, plus a generated extra-model-paths YAML that
lists every ``DIR/models/<folder>``). Loading models and custom nodes can
take minutes, so readiness is polled with no deadline while the child lives
(progress is logged). A child that dies is started again with jittered exponential
backoff (``standard.retry``); ``restart()`` replaces it on purpose; ``stop()`` sends SIGTERM, then
SIGKILL after a grace period, to its whole process group.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from ..datadir import MODEL_FOLDERS, DataDir
from ..errors import ConfigError
from ..ports import free_port
from ..private import child_environment
from ..retry import RetryPolicy
from .runtime import probe

log = logging.getLogger("comfyserve.backend")
child_log = logging.getLogger("comfyserve.comfyui")
LOG_TAIL_LINES = 40


def model_paths_yaml(data_dir: DataDir) -> str:
    """An extra_model_paths.yaml mapping ComfyUI's model folders onto ``DIR/models``.

    Strings are JSON-quoted, which YAML reads as double-quoted scalars.
    """
    lines = ["comfyserve:", f"    base_path: {json.dumps(str(data_dir.models))}", "    is_default: true"]
    lines += [f"    {name}: {json.dumps(name)}" for name in MODEL_FOLDERS]
    return "\n".join(lines) + "\n"


def comfyui_command(python: str, comfyui_dir: Path, data_dir: DataDir, port: int, model_paths: Path,
                    max_upload_size_mb: float, extra_args: tuple[str, ...]) -> list[str]:
    """The child's argv (flag names as in ComfyUI's comfy/cli_args.py)."""
    work = data_dir.workdirs()
    return [
        python, str(comfyui_dir / "main.py"),
        "--listen", "127.0.0.1", "--port", str(port),
        "--base-directory", str(data_dir.root),
        "--input-directory", str(work.input),
        "--output-directory", str(work.output),
        "--user-directory", str(work.user),
        "--extra-model-paths-config", str(model_paths),
        "--max-upload-size", f"{max_upload_size_mb:g}",
        "--disable-auto-launch",
        *extra_args,
    ]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: SIGTERM the child if comfyserve itself dies without cleaning up."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ComfyUIChild:
    """The supervised ComfyUI process; a ``Backend`` for the proxy."""

    kind = "comfyui-child"

    def __init__(self, comfyui_dir: Path, data_dir: DataDir, *, python: str = sys.executable,
                 extra_args: tuple[str, ...] = (), max_upload_size_mb: float = 100.0,
                 stop_timeout_s: float = 10.0, poll_s: float = 0.2, progress_log_s: float = 10.0,
                 backoff_min_s: float = 0.5, backoff_max_s: float = 30.0, stable_after_s: float = 60.0) -> None:
        main = comfyui_dir / "main.py"
        if not main.is_file():
            raise ConfigError(f"--comfyui-dir {comfyui_dir}: no main.py there")
        self.comfyui_dir = comfyui_dir
        self.data_dir = data_dir
        self.python = python
        self.extra_args = extra_args
        self.max_upload_size_mb = max_upload_size_mb
        self.stop_timeout_s = stop_timeout_s
        self.poll_s = poll_s
        self.progress_log_s = progress_log_s
        self.restart_backoff = RetryPolicy(attempts=None, initial_s=backoff_min_s, max_s=backoff_max_s)
        self.stable_after_s = stable_after_s
        self.port: int | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.crashes = 0
        self.last_exit: int | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._ready = False
        self._ready_changed = asyncio.Condition()
        self._restart_requested = False
        self._stopping = False
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._model_paths: Path | None = None

    # -- Backend -------------------------------------------------------------

    @property
    def base_url(self) -> str | None:
        return f"http://127.0.0.1:{self.port}" if self._ready and self.port else None

    async def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self.data_dir.custom_nodes.mkdir(parents=True, exist_ok=True)  # ComfyUI needs it before start
        self.data_dir.workdirs().create()
        self._tmp = tempfile.TemporaryDirectory(prefix="comfyserve-comfyui-")
        self._model_paths = Path(self._tmp.name) / "extra_model_paths.yaml"
        self._model_paths.write_text(model_paths_yaml(self.data_dir))
        self._task = asyncio.create_task(self._supervise(), name="comfyserve-comfyui-supervisor")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        await self._terminate()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._terminate()  # one the supervisor had just started while we stopped it
        if self._tmp is not None:
            self._tmp.cleanup()

    async def status(self) -> dict[str, Any]:
        proc = self.proc
        running = proc is not None and proc.returncode is None
        return {
            "ready": self._ready, "runtime": self.kind, "comfyui_dir": str(self.comfyui_dir),
            "pid": proc.pid if running and proc else None, "port": self.port, "starts": self.starts,
            "crashes": self.crashes, "last_exit": self.last_exit,
            "error": None if self._ready else ("starting" if running else "not running"),
            "log_tail": list(self.tail)[-10:],
        }

    async def restart(self, wait_s: float | None = None) -> dict[str, Any]:
        """Replace the child (plugins and models load anew); wait for it up to ``wait_s``."""
        starts = self.starts
        self._restart_requested = True
        self._wake.set()
        await self._set_ready(False)  # new requests wait for the new child instead of reaching the old one
        await self._terminate()
        await self.wait_ready(wait_s, after_starts=starts)
        return await self.status()

    async def wait_ready(self, timeout_s: float | None = None, *, after_starts: int = 0) -> bool:
        """Until a child started after ``after_starts`` is ready (or the timeout passes)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                async with self._ready_changed:
                    await self._ready_changed.wait_for(lambda: self._ready and self.starts > after_starts)
        return self._ready

    # -- supervision ---------------------------------------------------------

    async def _set_ready(self, ready: bool) -> None:
        async with self._ready_changed:
            self._ready = ready
            self._ready_changed.notify_all()

    async def _supervise(self) -> None:
        failures = 0
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._restart_requested = False
            self._wake.clear()
            try:
                proc = await self._spawn()
            except OSError as exc:
                log.error("cannot start ComfyUI: %s", exc)
                proc = None
            if proc is not None:
                became_ready = await self._wait_until_ready(proc)
                ready_at = loop.time()
                if became_ready:
                    await self._set_ready(True)
                    log.info("ComfyUI ready on 127.0.0.1:%s (pid %d)", self.port, proc.pid)
                await proc.wait()
                await self._set_ready(False)
                self.last_exit = proc.returncode
                if self._stopping:
                    return
                if self._restart_requested:
                    log.info("ComfyUI stopped for a restart")
                    failures = 0
                    continue
                self.crashes += 1
                if became_ready and loop.time() - ready_at >= self.stable_after_s:
                    failures = 0
                log.error("ComfyUI exited with %s; last output:\n%s", proc.returncode, "\n".join(self.tail))
            failures += 1
            delay = self.restart_backoff.delay_s(failures)
            log.info("starting ComfyUI again in %.1f s", delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()  # a /restart or stop cuts the backoff short

    async def _spawn(self) -> asyncio.subprocess.Process:
        assert self._model_paths is not None
        self.port = free_port()
        argv = comfyui_command(self.python, self.comfyui_dir, self.data_dir, self.port, self._model_paths,
                               self.max_upload_size_mb, self.extra_args)
        log.info("starting ComfyUI: %s", " ".join(argv))
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=str(self.comfyui_dir), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent, env=child_environment(third_party=True),
        )
        self.proc = proc
        self.starts += 1
        asyncio.create_task(self._pump_output(proc), name="comfyserve-comfyui-output")
        return proc

    async def _pump_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            self.tail.append(text)
            child_log.info("%s", text)

    async def _wait_until_ready(self, proc: asyncio.subprocess.Process) -> bool:
        """Poll until ComfyUI answers HTTP; False if it exits first. No deadline on purpose."""
        assert self._session is not None
        loop = asyncio.get_running_loop()
        started = next_report = loop.time()
        url = f"http://127.0.0.1:{self.port}"
        while proc.returncode is None:
            ok, detail = await probe(self._session, url)
            if ok:
                return True
            now = loop.time()
            if now >= next_report + self.progress_log_s:
                next_report = now
                log.info("waiting for ComfyUI (pid %d, port %s) to answer: %.0f s so far (%s)",
                         proc.pid, self.port, now - started, detail)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_s):
                    await proc.wait()
        return False

    async def _terminate(self) -> None:
        """SIGTERM the child's process group; SIGKILL if it outlives ``stop_timeout_s``."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(self.stop_timeout_s):
                await proc.wait()
        except TimeoutError:
            log.warning("ComfyUI (pid %d) ignored SIGTERM for %.0f s: SIGKILL", proc.pid, self.stop_timeout_s)
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)
