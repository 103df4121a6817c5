"""One supervised child process: start, readiness, restart with backoff, stop, die with the parent.

Every child comfyserve runs goes through :class:`SupervisedProcess`: ComfyUI's
``main.py`` under ``--comfyui-dir`` and the ``--instances N`` of the API and
cluster editions (:class:`StandardChild`, a ``python -m standard`` on a
loopback port). What they share:

- **argv without secrets.** Secrets go in the child's environment
  (:func:`standard.private.child_environment`): ``ps`` shows every argv to
  every local user.
- **Its own process group** (a new session), so a Ctrl-C at the terminal
  reaches only comfyserve, which drains its work *before* it stops the
  children, and ``stop()`` reaches whatever the child started in turn.
- **Die with the parent.** On Linux the child gets SIGTERM when comfyserve
  dies, even by SIGKILL (``PR_SET_PDEATHSIG``), so no orphan holds a port.
- **Readiness** is an async probe polled with no deadline while the child
  lives (loading models can take minutes); slow starts are logged.
- **Restart with backoff**: a child that dies is started again after the
  jittered exponential wait of a ``standard.retry`` policy (``RESTART``);
  one that stayed up for ``stable_after_s`` starts the backoff anew.
  ``restart()`` replaces it on purpose, ``stop()`` cuts any wait short.
- **Stop**: SIGTERM to the group, SIGKILL after ``stop_timeout_s``. Owners
  call it after their own work has drained (the drain hooks of
  ``standard.serving`` run first, the children stop in cleanup).
- **Output**: relayed line by line to a logger (with a tail kept for
  errors and status), appended to a file, or inherited.
- **Said plainly**: the exact command line of each start is logged
  (shell-quoted: it can be pasted to try it by hand), and a child that exits
  before it ever answered is reported as an exit *at start*, with its code
  and its last lines of output (``start_failure``, for status pages and
  errors), not only as a probe that found nobody.

A port picked for a child may be taken by someone else before the child binds
it; :class:`StandardChild` therefore never picks the parent's own port, and a
child counts as ready only when ``/healthz`` answers with the instance id it
was given (``COMFYSERVE_INSTANCE_ID``), so whatever else answers on that port is
never taken for it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import os
import secrets
import shlex
import signal
import sys
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import aiohttp

from .ports import free_port
from .private import TOKEN_ENV, child_environment
from .retry import RESTART, RetryPolicy
from .tasks import cancel_and_wait

log = logging.getLogger("comfyserve.supervised")

INSTANCE_ID_ENV = "COMFYSERVE_INSTANCE_ID"  # set for a child by its supervisor; echoed by its /healthz
PR_SET_PDEATHSIG = 1
RELAY_FLUSH_S = 1.0  # after an exit, how long the last lines of output may take to arrive
Probe = Callable[[], Awaitable[tuple[bool, str]]]  # (ready, what it saw), asked while the child lives


def instance_identity() -> dict[str, str]:
    """What ``/healthz`` adds so a supervisor knows it reached its own child: ``{"instance": id}`` or nothing."""
    value = os.environ.get(INSTANCE_ID_ENV)
    return {"instance": value} if value else {}


def _load_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()  # loaded here: the forked child must not load or import anything


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """The ``preexec_fn``: SIGTERM this child when ``parent_pid`` dies (Linux); exit at once if it already has."""
    def preexec() -> None:  # pragma: no cover - runs in the child between fork and exec
        if _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent_pid:  # the parent died before prctl took effect
                os._exit(1)

    return preexec


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


class SupervisedProcess:
    """A child started, watched, restarted when it dies, and stopped; see the module docstring.

    ``argv`` is asked anew for each start (a child may get a new port each time).
    ``secret_env`` (name -> value) is added to the child's environment, which
    otherwise holds no secret (``third_party``: no ``COMFYSERVE_*`` setting either).
    ``output``: a logger gets each line (and ``tail`` keeps the last ones), a
    path gets them appended, None leaves the child this process's stdout/stderr.
    ``logger`` tells of starts, exits and slow readiness.
    """

    def __init__(self, name: str, argv: Callable[[], Sequence[str]], *, ready: Probe,
                 secret_env: Mapping[str, str | None] | None = None, third_party: bool = False,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None,
                 output: logging.Logger | Path | None = None, tail_lines: int = 40,
                 restart_policy: RetryPolicy = RESTART, stable_after_s: float = 60.0,
                 stop_timeout_s: float = 10.0, poll_s: float = 0.2, progress_log_s: float = 10.0,
                 logger: logging.Logger = log) -> None:
        self.name = name
        self.log = logger
        self.argv = argv
        self.probe = ready
        self.secret_env = dict(secret_env or {})
        self.third_party = third_party
        self.env = dict(env or {})
        self.cwd = cwd
        self.output = output
        self.restart_policy = restart_policy
        self.stable_after_s = stable_after_s
        self.stop_timeout_s = stop_timeout_s
        self.poll_s = poll_s
        self.progress_log_s = progress_log_s
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.crashes = 0
        self.last_exit: int | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        # Why the last start failed before the child answered (code and last output line); None once it answers.
        self.start_failure: str | None = None
        # The last start failed and no new one runs yet (a backoff wait): requests need not wait for it.
        self.failed = False
        self.ready = False
        self._ready_changed = asyncio.Condition()
        self._restart_requested = False
        self._stopping = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._relay_task: asyncio.Task[None] | None = None  # held: the loop keeps only weak references

    @property
    def pid(self) -> int | None:
        """The running child's pid (None between children)."""
        proc = self.proc
        return proc.pid if proc is not None and proc.returncode is None else None

    def start(self) -> None:
        """Start supervising (the first child starts at once, in the background)."""
        if self._task is None:
            self._task = asyncio.create_task(self._supervise(), name=f"comfyserve-supervise-{self.name}")

    async def stop(self) -> None:
        """Stop the child (SIGTERM, then SIGKILL past ``stop_timeout_s``) and the supervision."""
        self._stopping = True
        self._wake.set()
        await self._terminate()
        if self._task is not None:
            await cancel_and_wait(self._task)
        await self._terminate()  # one the supervisor had just started while we stopped it

    async def restart(self, wait_s: float | None = None) -> bool:
        """Replace the child on purpose; wait up to ``wait_s`` for the new one to be ready."""
        starts = self.starts
        self.failed = False  # a new start is under way: waiting for it is worth it
        self._restart_requested = True
        self._wake.set()
        await self._set_ready(False)  # new requests wait for the new child instead of reaching the old one
        await self._terminate()
        return await self.wait_ready(wait_s, after_starts=starts)

    async def wait_ready(self, timeout_s: float | None = None, *, after_starts: int = 0,
                         until_failed: bool = False) -> bool:
        """Until a child started after ``after_starts`` is ready (or the timeout passes); with
        ``until_failed`` also until a start fails (``failed``), so a caller can say so at once."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                async with self._ready_changed:
                    await self._ready_changed.wait_for(
                        lambda: self.ready and self.starts > after_starts or until_failed and self.failed)
        return self.ready

    # -- supervision ---------------------------------------------------------

    async def _set_ready(self, ready: bool) -> None:
        async with self._ready_changed:
            self.ready = ready
            self._ready_changed.notify_all()

    async def _set_failed(self) -> None:
        async with self._ready_changed:
            self.failed = True
            self._ready_changed.notify_all()

    async def _supervise(self) -> None:
        failures = 0
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._restart_requested = False
            self.failed = False
            self._wake.clear()
            try:
                proc = await self._spawn()
            except OSError as exc:
                self.log.error("cannot start %s: %s", self.name, exc)
                self.start_failure = f"cannot start {self.name}: {exc}"
                await self._set_failed()
                proc = None
            if proc is not None:
                became_ready = await self._wait_until_ready(proc)
                ready_at = loop.time()
                if became_ready:
                    self.start_failure = None
                    await self._set_ready(True)
                    self.log.info("%s ready (pid %d)", self.name, proc.pid)
                await proc.wait()
                await self._set_ready(False)
                self.last_exit = proc.returncode
                if self._stopping:
                    return
                if self._restart_requested:
                    self.log.info("%s stopped for a restart", self.name)
                    failures = 0
                    continue
                self.crashes += 1
                if became_ready and loop.time() - ready_at >= self.stable_after_s:
                    failures = 0
                await self._output_flushed()
                self._report_exit(proc, became_ready)
                if not became_ready:
                    await self._set_failed()
            failures += 1
            delay = self.restart_policy.delay_s(failures)
            self.log.info("starting %s again in %.1f s", self.name, delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()  # a restart() or stop() cuts the backoff short

    def _report_exit(self, proc: asyncio.subprocess.Process, became_ready: bool) -> None:
        """Log an unplanned exit; one before the child ever answered is a failure *at start*."""
        last = f"; its last output:\n{chr(10).join(self.tail)}" if self.tail else "; it printed nothing"
        if became_ready:
            self.log.error("%s (pid %d) exited with code %s%s", self.name, proc.pid, proc.returncode, last)
            return
        last_line = next((line for line in reversed(self.tail) if line.strip()), "")
        self.start_failure = (f"{self.name} exited at start with code {proc.returncode}"
                              + (f": {last_line.strip()}" if last_line else " and printed nothing"))
        self.log.error("%s (pid %d) exited at start with code %s, before it answered%s",
                       self.name, proc.pid, proc.returncode, last)

    async def _output_flushed(self) -> None:
        """Let the relay read the dead child's last lines (a grandchild holding the pipe open does not hold us)."""
        relay = self._relay_task
        if relay is not None and not relay.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RELAY_FLUSH_S):
                    await asyncio.shield(relay)

    async def _spawn(self) -> asyncio.subprocess.Process:
        argv = list(self.argv())
        self.tail.clear()  # the tail tells of this start only
        self.log.info("starting %s: %s", self.name, shlex.join(argv))
        env = child_environment(self.secret_env, third_party=self.third_party)
        env.update(self.env)
        sink: IO[bytes] | None = None
        stdout: int | IO[bytes] | None = None
        if isinstance(self.output, logging.Logger):
            stdout = asyncio.subprocess.PIPE
        elif isinstance(self.output, Path):
            self.output.parent.mkdir(parents=True, exist_ok=True)
            stdout = sink = open(self.output, "ab")  # noqa: SIM115, ASYNC230 (a local log file; the child holds its own copy)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=None if self.cwd is None else str(self.cwd), env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=stdout, stderr=None if stdout is None else asyncio.subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent(os.getpid()),
            )
        finally:
            if sink is not None:
                sink.close()
        self.proc = proc
        self.starts += 1
        if isinstance(self.output, logging.Logger):
            self._relay_task = asyncio.create_task(self._relay(proc, self.output),
                                                   name=f"comfyserve-output-{self.name}")
        return proc

    async def _relay(self, proc: asyncio.subprocess.Process, logger: logging.Logger) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            text = line.decode("utf-8", "replace").rstrip()
            self.tail.append(text)
            logger.info("%s", text)

    async def _wait_until_ready(self, proc: asyncio.subprocess.Process) -> bool:
        """Probe until the child is ready; False if it exits first. No deadline on purpose."""
        loop = asyncio.get_running_loop()
        started = next_report = loop.time()
        while proc.returncode is None:
            ok, detail = await self.probe()
            if ok:
                return True
            now = loop.time()
            if now >= next_report + self.progress_log_s:
                next_report = now
                self.log.info("waiting for %s (pid %d) to answer: %.0f s so far (%s)",
                         self.name, proc.pid, now - started, detail)
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
            self.log.warning("%s (pid %d) ignored SIGTERM for %.0f s: SIGKILL",
                             self.name, proc.pid, self.stop_timeout_s)
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()


