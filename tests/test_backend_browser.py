"""The web UI in a real browser through the real-ComfyUI runtime (``--comfyui-dir``).

``comfyserve standard --comfyui-dir tests/comfyui_shim --token T`` supervises the
shim as its "ComfyUI" child and proxies everything to it; the page logs in on
the front, loads the frontend the child serves, queues a workflow and shows
its image, and the restart button replaces the child. Any 4xx/5xx the page
gets fails the test (the ``browser_session`` fixture of ``support.browser``).
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from support.browser import CHROMIUM, LOAD_TIMEOUT_MS, Instance, Session, run_template_from_ui
from support.processes import SHIM_DIR, alive, comfyserve_process
from support.server import gated_graph, install_gate_plugin, open_gate

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed"),
    pytest.mark.timeout(120),
]


@pytest.fixture
def browser_instance(tmp_path: Path, cli_env: dict[str, str], browser_token: str | None) -> Iterator[Instance]:
    """The front with a supervised child; ``Instance.api`` talks to the front."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "custom_nodes").mkdir()
    install_gate_plugin(data_dir)
    args = ["standard", "--data-dir", str(data_dir), "--comfyui-dir", str(SHIM_DIR)]
    args += ["--token", browser_token] if browser_token else []
    headers = {"Authorization": f"Bearer {browser_token}"} if browser_token else None
    with comfyserve_process(args, cli_env, tmp_path / "server.log", ready_headers=headers,
                            ready_timeout_s=45) as (proc, port):
        yield Instance(f"http://127.0.0.1:{port}", data_dir, proc, browser_token)


def test_web_ui_through_the_front_runs_a_workflow(browser_instance: Instance, browser_session: Session) -> None:
    page = browser_session.page
    status, object_info = browser_instance.api("GET", "/object_info")
    assert status == 200
    assert set(object_info) <= set(page.evaluate("Object.keys(LiteGraph.registered_node_types)"))
    # the image arrives over the proxied WebSocket (executed event), then loads through /view
    run_template_from_ui(page, "fronted")
    fetched = page.request.get(browser_instance.url + "/api/view?filename=fronted_00001_.png&type=output")
    assert fetched.status == 200
    with Image.open(io.BytesIO(fetched.body())) as png:
        assert png.size == (512, 512)
    assert (browser_instance.data_dir / "output" / "fronted_00001_.png").is_file()


def test_restart_button_replaces_the_child(browser_instance: Instance, browser_session: Session) -> None:
    page = browser_session.page
    first_pid = browser_instance.api("GET", "/readyz")[1]["pid"]
    page.wait_for_function("() => !!window.comfyserveLastRestart === false")
    page.evaluate("window.comfyserveLastRestart = null")
    page.evaluate("""() => app.extensionManager.command.execute('Comfyserve.RestartServer')""")
    page.wait_for_function("() => !!window.comfyserveLastRestart", timeout=LOAD_TIMEOUT_MS)
    result = page.evaluate("window.comfyserveLastRestart")
    assert result["ok"] and result["status"] == 200, result
    assert result["body"]["restarted"] is True and result["body"]["runtime"] == "comfyui-child"
    assert result["body"]["pid"] != first_pid and not alive(first_pid)

    # while the child runs a prompt, the front refuses (409) and the page says so
    status, queued = browser_instance.api("POST", "/prompt", {"prompt": gated_graph("gate-b", "held")})
    assert status == 200, queued
    deadline = time.monotonic() + 20
    while not browser_instance.api("GET", "/queue")[1]["queue_running"]:
        assert time.monotonic() < deadline, "the gated prompt never started"
        time.sleep(0.02)
    browser_session.allowed.add((409, "POST", browser_instance.url + "/api/restart"))
    page.evaluate("window.comfyserveLastRestart = null")
    page.evaluate("""() => app.extensionManager.command.execute('Comfyserve.RestartServer')""")
    page.wait_for_function("() => !!window.comfyserveLastRestart", timeout=LOAD_TIMEOUT_MS)
    assert page.evaluate("window.comfyserveLastRestart.status") == 409
    open_gate(browser_instance.data_dir, "gate-b")
    deadline = time.monotonic() + 20
    while queued["prompt_id"] not in browser_instance.api("GET", f"/history/{queued['prompt_id']}")[1]:
        assert time.monotonic() < deadline, "the gated prompt never finished"
        time.sleep(0.05)
