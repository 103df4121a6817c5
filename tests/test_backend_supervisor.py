"""``--comfyui-dir``: ComfyUI's main.py as a supervised child (tests/comfyui_shim stands in for it)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from standard.backend import app as backend_app
from standard.backend.app import create_backend_app
from standard.backend.supervisor import ComfyUIChild
from standard.client import InstanceClient
from standard.datadir import MODEL_FOLDERS, DataDir, init_data_dir
from standard.settings import StandardSettings
from support.metrics import kinds, parse, value
from support.processes import SHIM_DIR, alive
from support.server import gated_graph, install_gate_plugin, open_gate
from support.wait import until


@pytest.fixture
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "shim-starts.jsonl"
    monkeypatch.setenv("COMFYUI_SHIM_RECORD", str(path))
    return path


def starts(record: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


@pytest.fixture
def child_front(aiohttp_client: Any, tmp_path: Path, record: Path) -> Any:
    """``client, child = await child_front()``: the proxy app with a supervised shim child."""

    async def factory(data_dir: Path | None = None, extra_args: tuple[str, ...] = (),
                      **settings: Any) -> tuple[TestClient, ComfyUIChild]:
        root = data_dir or (tmp_path / "data")
        root.mkdir(parents=True, exist_ok=True)
        child = ComfyUIChild(SHIM_DIR, DataDir(root), poll_s=0.05, backoff_min_s=0.1, stop_timeout_s=5.0,
                             progress_log_s=0.3, extra_args=extra_args)
        app = create_backend_app(StandardSettings(data_dir=root, comfyui_dir=SHIM_DIR, **settings), backend=child)
        return await aiohttp_client(app), child

    return factory


async def wait_ready(client: TestClient, headers: dict[str, str] | None = None) -> dict[str, Any]:
    async def ready() -> bool:
        return (await client.get("/readyz", headers=headers)).status == 200

    await until(ready, timeout_s=45)
    return await (await client.get("/readyz", headers=headers)).json()


async def test_child_gets_the_data_dir_as_comfyuis_flags(child_front, record: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="comfyserve.backend")
    monkeypatch.setenv("COMFYUI_SHIM_DELAY_S", "1.5")
    monkeypatch.setenv("COMFYSERVE_TOKEN", "must-not-leak")
    root = tmp_path / "fresh"  # no custom_nodes yet: it must exist before ComfyUI starts
    client, child = await child_front(data_dir=root, extra_args=("--cpu", "--preview-method", "auto"))
    early = await client.get("/readyz")
    assert early.status == 503
    assert (await early.json())["error"] == "ComfyUI is starting"
    proxied = await client.get("/queue")  # waits for the child instead of failing
    assert proxied.status == 200
    status = await wait_ready(client)
    assert status["runtime"] == "comfyui-child" and status["starts"] == 1
    [start] = starts(record)
    argv = start["argv"]
    flags = dict(zip(argv[::2], argv[1::2]))
    assert flags["--listen"] == "127.0.0.1"
    assert int(flags["--port"]) == status["port"]
    assert flags["--base-directory"] == str(root)
    assert flags["--input-directory"] == str(root / "input")
    assert flags["--output-directory"] == str(root / "output")
    assert flags["--user-directory"] == str(root / "user")
    assert "--disable-auto-launch" in argv
    assert argv[-3:] == ["--cpu", "--preview-method", "auto"]
    assert start["unknown"] == ["--cpu", "--preview-method", "auto"]
    assert any("waiting for ComfyUI" in r.getMessage() for r in caplog.records)  # slow starts are reported
    assert start["custom_nodes_existed"] is True
    assert start["cwd"] == str(SHIM_DIR)
    [yaml_text] = start["model_paths"]
    assert f'base_path: "{root / "models"}"' in yaml_text
    assert all(f'{name}: "{name}"' in yaml_text for name in MODEL_FOLDERS)
    response = await client.get("/system_stats")
    assert response.status == 200
    assert "system" in await response.json()
    assert "must-not-leak" not in Path(f"/proc/{status['pid']}/environ").read_bytes().decode("latin-1")


async def test_requests_wait_for_a_starting_child_only_so_long(child_front, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMFYUI_SHIM_DELAY_S", "3")
    monkeypatch.setattr(backend_app, "REQUEST_WAIT_S", 0.3)
    client, child = await child_front()
    proxied = await client.get("/queue")
    assert proxied.status == 503
    assert proxied.headers["Retry-After"] == "1"
    assert (await proxied.json())["error"]["type"] == "backend_unavailable"


async def test_a_child_that_dies_is_started_again(child_front) -> None:
    client, child = await child_front()
    first = await wait_ready(client)
    os.kill(first["pid"], signal.SIGKILL)
    # a GET sent right into the crash waits for the new child and goes once more
    assert (await client.get("/queue")).status == 200

    async def replaced() -> bool:
        status = await (await client.get("/readyz")).json()
        return status["ready"] and status["pid"] not in (None, first["pid"])

    await until(replaced, timeout_s=45)
    status = await (await client.get("/readyz")).json()
    assert status["crashes"] == 1 and status["starts"] == 2 and status["last_exit"] == -signal.SIGKILL
    assert (await client.get("/queue")).status == 200
    metrics = parse(await (await client.get("/metrics")).text())
    assert kinds(metrics)["comfyserve_backend_crashes"] == "counter"
    assert value(metrics, "comfyserve_backend_crashes_total") == 1


async def test_restart_replaces_the_child(child_front, record: Path) -> None:
    client, child = await child_front(token="tok")
    headers = {"Authorization": "tok"}
    first = await wait_ready(client, headers)
    assert (await client.post("/restart")).status == 401
    restarting = asyncio.create_task(client.post("/api/restart", headers=headers))
    while child.base_url is not None:  # the old child is on its way out
        await asyncio.sleep(0.01)
    during = await client.get("/queue", headers=headers)  # waits for the new child
    assert during.status == 200
    response = await restarting
    assert response.status == 200
    body = await response.json()
    assert body["restarted"] is True and body["ready"] is True
    assert body["pid"] != first["pid"] and body["starts"] == 2 and body["crashes"] == 0
    assert not alive(first["pid"])
    assert len(starts(record)) == 2
    assert (await client.get("/queue", headers=headers)).status == 200


async def test_shutdown_stops_the_child(child_front) -> None:
    client, child = await child_front()
    status = await wait_ready(client)
    await client.close()
    assert not alive(status["pid"])
    assert child.proc is not None and child.proc.returncode is not None


async def test_restart_is_refused_while_a_prompt_runs(child_front, tmp_path: Path) -> None:
    root = init_data_dir(tmp_path / "gated").root
    install_gate_plugin(root)
    client, child = await child_front(data_dir=root)
    status = await wait_ready(client)
    async with InstanceClient(f"http://127.0.0.1:{status['port']}") as direct:
        prompt_id = await direct.submit(gated_graph("gate-r", "held"))

        async def running() -> bool:
            return bool((await direct.queue())["queue_running"])

        await until(running)
        response = await client.post("/restart")
        assert response.status == 409
        assert (await response.json())["error"]["type"] == "prompt_running"
        open_gate(root, "gate-r")

        async def finished() -> bool:
            return await direct.history_entry(prompt_id) is not None

        await until(finished)
    assert (await client.post("/restart")).status == 200
