"""The real ComfyUI frontend in a real browser against a real instance (Chromium via Playwright).

Each test starts ``comfyserve standard --token T`` on a fresh data dir, logs in
through /login like a person would, and fails on any 4xx/5xx the page gets.
Requests to anything but the instance are cut off, so the test is offline.
Skipped only when /usr/bin/chromium is missing (scripts/setup.sh --test installs it).
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from support.browser import CHROMIUM, LOAD_TIMEOUT_MS, Instance, Session, run_template_from_ui
from support.processes import comfyserve_process
from support.server import gated_graph, install_gate_plugin, open_gate

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed"),
    pytest.mark.timeout(180),  # on a loaded machine the server's start and the web UI's take long (READY_TIMEOUT_S)
]


@pytest.fixture
def browser_instance(tmp_path: Path, cli_env: dict[str, str], browser_token: str | None) -> Iterator[Instance]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "custom_nodes").mkdir()
    install_gate_plugin(data_dir)
    args = ["standard", "--data-dir", str(data_dir)] + (["--token", browser_token] if browser_token else [])
    headers = {"Authorization": f"Bearer {browser_token}"} if browser_token else None
    with comfyserve_process(args, cli_env, tmp_path / "server.log", ready_headers=headers, port_timeout_s=60,
                            ready_timeout_s=60, stop_timeout_s=15) as (proc, port):
        yield Instance(f"http://127.0.0.1:{port}", data_dir, proc, browser_token)


def test_web_ui_lists_the_engine_nodes_and_runs_a_workflow(browser_instance: Instance,
                                                           browser_session: Session) -> None:
    page = browser_session.page
    status, object_info = browser_instance.api("GET", "/object_info")
    assert status == 200
    registered = set(page.evaluate("Object.keys(LiteGraph.registered_node_types)"))
    assert set(object_info) <= registered
    assert "KSampler" not in registered
    assert page.evaluate("!!document.querySelector('button[aria-label=\"Restart server\"]')")

    # A fresh data dir opens the template browser; ours runs without model weights.
    page.get_by_text("Empty image").first.click(timeout=LOAD_TIMEOUT_MS)
    page.wait_for_function("() => app.graph.nodes.length === 2")
    assert sorted(page.evaluate("app.graph.nodes.map(n => n.type)")) == ["EmptyImage", "SaveImage"]

    # The click is done when the page has queued the prompt; then its image is awaited.
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/prompt"),
                              timeout=LOAD_TIMEOUT_MS) as queued:
        page.click("[data-testid=queue-button]")
    assert queued.value.status == 200
    deadline = time.monotonic() + LOAD_TIMEOUT_MS / 1000
    output = browser_instance.data_dir / "output" / "ComfyUI_00001_.png"
    while not output.exists():
        assert time.monotonic() < deadline, "the queued workflow never wrote its image"
        time.sleep(0.05)

    page.click("[data-testid=queue-overlay-toggle]")
    image = page.locator("img[src*='/view?filename=ComfyUI_00001_.png']").first
    image.wait_for(state="visible", timeout=LOAD_TIMEOUT_MS)
    src = image.get_attribute("src")
    fetched = page.request.get(src if src.startswith("http") else browser_instance.url + src)
    assert fetched.status == 200
    with Image.open(io.BytesIO(fetched.body())) as png:
        assert png.size == (512, 512)
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=image.element_handle(),
                           timeout=LOAD_TIMEOUT_MS)

    # The node search offers the engine's nodes: add one by typing its name.
    page.keyboard.press("Escape")
    page.mouse.dblclick(300, 650)
    page.keyboard.type("ImageInvert")
    page.get_by_text("Invert Image").first.wait_for(timeout=LOAD_TIMEOUT_MS)
    page.keyboard.press("Enter")
    page.wait_for_function("() => app.graph.nodes.some(n => n.type === 'ImageInvert')")


def test_restart_button_reloads_and_reports(browser_instance: Instance, browser_session: Session) -> None:
    page = browser_session.page
    # Close the template browser a fresh data dir opens with.
    page.get_by_text("Empty image").first.wait_for(timeout=LOAD_TIMEOUT_MS)
    page.keyboard.press("Escape")
    page.locator("[data-testid=dialog-overlay]").wait_for(state="detached", timeout=LOAD_TIMEOUT_MS)
    button = page.locator("button[aria-label='Restart server']")
    button.click()
    page.get_by_text("Server restarted").first.wait_for(timeout=LOAD_TIMEOUT_MS)
    page.wait_for_function("() => !!window.comfyserveLastRestart")
    result = page.evaluate("window.comfyserveLastRestart")
    assert result["ok"] and result["status"] == 200
    assert result["body"]["restarted"] is True and result["body"]["ready"] is True
    assert result["body"]["nodes"] == len(browser_instance.api("GET", "/object_info")[1])

    # While a prompt runs the server refuses (409) and the button says so.
    status, queued = browser_instance.api("POST", "/prompt", {"prompt": gated_graph("gate-1", "gated")})
    assert status == 200, queued
    deadline = time.monotonic() + 20
    while not browser_instance.api("GET", "/queue")[1]["queue_running"]:
        assert time.monotonic() < deadline, "the gated prompt never started"
        time.sleep(0.02)
    browser_session.allowed.add((409, "POST", browser_instance.url + "/api/restart"))
    page.evaluate("window.comfyserveLastRestart = null")
    button.click()
    page.get_by_text("Restart refused").first.wait_for(timeout=LOAD_TIMEOUT_MS)
    assert page.evaluate("window.comfyserveLastRestart.status") == 409
    open_gate(browser_instance.data_dir, "gate-1")
    deadline = time.monotonic() + 20
    while queued["prompt_id"] not in browser_instance.api("GET", f"/history/{queued['prompt_id']}")[1]:
        assert time.monotonic() < deadline, "the gated prompt never finished"
        time.sleep(0.05)


@pytest.mark.parametrize("browser_token", [None])
def test_web_ui_without_token_on_loopback(browser_instance: Instance, browser_session: Session) -> None:
    """No token: loopback only, no login page; the app's own JS API queues a workflow."""
    page = browser_session.page
    assert "/login" not in page.url
    run_template_from_ui(page, "nologin")
    assert (browser_instance.data_dir / "output" / "nologin_00001_.png").is_file()


def test_user_menu_logs_the_token_session_out(browser_instance: Instance, browser_session: Session) -> None:
    page = browser_session.page
    page.get_by_text("Empty image").first.wait_for(timeout=LOAD_TIMEOUT_MS)
    page.keyboard.press("Escape")
    page.locator("[data-testid=dialog-overlay]").wait_for(state="detached", timeout=LOAD_TIMEOUT_MS)
    assert not page.locator("[data-testid=login-button]").is_visible()  # no Comfy.org sign-in
    page.locator("button[aria-label='Signed in with the token']").click()
    menu = page.locator("#comfyserve-user-menu")
    assert menu.locator("[role=menuitem]").all_inner_texts() == ["Log out"]
    menu.get_by_text("Log out").click()
    page.wait_for_url("**/login**", timeout=LOAD_TIMEOUT_MS)
    page.goto(browser_instance.url + "/")
    assert "/login" in page.url
