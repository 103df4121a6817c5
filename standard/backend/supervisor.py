"""``--comfyui-dir``: ComfyUI's ``main.py`` as a supervised child on a loopback port.

The data dir is mapped onto ComfyUI's own flags (``--base-directory`` and the
input/output/user directories, plus a generated extra-model-paths YAML that
lists every ``DIR/models/<folder>``). Loading models and custom nodes can
take minutes, so readiness is polled with no deadline while the child lives
(progress is logged). Starting, restarting with backoff, stopping and dying
with comfyserve are ``standard.supervised.SupervisedProcess``'s; ComfyUI is
third-party code, so its environment holds no ``COMFYSERVE_*`` setting, and it
gets a fresh port at each start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from ..datadir import MODEL_FOLDERS, DataDir
from ..errors import ConfigError
from ..ports import free_port
from ..retry import RESTART
from ..supervised import SupervisedProcess
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
        self.port: int | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._model_paths: Path | None = None
        self.child = SupervisedProcess(
            "ComfyUI", self._command, ready=self._probe, third_party=True, cwd=comfyui_dir, output=child_log,
            tail_lines=LOG_TAIL_LINES, restart_policy=RESTART.but(initial_s=backoff_min_s, max_s=backoff_max_s),
            stable_after_s=stable_after_s, stop_timeout_s=stop_timeout_s, poll_s=poll_s,
            progress_log_s=progress_log_s, logger=log)

    @property
    def proc(self) -> asyncio.subprocess.Process | None:
        return self.child.proc

    @property
    def crashes(self) -> int:
        return self.child.crashes

    @property
    def starts(self) -> int:
        return self.child.starts

    # -- Backend -------------------------------------------------------------

    @property
    def base_url(self) -> str | None:
        return f"http://127.0.0.1:{self.port}" if self.child.ready and self.port else None

    async def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self.data_dir.custom_nodes.mkdir(parents=True, exist_ok=True)  # ComfyUI needs it before start
        self.data_dir.workdirs().create()
        self._tmp = tempfile.TemporaryDirectory(prefix="comfyserve-comfyui-")
        self._model_paths = Path(self._tmp.name) / "extra_model_paths.yaml"
        self._model_paths.write_text(model_paths_yaml(self.data_dir))
        self.child.start()

    async def stop(self) -> None:
        await self.child.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    async def status(self) -> dict[str, Any]:
        child = self.child
        return {
            "ready": child.ready, "runtime": self.kind, "comfyui_dir": str(self.comfyui_dir),
            "pid": child.pid, "port": self.port, "starts": child.starts,
            "crashes": child.crashes, "last_exit": child.last_exit,
            "error": None if child.ready else self.not_ready_reason(),
            "log_tail": list(child.tail)[-10:],
        }

    def not_ready_reason(self) -> str:
        """Why requests cannot reach ComfyUI now: how its last start failed, else that it is starting."""
        child = self.child
        if child.start_failure:
            state = "starting it again" if child.pid is not None else "it will be started again"
            return f"{child.start_failure} ({state}; see the log for its output)"
        return "ComfyUI is starting" if child.pid is not None else "ComfyUI is not running"

    async def restart(self, wait_s: float | None = None) -> dict[str, Any]:
        """Replace the child (plugins and models load anew); wait for it up to ``wait_s``."""
        await self.child.restart(wait_s)
        return await self.status()

    @property
    def failed(self) -> bool:
        """Its last start failed and the next one has not begun (``not_ready_reason`` says how)."""
        return self.child.failed

    async def wait_ready(self, timeout_s: float | None = None, *, after_starts: int = 0,
                         until_failed: bool = False) -> bool:
        """Until a child started after ``after_starts`` is ready, or one fails at start with
        ``until_failed`` (or the timeout passes)."""
        return await self.child.wait_ready(timeout_s, after_starts=after_starts, until_failed=until_failed)

    # -- the child -------------------------------------------------------------

    def _command(self) -> list[str]:
        assert self._model_paths is not None
        self.port = free_port()
        return comfyui_command(self.python, self.comfyui_dir, self.data_dir, self.port, self._model_paths,
                               self.max_upload_size_mb, self.extra_args)

    async def _probe(self) -> tuple[bool, str]:
        """Whether ComfyUI answers HTTP on its port."""
        assert self._session is not None
        return await probe(self._session, f"http://127.0.0.1:{self.port}")
