"""SIGTERM drains ``comfyserve standard``: no new prompts, the accepted ones finish, exit 0."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import websockets

from standard.ports import free_port
from support.cluster import graph as sleep_graph
from support.cluster import write_sleep_plugin
from support.processes import SHIM_DIR, VENV_BIN, wait_for_port
from support.server import drain_gate_graph, gated_graph, install_gate_plugin, open_gate, prompt_uuid, runs_of
from support.wait import until

START_TIMEOUT_S = 30.0


def start_standard(data_dir: Path, port: int, env: dict[str, str], log: Path, *extra: str) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen([str(VENV_BIN / "comfyserve"), "standard", "--port", str(port), "--data-dir",
                                 str(data_dir), *extra], env=env, stdout=out, stderr=subprocess.STDOUT)


async def next_event(ws: Any, kind: str, prompt_id: str, **match: Any) -> dict[str, Any]:
    """The next WS event of ``kind`` for ``prompt_id`` (and ``data`` fields equal to ``match``)."""
    while True:
        message = await asyncio.wait_for(ws.recv(), 30)
        if isinstance(message, bytes):
            continue
        event = json.loads(message)
        data = event.get("data") or {}
        if event["type"] == kind and data.get("prompt_id") == prompt_id and \
                all(data.get(k) == v for k, v in match.items()):
            return data


async def wait_status(http: httpx.AsyncClient, path: str, status: int) -> httpx.Response:
    async with asyncio.timeout(20):
        while (resp := await http.get(path)).status_code != status:
            await asyncio.sleep(0.02)
    return resp


async def test_sigterm_refuses_new_prompts_and_finishes_the_accepted_ones(tmp_path: Path, cli_env) -> None:
    from standard.datadir import init_data_dir

    data = init_data_dir(tmp_path / "d").root
    install_gate_plugin(data)
    port, log = free_port(), tmp_path / "standard.log"
    proc = start_standard(data, port, cli_env, log, "--shutdown-timeout", "45")
    try:
        await asyncio.to_thread(wait_for_port, port, START_TIMEOUT_S, proc)
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws?clientId=c") as ws, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as http:
            for prompt_id, gate in (("running", "g1"), ("queued", "g2")):
                resp = await http.post("/prompt", json={"prompt": gated_graph(gate, prompt_id), "client_id": "c",
                                                        "prompt_id": prompt_uuid(prompt_id)})
                assert resp.status_code == 200, resp.text
            await next_event(ws, "executing", prompt_uuid("running"), node="2")

            proc.send_signal(signal.SIGTERM)
            ready = await wait_status(http, "/readyz", 503)
            assert ready.json()["draining"] is True
            refused = await http.post("/prompt", json={"prompt": gated_graph("g3", "late")})
            assert refused.status_code == 503 and refused.headers["Retry-After"].isdigit()
            assert refused.json()["error"]["type"] == "server_draining"

            open_gate(data, "g1")
            await next_event(ws, "execution_success", prompt_uuid("running"))
            entry = (await http.get(f"/history/{prompt_uuid('running')}")).json()[prompt_uuid("running")]
            assert entry["status"]["status_str"] == "success"
            assert (data / "output" / "running_00001_.png").is_file()
            assert proc.poll() is None  # the queued prompt was accepted: it runs too

            open_gate(data, "g2")
            await next_event(ws, "execution_success", prompt_uuid("queued"))
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (data / "output" / "queued_00001_.png").is_file()
    assert not list((data / "output").glob("late*"))


async def test_past_the_timeout_the_running_prompt_is_interrupted_and_exit_is_0(tmp_path: Path, cli_env) -> None:
    from standard.datadir import init_data_dir

    data = init_data_dir(tmp_path / "d").root
    write_sleep_plugin(data)
    port, log = free_port(), tmp_path / "standard.log"
    proc = start_standard(data, port, cli_env, log, "--shutdown-timeout", "1")
    try:
        await asyncio.to_thread(wait_for_port, port, START_TIMEOUT_S, proc)
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws?clientId=c") as ws, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as http:
            for prompt_id in ("long", "never-started"):
                resp = await http.post("/prompt", json={"prompt": sleep_graph(prompt_id, seconds=600),
                                                        "client_id": "c", "prompt_id": prompt_uuid(prompt_id)})
                assert resp.status_code == 200, resp.text
            await next_event(ws, "executing", prompt_uuid("long"), node="2")
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await next_event(ws, "execution_interrupted", prompt_uuid("long"))
        assert await asyncio.to_thread(proc.wait, 20) == 0
        assert time.monotonic() - started < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert f"kept for the next start: {prompt_uuid('never-started')}" in text, text  # queued prompts stay on disk
    assert not list((data / "output").glob("*.png"))


def test_every_server_role_takes_shutdown_timeout_from_flag_or_environment(tmp_path: Path, cli_env) -> None:
    for role in ("standard", "queue", "api", "worker", "cluster"):
        result = subprocess.run([str(VENV_BIN / "comfyserve"), role, "--help"], env=cli_env, capture_output=True,
                                text=True, timeout=30)
        assert "--shutdown-timeout" in result.stdout and "COMFYSERVE_SHUTDOWN_TIMEOUT" in result.stdout, role
    result = subprocess.run([str(VENV_BIN / "comfyserve"), "standard", "--data-dir", str(tmp_path / "d")],
                            env={**cli_env, "COMFYSERVE_SHUTDOWN_TIMEOUT": "-1"}, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2 and "--shutdown-timeout" in result.stderr


async def test_real_comfyui_front_drains_its_child(tmp_path: Path, cli_env) -> None:
    """``--comfyui-dir``: new prompts get 503 (also on the fast path), the child's prompt finishes."""
    from standard.datadir import init_data_dir

    data = init_data_dir(tmp_path / "d").root
    install_gate_plugin(data)
    port, log = free_port(), tmp_path / "front.log"
    auth = {"Authorization": "T"}
    proc = start_standard(data, port, cli_env, log, "--token", "T", "--comfyui-dir", str(SHIM_DIR),
                          "--shutdown-timeout", "45")
    try:
        await asyncio.to_thread(wait_for_port, port, START_TIMEOUT_S, proc)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=auth, trust_env=False) as http:
            await wait_status(http, "/readyz", 200)
            resp = await http.post("/prompt", json={"prompt": drain_gate_graph("g", "kept"),
                                                    "prompt_id": prompt_uuid("kept")})
            assert resp.status_code == 200, resp.text
            await until(lambda: runs_of(data, "g") == 1, what="the prompt starting in the child")

            proc.send_signal(signal.SIGTERM)
            ready = await wait_status(http, "/readyz", 503)
            assert ready.json()["draining"] is True
            refused = await http.post("/prompt", json={"prompt": drain_gate_graph("g2", "late")})
            assert refused.status_code == 503 and refused.headers["Retry-After"].isdigit()
            assert proc.poll() is None
        open_gate(data, "g")
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (data / "output" / "kept_00001_.png").is_file()
    assert runs_of(data, "g") == 1 and runs_of(data, "g2") == 0