PROBE_TIMEOUT_S = 5.0  # one /healthz request; the probing itself has no deadline


class StandardChild:
    """``python -m standard`` on a loopback port: a local instance of the API or cluster edition.

    The port is picked once (never one in ``avoid_ports``, such as the parent's
    own) and kept across restarts, so ``url`` is stable. The child counts as
    ready when ``/healthz`` on that port answers with this child's instance id.
    """

    def __init__(self, name: str, data_dir: Path, *, token: str | None, extra_args: Sequence[str] = (),
                 port: int | None = None, avoid_ports: Collection[int] = (), log_file: Path | None = None,
                 stop_timeout_s: float = 15.0, restart_policy: RetryPolicy = RESTART) -> None:
        self.data_dir = data_dir
        self.extra_args = tuple(extra_args)
        self.port = port or free_port(avoid=avoid_ports)
        self.instance_id = secrets.token_hex(8)
        self._session: aiohttp.ClientSession | None = None
        self.process = SupervisedProcess(
            name, self.command, ready=self.answers, secret_env={TOKEN_ENV: token},
            env={INSTANCE_ID_ENV: self.instance_id}, output=log_file, stop_timeout_s=stop_timeout_s,
            restart_policy=restart_policy, poll_s=0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        # The children log at this process's level (the bench runs them quiet).
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        return [sys.executable, "-m", "standard.cli", "--log-level", str(level), "standard",
                "--listen", "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.data_dir),
                "--no-state-file",  # the parent's queue is the durable one: a lost prompt is given back there
                *self.extra_args]

    async def answers(self) -> tuple[bool, str]:
        """Is it our child that answers ``/healthz`` on the port (and not whatever else took it)?"""
        if self._session is None:
            self._session = aiohttp.ClientSession(trust_env=False)
        try:
            async with self._session.get(self.url + "/healthz",
                                         timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)) as response:
                body = await response.json(content_type=None) if response.status == 200 else None
        except (aiohttp.ClientError, ValueError, TimeoutError, OSError) as exc:
            return False, f"unreachable: {exc!r}"
        if not isinstance(body, dict) or body.get("instance") != self.instance_id:
            return False, f"port {self.port} is answered by another process"
        return True, "ok"

    def answering(self) -> bool:
        """Our child answers on ``url`` (False from its exit until its successor answers)."""
        return self.process.ready

    def start(self) -> None:
        self.process.start()

    async def stop(self) -> None:
        await self.process.stop()
        if self._session is not None:
            await self._session.close()
