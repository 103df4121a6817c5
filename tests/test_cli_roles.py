"""Every ``comfyserve ROLE`` starts and refuses the same way (real processes).

A refusal is exit 2 with ``comfyserve ROLE: message`` on stderr and no
traceback; an environment value is checked by the parser of the role that has
the flag (and only by it); Ctrl-C ends a role cleanly.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVER_ROLES = ("standard", "queue", "api", "cluster")
TOKEN_ROLES = ("standard", "queue", "api")  # the cluster is protected by logins, not a token
WORKER = ["worker", "--queue-url", "http://127.0.0.1:1", "--instance-url", "http://127.0.0.1:2"]


def comfyserve(args: list[str], env: dict[str, str], timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["comfyserve", *args], env=env, capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL)


def assert_refused(result: subprocess.CompletedProcess[str], role: str, *words: str) -> None:
    assert result.returncode == 2, (role, result.returncode, result.stderr)
    assert f"comfyserve {role}: " in result.stderr, (role, result.stderr)
    assert "Traceback" not in result.stderr, (role, result.stderr)
    for word in words:
        assert word in result.stderr, (role, word, result.stderr)


def role_args(role: str, data: Path) -> list[str]:
    """The least a role needs to get as far as listening."""
    if role == "api":
        return [role, "--data-dir", str(data), "--instances", "0"]
    return [role, "--data-dir", str(data)]


@pytest.mark.parametrize("role", SERVER_ROLES)
def test_every_role_refuses_a_bad_port(role: str, tmp_path: Path, cli_env: dict[str, str]) -> None:
    assert_refused(comfyserve([*role_args(role, tmp_path / "d"), "--port", "0"], cli_env), role,
                   "--port", "1-65535")
    assert_refused(comfyserve([*role_args(role, tmp_path / "d"), "--port", "http"], cli_env), role, "--port")


def test_the_worker_refuses_a_bad_metrics_port(cli_env: dict[str, str]) -> None:
    assert_refused(comfyserve([*WORKER, "--metrics-port", "70000"], cli_env), "worker", "--metrics-port")
    env = {**cli_env, "COMFYSERVE_METRICS_PORT": "abc"}
    assert_refused(comfyserve(WORKER, env), "worker", "--metrics-port", "COMFYSERVE_METRICS_PORT='abc'")


@pytest.mark.parametrize("role", SERVER_ROLES)
def test_a_bad_environment_value_is_a_usage_error_naming_the_variable(role: str, tmp_path: Path,
                                                                      cli_env: dict[str, str]) -> None:
    env = {**cli_env, "COMFYSERVE_PORT": "abc"}
    assert_refused(comfyserve(role_args(role, tmp_path / "d"), env), role, "--port", "COMFYSERVE_PORT='abc'")
    env = {**cli_env, "COMFYSERVE_SHUTDOWN_TIMEOUT": "soon"}
    assert_refused(comfyserve(role_args(role, tmp_path / "d"), env), role, "COMFYSERVE_SHUTDOWN_TIMEOUT")


def test_a_bad_event_loop_from_the_environment_is_a_usage_error(tmp_path: Path, cli_env: dict[str, str]) -> None:
    env = {**cli_env, "COMFYSERVE_LOOP": "trio"}
    result = comfyserve(["init", "--data-dir", str(tmp_path / "d")], env)
    assert result.returncode == 2 and "COMFYSERVE_LOOP='trio': invalid choice" in result.stderr, result.stderr


def test_a_bad_environment_value_only_affects_the_roles_having_that_flag(tmp_path: Path,
                                                                         cli_env: dict[str, str]) -> None:
    env = {**cli_env, "COMFYSERVE_PORT": "abc", "COMFYSERVE_MAX_UPLOAD_SIZE": "big",
           "COMFYSERVE_METRICS_PORT": "abc"}
    data = tmp_path / "d"
    result = comfyserve(["users", "list", "--data-dir", str(data)], env)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    result = comfyserve(["init", "--data-dir", str(data)], env)
    assert result.returncode == 0 and f"data dir ready: {data}" in result.stdout, result.stderr
    result = comfyserve(["users", "--help"], env)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("role", TOKEN_ROLES)
def test_every_role_refuses_a_public_address_without_a_token_in_the_same_words(role: str, tmp_path: Path,
                                                                                cli_env: dict[str, str]) -> None:
    assert_refused(comfyserve([*role_args(role, tmp_path / "d"), "--listen"], cli_env), role,
                   "refusing to listen on 0.0.0.0 without a token: pass --token T (or COMFYSERVE_TOKEN), "
                   "or --no-auth to serve unauthenticated on purpose")
    assert_refused(comfyserve([*role_args(role, tmp_path / "d"), "--listen", "--token", " "], cli_env), role,
                   "--token must not be empty")


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("role", SERVER_ROLES)
def test_a_busy_port_is_a_refusal_for_every_server_role(role: str, tmp_path: Path, cli_env: dict[str, str],
                                                        busy_port: int) -> None:
    assert_refused(comfyserve([*role_args(role, tmp_path / role), "--port", str(busy_port)], cli_env), role,
                   "address already in use")


def test_a_busy_metrics_port_is_a_refusal_for_the_worker(cli_env: dict[str, str], busy_port: int) -> None:
    assert_refused(comfyserve([*WORKER, "--metrics-port", str(busy_port)], cli_env), "worker",
                   "--metrics-port", "address already in use")


def test_init_refuses_on_stderr(tmp_path: Path, cli_env: dict[str, str]) -> None:
    result = comfyserve(["init"], cli_env)
    assert_refused(result, "init", "--data-dir is required")
    assert result.stdout == ""
    (tmp_path / "file").write_text("not a folder")
    result = comfyserve(["init", "--data-dir", str(tmp_path / "file" / "d")], cli_env)
    assert_refused(result, "init", "cannot use the data dir")
    assert result.stdout == ""


def _read_until(fd: int, wanted: bytes, deadline: float) -> bytes:
    """What the terminal shows until ``wanted`` appears (or, with ``wanted`` empty, until it closes)."""
    seen = b""
    while not wanted or wanted not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"waited in vain for {wanted!r}; saw {seen!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the other side is closed
            chunk = b""
        if not chunk:
            assert not wanted, f"closed before {wanted!r}; saw {seen!r}"
            return seen
        seen += chunk
    return seen


def test_ctrl_c_at_the_password_prompt_ends_users_add_cleanly(tmp_path: Path, cli_env: dict[str, str]) -> None:
    main, terminal = pty.openpty()
    # Its own session: the prompt goes to this pseudo-terminal (stdin), not to the one running the tests.
    proc = subprocess.Popen(["comfyserve", "users", "add", "bob", "--data-dir", str(tmp_path / "d")],
                            env=cli_env, stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True)
    os.close(terminal)
    try:
        deadline = time.monotonic() + 60
        _read_until(main, b"Password for bob: ", deadline)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        shown = _read_until(main, b"", deadline)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)
    assert b"Traceback" not in shown and b"KeyboardInterrupt" not in shown, shown
    result = comfyserve(["users", "list", "--data-dir", str(tmp_path / "d")], cli_env)
    assert result.returncode == 0 and "bob" not in result.stdout


def test_a_role_start_imports_only_that_roles_package(cli_env: dict[str, str]) -> None:
    """Each start pays for its own role's imports, not every edition's (``api_edition.app`` alone is ~0.2 s)."""
    result = comfyserve(["users", "--help"], {**cli_env, "PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0 and "manage cluster-edition accounts" in result.stdout, result.stderr
    # (an entry point's own module is imported by importlib.import_module, which -X importtime does not list)
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert not {name for name in imported if name.split(".")[0] in ("api_edition", "queue_service")}, imported
    listed = comfyserve(["--help"], cli_env)  # no role named: all are listed, each with its help
    assert listed.returncode == 0 and "manage cluster-edition accounts" in listed.stdout, listed.stderr
    assert all(role in listed.stdout for role in (*SERVER_ROLES, "init", "worker", "users")), listed.stdout