async def test_real_comfyui_child_is_interrupted_past_the_timeout(tmp_path: Path, cli_env) -> None:
    from standard.datadir import init_data_dir

    data = init_data_dir(tmp_path / "d").root
    install_gate_plugin(data)
    port, log = free_port(), tmp_path / "front.log"
    proc = start_standard(data, port, cli_env, log, "--token", "T", "--comfyui-dir", str(SHIM_DIR),
                          "--shutdown-timeout", "1")
    try:
        await asyncio.to_thread(wait_for_port, port, START_TIMEOUT_S, proc)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": "T"},
                                     trust_env=False) as http:
            await wait_status(http, "/readyz", 200)
            for prompt_id, gate in (("cut", "g"), ("dropped", "g2")):
                resp = await http.post("/prompt", json={"prompt": drain_gate_graph(gate, prompt_id),
                                                        "prompt_id": prompt_uuid(prompt_id)})
                assert resp.status_code == 200, resp.text
            await until(lambda: runs_of(data, "g") == 1, what="the prompt starting in the child")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        assert time.monotonic() - started < 20
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert f"kept for the next start: {prompt_uuid('dropped')}" in log.read_text()  # kept for the next start
    assert not list((data / "output").glob("*.png"))
    assert runs_of(data, "g2") == 0
