"""The cluster's admin page in a real browser (Chromium via Playwright): an admin steering the pool.

``comfyserve cluster --instances 2`` with an admin (root) and a user (alice, who works through the
API meanwhile). The admin sees whose task runs on which instance, removes that instance (after the
page asks), the task finishes on the other one, and the usage table counts what alice ran.
Only our own page is loaded (not ComfyUI's), so the test stays quick.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.browser import CHROMIUM, CHROMIUM_ARGS, LOAD_TIMEOUT_MS
from support.cluster import PASSWORD, graph, make_users, write_sleep_plugin
from support.processes import comfyserve_process

pytestmark = [pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed"),
              pytest.mark.timeout(150)]
WAIT_S = 60.0


@dataclass
class Proxy:
    url: str
    proc: subprocess.Popen
    alice: httpx.Client  # alice's API token


@pytest.fixture
def proxy(tmp_path: Path, cli_env: dict[str, str]) -> Iterator[Proxy]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    tokens = asyncio.run(make_users(data_dir, ("root", "alice"), admin="root"))
    write_sleep_plugin(data_dir)
    with comfyserve_process(["cluster", "--data-dir", str(data_dir), "--instances", "2"], cli_env,
                            tmp_path / "proxy.log", port_timeout_s=30, ready_timeout_s=30) as (proc, port):
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tokens['alice']}"},
                          trust_env=False, timeout=10) as alice:
            wait_for(lambda: httpx.get(url + "/readyz", timeout=5).json().get("instances_up") == 2, "both instances up")
            yield Proxy(url, proc, alice)


def wait_for(check: Callable[[], Any], what: str) -> Any:
    """Poll ``check`` until it returns something true (the proxy runs in another process: no event to wait on)."""
    deadline = time.monotonic() + WAIT_S
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return found


def submit(proxy: Proxy, prefix: str, color: int, seconds: float = 0.0) -> str:
    resp = proxy.alice.post("/prompt", json={"prompt": graph(prefix, color=color, seconds=seconds)})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["prompt_id"])


def finished(proxy: Proxy, prompt_id: str) -> dict[str, Any] | None:
    return proxy.alice.get(f"/history/{prompt_id}").json().get(prompt_id)


@pytest.fixture
def admin_page(proxy: Proxy) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = chromium.new_context().new_page()
            page.bad = []
            page.on("response", lambda r: r.status >= 400 and page.bad.append((r.status, r.request.method, r.url)))
            page.goto(proxy.url + "/admin")
            assert "/login" in page.url
            page.fill("input[name=name]", "root")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.locator("#instances").wait_for(timeout=LOAD_TIMEOUT_MS)
            yield page
        finally:
            chromium.close()


def test_admin_removes_the_busy_instance_and_the_task_finishes_elsewhere(proxy: Proxy, admin_page: Any) -> None:
    page = admin_page
    quick = submit(proxy, "quick", color=21)
    wait_for(lambda: finished(proxy, quick), "the quick task")
    moved = submit(proxy, "moved", color=22, seconds=30.0)  # long: it only ends in time if it is moved and cut

    def busy_row() -> Any:
        page.goto(proxy.url + "/admin")  # not reload(): that would post a form again
        row = page.locator("#instances tr", has_text=f"alice: {moved}")
        return row if row.count() == 1 else None

    row = wait_for(busy_row, "the admin page to show whose task runs where")
    busy_url = row.locator("td").first.inner_text()
    asked: list[str] = []
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
    row.get_by_role("button", name="Remove").click()
    assert asked and "A task running there is stopped and runs again on another instance" in asked[0]
    assert page.locator("#instances tr", has_text=busy_url).count() == 1, "dismissed: nothing happens"

    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Remove").click()
    page.get_by_text(f"Instance {busy_url} removed").wait_for(timeout=LOAD_TIMEOUT_MS)
    assert page.locator("#instances tr", has_text=busy_url).count() == 0
    # The task was handed back (not lost) and runs again on the other instance, from the start.
    row = wait_for(busy_row, "the moved task running on the other instance")
    assert row.locator("td").first.inner_text() != busy_url
    assert proxy.alice.post("/interrupt", json={"prompt_id": moved}).status_code == 200  # no need to wait 30 s
    entry = wait_for(lambda: finished(proxy, moved), "the moved task's end")
    assert any("removed by an admin" in note for note in entry["cluster"]["notes"])

    assert proxy.alice.get("/cluster/usage?days=1").status_code == 403  # the figures are for admins
    page.goto(proxy.url + "/admin?days=1")
    cells = page.locator("#usage tr", has_text="alice").locator("td").all_inner_texts()
    assert cells[:3] == ["alice", "2", "1"], cells  # the quick task, the moved one (interrupted: failed)
    report = page.evaluate("fetch('/cluster/usage?days=1').then(r => r.json())")
    row_json = next(r for r in report["users"] if r["user"] == "alice")
    assert (row_json["tasks"], row_json["failed"]) == (2, 1)
    assert float(cells[3]) == row_json["instance_seconds"] > 0
    assert re.fullmatch(r"[0-9]+(\.[0-9])?", cells[3])
    assert page.bad == []
