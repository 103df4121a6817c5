"""The cluster edition in a real browser: two users, two browser contexts, one pool.

Starts ``comfyserve cluster --instances 2`` on a fresh data dir (two real
embedded-engine instances behind the proxy), logs two users in through our
login page in separate Chromium contexts, has each queue the default workflow
from the real ComfyUI frontend, and checks that each sees their own result
and nothing of the other's. Any 4xx/5xx the pages get fails the test.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support.browser import CHROMIUM, CHROMIUM_ARGS, LOAD_TIMEOUT_MS, web_ui_starting
from support.cluster import PASSWORD, make_users
from support.processes import comfyserve_process

pytestmark = [pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed"),
              pytest.mark.timeout(150)]


@dataclass
class Proxy:
    url: str
    data_dir: Path
    proc: subprocess.Popen


@pytest.fixture
def proxy(tmp_path: Path, cli_env: dict[str, str]) -> Iterator[Proxy]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    asyncio.run(make_users(data_dir, ("alice", "bob")))
    with comfyserve_process(["cluster", "--data-dir", str(data_dir), "--instances", "2"], cli_env,
                            tmp_path / "proxy.log", port_timeout_s=30, ready_timeout_s=30) as (proc, port):
        yield Proxy(f"http://127.0.0.1:{port}", data_dir, proc)


@dataclass
class UserPage:
    name: str
    page: object
    bad: list[tuple[int, str, str]] = field(default_factory=list)


def _open(browser: object, proxy: Proxy, name: str) -> UserPage:
    context = browser.new_context(viewport={"width": 1280, "height": 800})  # type: ignore[attr-defined]
    context.route(lambda url: not url.startswith(proxy.url + "/"), lambda route: route.abort())
    page = context.new_page()
    user = UserPage(name, page)
    page.on("response", lambda r: r.status >= 400 and user.bad.append((r.status, r.request.method, r.url)))
    page.on("requestfailed", lambda r: r.url.startswith(proxy.url) and r.failure != "net::ERR_ABORTED"
            and user.bad.append((0, r.method, f"{r.url} ({r.failure})")))
    page.goto(proxy.url + "/")
    assert "/login" in page.url, "the cluster must ask who you are first"
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", PASSWORD)
    with web_ui_starting(page):
        page.click("button[type=submit]")
    return user


def _fetch_json(page: object, path: str) -> object:
    return page.evaluate(f"fetch({json.dumps(path)}).then(r => r.json())")  # type: ignore[attr-defined]


def test_two_users_queue_from_the_web_ui_and_each_sees_only_their_own(proxy: Proxy) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            users = [_open(browser, proxy, "alice"), _open(browser, proxy, "bob")]
            for user in users:
                page = user.page
                page.get_by_text("Empty image").first.click(timeout=LOAD_TIMEOUT_MS)
                page.wait_for_function("() => app.graph.nodes.length === 2")
                page.click("[data-testid=queue-button]")
            for user in users:
                output = proxy.data_dir / "users" / user.name / "output" / "ComfyUI_00001_.png"
                deadline = time.monotonic() + 30
                while not output.exists():
                    assert time.monotonic() < deadline, f"{user.name}'s workflow never wrote its image"
                    time.sleep(0.05)
            assert not list((proxy.data_dir / "output").glob("*.png"))
            histories = {}
            for user in users:
                page = user.page
                page.click("[data-testid=queue-overlay-toggle]")
                image = page.locator("img[src*='/view?filename=ComfyUI_00001_.png']").first
                image.wait_for(state="visible", timeout=LOAD_TIMEOUT_MS)
                page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=image.element_handle(),
                           timeout=LOAD_TIMEOUT_MS)
                deadline = time.monotonic() + 10
                while not (history := _fetch_json(page, "/api/history")):
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
                histories[user.name] = history
                assert len(history) == 1
                jobs = _fetch_json(page, "/api/jobs")
                assert [job["id"] for job in jobs["jobs"]] == list(history)
            alice_id, bob_id = list(histories["alice"]), list(histories["bob"])
            assert alice_id != bob_id
            assert _fetch_json(users[0].page, f"/api/history/{bob_id[0]}") == {}
            for user in users:
                assert user.bad == [], f"{user.name}'s page got error responses: {user.bad}"
        finally:
            browser.close()
