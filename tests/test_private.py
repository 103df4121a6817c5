"""Secrets: read from files, never served, never on a child's command line; their files private (0600)."""

from __future__ import annotations

import asyncio
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from aiohttp import web

from api_edition.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from standard.datadir import init_data_dir
from standard.ports import free_port
from support.api import TOKEN, ApiFactory, read_results
from support.backend import start_front
from support.processes import comfyserve_process, environ, wait_for_child, wait_for_port
from support.server import tiny_graph


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_token_file_is_read_and_bad_files_are_refused(tmp_path: Path, cli_env: dict[str, str]) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file-0123456789\n")
    args = ["standard", "--data-dir", str(tmp_path / "data"), "--token-file", str(token_file)]
    with comfyserve_process(args, cli_env, tmp_path / "standard.log",
                            ready_headers={"Authorization": "from-a-file-0123456789"}) as (proc, port):
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/queue", trust_env=False).status_code == 401
        assert httpx.get(f"{base}/queue", headers={"Authorization": "from-a-file-0123456789"},
                         trust_env=False).status_code == 200  # the trailing newline is not part of it
        assert b"from-a-file" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    empty = tmp_path / "empty"
    empty.write_text("\n")
    cases = {
        ("--token-file", str(tmp_path / "missing")): "cannot read",
        ("--token-file", str(empty)): "is empty",
        ("--token", "x" * 20, "--token-file", str(token_file)): "not both",
    }
    for flags, message in cases.items():
        done = subprocess.run(["comfyserve", "standard", "--data-dir", str(tmp_path / "data"), *flags],
                              env=cli_env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 2, done
        assert "--token" in done.stderr and message in done.stderr
    done = subprocess.run(["comfyserve", "queue", "--data-dir", str(tmp_path / "q"), "--port", "1"],
                          env={**cli_env, "COMFYSERVE_TOKEN_FILE": str(empty)}, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2 and "--token-file" in done.stderr and "is empty" in done.stderr


def test_system_stats_never_shows_the_command_line(tmp_path: Path, cli_env: dict[str, str]) -> None:
    secret = "cmdline-token-0123456789"
    args = ["standard", "--data-dir", str(tmp_path / "data"), "--token", secret]
    with comfyserve_process(args, cli_env, tmp_path / "standard.log",
                            ready_headers={"Authorization": secret}) as (_, port):
        response = httpx.get(f"http://127.0.0.1:{port}/system_stats", headers={"Authorization": secret},
                             trust_env=False)
    assert response.status_code == 200
    assert secret not in response.text and str(tmp_path) not in response.text
    assert response.json()["system"]["argv"] == ["comfyserve"]  # the web UI needs a list there


async def test_the_front_relays_comfyuis_system_stats_without_flag_values(tmp_path: Path) -> None:
    async def stats(request: web.Request) -> web.Response:  # what real ComfyUI answers
        return web.json_response({"system": {"os": "linux", "argv": [
            "/srv/ComfyUI/main.py", "--listen", "127.0.0.1", "--api-key=hunter2-secret", "--enable-manager"],
            "environ": {"SECRET": "hunter2-env"}}, "devices": []})

    comfyui = web.Application()
    comfyui.router.add_get("/system_stats", stats)
    runner = web.AppRunner(comfyui)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    backend_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        for fast in (True, False):
            front = await start_front(backend_url, init_data_dir(tmp_path / f"front-{fast}").root, fast=fast,
                                      token=TOKEN)
            try:
                async with aiohttp.ClientSession() as http:
                    for path in ("/system_stats", "/api/system_stats"):
                        async with http.get(f"http://127.0.0.1:{front.port}{path}",
                                            headers={"Authorization": TOKEN}) as response:
                            assert response.status == 200
                            text = await response.text()
                            body = await response.json()
                    assert "hunter2" not in text and "/srv/ComfyUI" not in text
                    assert body["system"]["argv"] == ["main.py", "--listen", "--api-key", "--enable-manager"]
                    assert body["system"]["os"] == "linux" and "environ" not in body["system"]
            finally:
                await front.close()
    finally:
        await runner.cleanup()


def test_api_instances_get_the_token_in_their_environment_only(tmp_path: Path, cli_env: dict[str, str]) -> None:
    token = "api-service-token-0123456789"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    data = tmp_path / "data"
    args = ["api", "--data-dir", str(data), "--instances", "1", "--token-file", str(token_file)]
    port = free_port()
    with (tmp_path / "api.log").open("wb") as log:
        proc = subprocess.Popen(["comfyserve", *args, "--port", str(port)], env=cli_env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout_s=30, proc=proc)
        child = wait_for_child(proc.pid, b"standard.cli")
        assert token.encode() not in Path(f"/proc/{child}/cmdline").read_bytes()
        assert token.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        child_env = environ(child)
        assert child_env["COMFYSERVE_TOKEN"] == token
        assert "COMFYSERVE_TOKEN_FILE" not in child_env
        queue_db = data / "queue" / "queue.sqlite3"
        for path in (queue_db, queue_db.with_name("queue.sqlite3-wal"), queue_db.with_name("queue.sqlite3-shm")):
            assert mode(path) == 0o600, path
        key_file = data / ".comfyserve" / "webhook_secret"
        assert mode(key_file) == 0o600 and mode(key_file.parent) == 0o700
        assert key_file.read_text().strip() != token
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def test_webhooks_are_signed_with_their_own_key_never_the_token(
        api: ApiFactory, instance_url: Any, aiohttp_server: Any, tmp_path: Path) -> None:
    received: asyncio.Queue[tuple[dict[str, str], bytes]] = asyncio.Queue()

    async def receiver(request: web.Request) -> web.Response:
        received.put_nowait((dict(request.headers), await request.read()))
        return web.Response(text="ok")

    hook_app = web.Application()
    hook_app.router.add_post("/hook", receiver)
    hook = await aiohttp_server(hook_app)
    data = init_data_dir(tmp_path / "api-data").root
    live = await api(instance_urls=(await instance_url(),), data_dir=data,
                     webhook_allow=(f"http://127.0.0.1:{hook.port}/hook",))
    await live.submit(tiny_graph("w"), task_id="hooked", webhook=f"http://127.0.0.1:{hook.port}/hook")
    async with live.sink() as sink:
        await read_results(sink, 1)
    headers, body = await asyncio.wait_for(received.get(), 10)
    key = (data / ".comfyserve" / "webhook_secret").read_text().strip()
    assert len(key) >= 32 and key != TOKEN
    assert verify(key, headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
    assert not verify(TOKEN, headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])


def test_our_own_children_run_in_dev_mode_when_we_do(cli_env: dict[str, str]) -> None:
    """``-X dev`` is a flag, not inherited: child_environment passes it on to our roles, never to ComfyUI."""
    code = ("from standard.private import child_environment as env; "
            "print(env().get('PYTHONDEVMODE'), env(third_party=True).get('PYTHONDEVMODE'))")
    base = {k: v for k, v in cli_env.items() if k != "PYTHONDEVMODE"}
    dev = subprocess.run([sys.executable, "-X", "dev", "-c", code], env=base, capture_output=True, text=True,
                         timeout=60, stdin=subprocess.DEVNULL)
    plain = subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
    assert dev.stdout.split() == ["1", "None"], dev.stderr
    assert plain.stdout.split() == ["None", "None"], plain.stderr
