"""``comfyserve standard`` and ``python -m standard`` as real processes."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx

from standard.ports import free_port
from support.processes import START_TIMEOUT_S, VENV_BIN, start_cli, stop_cli, wait_for_port
from support.server import gated_graph, install_gate_plugin


def test_comfyserve_standard_serves_and_stops_on_sigterm(tmp_path: Path, cli_env: dict[str, str]) -> None:
    port = free_port()
    data = tmp_path / "data"
    proc = start_cli([str(VENV_BIN / "comfyserve"), "standard", "--data-dir", str(data), "--port", str(port)], cli_env)
    try:
        wait_for_port(port, START_TIMEOUT_S, proc)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/healthz").status_code == 200
        assert httpx.get(f"{base}/api/queue").json() == {"queue_running": [], "queue_pending": []}
        assert httpx.get(f"{base}/prompt").json() == {"exec_info": {"queue_remaining": 0}}
        # the data dir was created from the template
        for folder in ("input", "output", "temp", "user", "custom_nodes", "models/checkpoints"):
            assert (data / folder).is_dir(), folder
    finally:
        code, out, err = stop_cli(proc)
    assert code == 0, err
    assert "listening on http://127.0.0.1" in out


def test_python_m_standard_listen_with_token(tmp_path: Path, cli_env: dict[str, str]) -> None:
    port = free_port()
    proc = start_cli([sys.executable, "-m", "standard", "--listen", "--port", str(port),
                   "--data-dir", str(tmp_path / "d"), "--token", "T0k"], cli_env)
    try:
        wait_for_port(port, START_TIMEOUT_S, proc)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/healthz").status_code == 200
        assert httpx.get(f"{base}/queue").status_code == 401
        assert httpx.get(f"{base}/queue", headers={"Authorization": "T0k"}).status_code == 200
        assert httpx.get(f"{base}/queue", headers={"Authorization": "Bearer T0k"}).status_code == 200
    finally:
        code, out, err = stop_cli(proc)
    assert code == 0, err
    assert "listening on http://0.0.0.0" in out


def test_token_from_environment(tmp_path: Path, cli_env: dict[str, str]) -> None:
    port = free_port()
    env = {**cli_env, "COMFYSERVE_TOKEN": "envtok", "COMFYSERVE_PORT": str(port),
           "COMFYSERVE_DATA_DIR": str(tmp_path / "d")}
    proc = start_cli([str(VENV_BIN / "comfyserve"), "standard"], env)
    try:
        wait_for_port(port, START_TIMEOUT_S, proc)
        assert httpx.get(f"http://127.0.0.1:{port}/queue").status_code == 401
        assert httpx.get(f"http://127.0.0.1:{port}/queue", headers={"Authorization": "envtok"}).status_code == 200
    finally:
        stop_cli(proc)


def test_non_loopback_without_token_is_refused(tmp_path: Path, cli_env: dict[str, str]) -> None:
    result = subprocess.run(
        [str(VENV_BIN / "comfyserve"), "standard", "--listen", "--port", str(free_port()),
         "--data-dir", str(tmp_path / "d")],
        env=cli_env, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a token" in result.stderr


def test_no_auth_opts_out_on_purpose(tmp_path: Path, cli_env: dict[str, str]) -> None:
    port = free_port()
    proc = start_cli([str(VENV_BIN / "comfyserve"), "standard", "--listen", "0.0.0.0", "--no-auth",
                   "--port", str(port), "--data-dir", str(tmp_path / "d")], cli_env)
    try:
        wait_for_port(port, START_TIMEOUT_S, proc)
        assert httpx.get(f"http://127.0.0.1:{port}/queue").status_code == 200
    finally:
        code, _, err = stop_cli(proc)
    assert code == 0, err


def test_bad_flags_exit_2_with_a_message(tmp_path: Path, cli_env: dict[str, str]) -> None:
    cases = [
        ([], "--data-dir is required"),
        (["--data-dir", str(tmp_path / "d"), "--max-upload-size", "0"], "--max-upload-size"),
        (["--data-dir", str(tmp_path / "d"), "--token", " "], "--token must not be empty"),
        (["--data-dir", str(tmp_path / "d"), "--comfyui-dir", str(tmp_path), "--backend-url", "http://x"],
         "exclude each other"),
    ]
    for args, message in cases:
        result = subprocess.run([str(VENV_BIN / "comfyserve"), "standard", *args],
                                env=cli_env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)


def test_help_names_every_flag_and_its_environment_variable(cli_env: dict[str, str]) -> None:
    result = subprocess.run([str(VENV_BIN / "comfyserve"), "standard", "--help"],
                            env=cli_env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for flag in ("--data-dir", "--listen", "--port", "--token", "--no-auth", "--max-upload-size",
                 "--comfyui-dir", "--comfyui-python", "--backend-url"):
        assert flag in result.stdout
        assert "COMFYSERVE_" + flag[2:].replace("-", "_").upper() in result.stdout


async def test_sigterm_during_a_prompt_interrupts_and_exits_within_the_limit(tmp_path: Path, cli_env) -> None:
    import asyncio
    import json
    import time

    import websockets

    from standard.datadir import init_data_dir

    data = init_data_dir(tmp_path / "d").root
    install_gate_plugin(data)
    port = free_port()
    proc = start_cli([str(VENV_BIN / "comfyserve"), "standard", "--port", str(port), "--data-dir", str(data),
                   "--shutdown-timeout", "1"], cli_env)
    try:
        await asyncio.to_thread(wait_for_port, port, START_TIMEOUT_S, proc)
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws?clientId=t") as ws, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            resp = await http.post("/prompt", json={"prompt": gated_graph("never", "x"), "client_id": "t"})
            assert resp.status_code == 200
            while True:
                event = json.loads(await asyncio.wait_for(ws.recv(), 20))
                if event["type"] == "executing" and event["data"].get("node") == "2":
                    break
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 20)
            assert code == 0
            assert time.monotonic() - started < 8
    finally:
        stop_cli(proc)
