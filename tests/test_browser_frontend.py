"""The real ComfyUI frontend in a real browser against a real instance (Chromium via Playwright).

Each test starts ``comfyserve standard --token T`` on a fresh data dir, logs in
through /login like a person would, and fails on any 4xx/5xx the page gets.
Requests to anything but the instance are cut off, so the test is offline.
Skipped only when /usr/bin/chromium is missing (scripts/setup.sh --test installs it).
"""

from __future__ import annotations

import io
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import comfyserve_process
from PIL import Image
from test_server_support import gated_graph, install_gate_plugin, open_gate

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "browser-test-token"
LOAD_TIMEOUT_MS = 30_000

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed"),
]


@dataclass
class Instance:
    url: str
    data_dir: Path
    proc: subprocess.Popen
    token: str | None

    def api(self, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
        """A call to the instance from the test itself (not the page), with the token."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json",
                                                  **({"Authorization": f"Bearer {self.token}"}
                                                     if self.token else {})})
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")


@pytest.fixture
def token() -> str | None:
    """Token auth on, unless a test overrides this fixture."""
    return TOKEN


@pytest.fixture
def instance(tmp_path: Path, cli_env: dict[str, str], token: str | None) -> Iterator[Instance]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "custom_nodes").mkdir()
    install_gate_plugin(data_dir)
    args = ["standard", "--data-dir", str(data_dir)] + (["--token", token] if token else [])
    headers = {"Authorization": f"Bearer {token}"} if token else None
    with comfyserve_process(args, cli_env, tmp_path / "server.log", ready_headers=headers,
                            stop_timeout_s=15) as (proc, port):
        yield Instance(f"http://127.0.0.1:{port}", data_dir, proc, token)


@dataclass
class Session:
    page: object
    bad: list[tuple[int, str, str]] = field(default_factory=list)
    allowed: set[tuple[int, str, str]] = field(default_factory=set)

    def unexpected(self) -> list[tuple[int, str, str]]:
        return [entry for entry in self.bad if (entry[0], entry[1], entry[2].split("?")[0]) not in self.allowed]


@pytest.fixture
def browser_session(instance: Instance) -> Iterator[Session]:
    """A page (logged in with the token, if any) that has loaded the web UI completely."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            context.route(lambda url: not url.startswith(instance.url + "/"), lambda route: route.abort())
            page = context.new_page()
            session = Session(page)
            page.on("response", lambda r: r.status >= 400 and session.bad.append(
                (r.status, r.request.method, r.url)))
            # Transport failures count too; ERR_ABORTED is the page cancelling a fetch
            # itself (fetchApi aborts its timeout controller on bodies it never reads).
            page.on("requestfailed", lambda r: r.url.startswith(instance.url) and r.failure != "net::ERR_ABORTED"
                    and session.bad.append((0, r.method, f"{r.url} ({r.failure})")))
            page.goto(instance.url + "/")
            if instance.token is not None:
                assert "/login" in page.url, "the web UI must ask for the token first"
                page.fill("input[name=token]", instance.token)
                page.click("button[type=submit]")
            page.wait_for_function(
                "() => !!(window.app && window.app.graph && window.LiteGraph"
                " && window.LiteGraph.registered_node_types['EmptyImage'])",
                timeout=LOAD_TIMEOUT_MS,
            )
            yield session
            assert session.unexpected() == [], f"the page got error responses: {session.unexpected()}"
        finally:
            browser.close()


def test_web_ui_lists_the_engine_nodes_and_runs_a_workflow(instance: Instance, browser_session: Session) -> None:
    page = browser_session.page
    status, object_info = instance.api("GET", "/object_info")
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
    output = instance.data_dir / "output" / "ComfyUI_00001_.png"
    while not output.exists():
        assert time.monotonic() < deadline, "the queued workflow never wrote its image"
        time.sleep(0.05)

    page.click("[data-testid=queue-overlay-toggle]")
    image = page.locator("img[src*='/view?filename=ComfyUI_00001_.png']").first
    image.wait_for(state="visible", timeout=LOAD_TIMEOUT_MS)
    src = image.get_attribute("src")
    fetched = page.request.get(src if src.startswith("http") else instance.url + src)
    assert fetched.status == 200
    with Image.open(io.BytesIO(fetched.body())) as png:
        assert png.size == (512, 512)
    assert page.evaluate("(img) => img.naturalWidth", image.element_handle()) > 0

    # The node search offers the engine's nodes: add one by typing its name.
    page.keyboard.press("Escape")
    page.mouse.dblclick(300, 650)
    page.keyboard.type("ImageInvert")
    page.get_by_text("Invert Image").first.wait_for(timeout=LOAD_TIMEOUT_MS)
    page.keyboard.press("Enter")
    page.wait_for_function("() => app.graph.nodes.some(n => n.type === 'ImageInvert')")


def test_restart_button_reloads_and_reports(instance: Instance, browser_session: Session) -> None:
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
    assert result["body"]["nodes"] == len(instance.api("GET", "/object_info")[1])

    # While a prompt runs the server refuses (409) and the button says so.
    status, queued = instance.api("POST", "/prompt", {"prompt": gated_graph("gate-1", "gated")})
    assert status == 200, queued
    deadline = time.monotonic() + 20
    while not instance.api("GET", "/queue")[1]["queue_running"]:
        assert time.monotonic() < deadline, "the gated prompt never started"
        time.sleep(0.02)
    browser_session.allowed.add((409, "POST", instance.url + "/api/restart"))
    page.evaluate("window.comfyserveLastRestart = null")
    button.click()
    page.get_by_text("Restart refused").first.wait_for(timeout=LOAD_TIMEOUT_MS)
    assert page.evaluate("window.comfyserveLastRestart.status") == 409
    open_gate(instance.data_dir, "gate-1")
    deadline = time.monotonic() + 20
    while queued["prompt_id"] not in instance.api("GET", f"/history/{queued['prompt_id']}")[1]:
        assert time.monotonic() < deadline, "the gated prompt never finished"
        time.sleep(0.05)


def run_template_from_ui(page, filename_prefix: str) -> None:
    """Load the empty-image template in the app, queue it under ``filename_prefix`` with the app's
    own JS API, and wait until its first image shows among the node outputs (the executed event)."""
    page.evaluate("""async (prefix) => {
        const response = await fetch('/templates/comfyserve_empty_image.json');
        await app.loadGraphData(await response.json());
        app.graph.nodes.find(n => n.type === 'SaveImage').widgets[0].value = prefix;
        await app.queuePrompt(0, 1);
    }""", filename_prefix)
    page.wait_for_function("(name) => !!(app.nodeOutputs && Object.values(app.nodeOutputs).some("
                           "o => (o.images || []).some(i => i.filename === name)))",
                           arg=f"{filename_prefix}_00001_.png", timeout=LOAD_TIMEOUT_MS)


@pytest.mark.parametrize("token", [None])
def test_web_ui_without_token_on_loopback(instance: Instance, browser_session: Session) -> None:
    """No token: loopback only, no login page; the app's own JS API queues a workflow."""
    page = browser_session.page
    assert "/login" not in page.url
    run_template_from_ui(page, "nologin")
    assert (instance.data_dir / "output" / "nologin_00001_.png").is_file()
