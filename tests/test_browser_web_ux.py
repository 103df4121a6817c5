"""The web experience around ComfyUI in a real browser (Chromium via Playwright), cluster edition.

``comfyserve cluster --instances 1`` on a fresh data dir with an admin (alice) and a user (bob),
each in their own browser context: the user menu our frontend extension adds (name, dashboard,
account, admin for admins, log out), a revoked session taking the page to /login, and the
cluster's own WebSocket messages being known to the frontend.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support.browser import CHROMIUM, LOAD_TIMEOUT_MS, fresh_contexts, run_async, web_ui_starting
from support.cluster import PASSWORD, graph, make_users, write_sleep_plugin
from support.processes import comfyserve_process

pytestmark = [pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed"),
              pytest.mark.timeout(180)]


@dataclass
class Proxy:
    url: str
    data_dir: Path
    proc: subprocess.Popen


@dataclass
class UserPage:
    name: str
    page: object
    bad: list[tuple[int, str, str]] = field(default_factory=list)
    console: list[str] = field(default_factory=list)


@pytest.fixture
def proxy(tmp_path: Path, cli_env: dict[str, str]) -> Iterator[Proxy]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    run_async(make_users(data_dir, ("alice", "bob"), admin="alice"))
    write_sleep_plugin(data_dir)
    with comfyserve_process(["cluster", "--data-dir", str(data_dir), "--instances", "1"], cli_env,
                            tmp_path / "proxy.log", port_timeout_s=30, ready_timeout_s=30) as (proc, port):
        yield Proxy(f"http://127.0.0.1:{port}", data_dir, proc)


@pytest.fixture
def browser(chromium: object) -> Iterator[object]:
    yield from fresh_contexts(chromium)


def login(browser: object, proxy: Proxy, name: str) -> UserPage:
    """A new browser context for ``name``, logged in through /login, with the ComfyUI page loaded."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})  # type: ignore[attr-defined]
    context.route(lambda url: not url.startswith(proxy.url + "/"), lambda route: route.abort())
    page = context.new_page()
    user = UserPage(name, page)
    page.on("response", lambda r: r.status >= 400 and user.bad.append((r.status, r.request.method, r.url)))
    page.on("console", lambda m: user.console.append(f"{m.type}: {m.text}"))
    page.goto(proxy.url + "/")
    assert "/login" in page.url
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", PASSWORD)
    with web_ui_starting(page):
        page.click("button[type=submit]")
    close_templates(page)
    return user


def close_templates(page: object) -> None:
    """A fresh account's first visit opens the template browser: close it."""
    page.get_by_text("Empty image").first.wait_for(timeout=LOAD_TIMEOUT_MS)  # type: ignore[attr-defined]
    page.keyboard.press("Escape")  # type: ignore[attr-defined]
    page.locator("[data-testid=dialog-overlay]").wait_for(state="detached", timeout=LOAD_TIMEOUT_MS)  # type: ignore


def poll(user: UserPage, script: str, timeout_s: float = 120.0) -> object:
    """The first truthy result of the page running ``script`` (an async function), checked every 0.2 s."""
    deadline = time.monotonic() + timeout_s
    while not (result := user.page.evaluate(script)):  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, f"never true: {script}"
        time.sleep(0.2)
    return result


def open_user_menu(user: UserPage) -> list[str]:
    page = user.page
    page.locator(f"button[aria-label='Signed in as {user.name}']").click(timeout=LOAD_TIMEOUT_MS)
    menu = page.locator("#comfyserve-user-menu")
    menu.wait_for(timeout=LOAD_TIMEOUT_MS)
    return menu.locator("[role=menuitem]").all_inner_texts()


def test_user_menu_names_the_user_and_links_their_pages(proxy: Proxy, browser: object) -> None:
    alice, bob = login(browser, proxy, "alice"), login(browser, proxy, "bob")
    assert open_user_menu(alice) == ["Dashboard", "My account", "Admin", "Log out"]
    assert alice.page.locator("#comfyserve-user-menu .who").inner_text().split() == ["alice", "admin"]
    assert open_user_menu(bob) == ["Dashboard", "My account", "Log out"]
    # Comfy.org's cloud sign-in is not offered: accounts here are the server's.
    assert not bob.page.locator("[data-testid=login-button]").is_visible()

    bob.page.locator("#comfyserve-user-menu [role=menuitem]", has_text="Dashboard").click()
    bob.page.wait_for_url(proxy.url + "/dashboard")
    assert "bob" in bob.page.locator("nav").inner_text()
    bob.page.go_back()
    bob.page.wait_for_function("() => !!(window.app && window.app.graph)", timeout=LOAD_TIMEOUT_MS)

    open_user_menu(alice)
    alice.page.locator("#comfyserve-user-menu [role=menuitem]", has_text="Admin").click()
    alice.page.wait_for_url(proxy.url + "/admin")
    alice.page.go_back()
    alice.page.wait_for_function("() => !!(window.app && window.app.graph)", timeout=LOAD_TIMEOUT_MS)

    open_user_menu(alice)
    alice.page.locator("#comfyserve-user-menu [role=menuitem]", has_text="Log out").click()
    alice.page.wait_for_url("**/login")
    alice.page.goto(proxy.url + "/")
    assert "/login" in alice.page.url, "after logging out the UI asks who you are again"
    assert alice.bad == [], f"alice's page got error responses: {alice.bad}"

    # A user who opens the admin page gets a page that says why, with a way back.
    assert bob.page.goto(proxy.url + "/admin").status == 403
    bob.page.get_by_text("Admins only").wait_for(timeout=LOAD_TIMEOUT_MS)
    bob.page.click("#back")
    bob.page.wait_for_function("() => !!(window.app && window.app.graph)", timeout=LOAD_TIMEOUT_MS)
    assert bob.bad == [(403, "GET", proxy.url + "/admin")], bob.bad


def test_a_revoked_session_takes_the_page_to_login(proxy: Proxy, browser: object) -> None:
    alice, bob = login(browser, proxy, "alice"), login(browser, proxy, "bob")
    alice.page.goto(proxy.url + "/admin")
    alice.page.once("dialog", lambda dialog: dialog.accept())  # "Disable bob? ..."
    alice.page.locator("#users tr", has_text="bob").get_by_role("button", name="Disable").click()
    alice.page.get_by_text("User bob disabled.").wait_for(timeout=LOAD_TIMEOUT_MS)
    # bob's socket was closed by the server; the page asks who it is, gets 401 and goes to /login.
    bob.page.wait_for_url("**/login?next=%2F", timeout=LOAD_TIMEOUT_MS)
    assert bob.page.locator("input[name=password]").is_visible()
    assert all(status == 401 for status, _, _ in bob.bad), bob.bad


def test_a_401_from_an_api_call_takes_the_page_to_login(proxy: Proxy, browser: object) -> None:
    bob = login(browser, proxy, "bob")
    # The session ends without the server closing the socket (another proxy, an expired cookie).
    bob.page.context.clear_cookies()
    bob.page.evaluate("() => { setTimeout(() => app.queuePrompt(0, 1), 0); }")
    bob.page.wait_for_url("**/login?next=%2F", timeout=LOAD_TIMEOUT_MS)
    assert bob.bad and all(status == 401 for status, _, _ in bob.bad), bob.bad


def test_cluster_messages_are_known_to_the_frontend(proxy: Proxy, browser: object) -> None:
    bob = login(browser, proxy, "bob")
    bob.page.evaluate("""async () => {
        const response = await fetch('/templates/comfyserve_empty_image.json');
        await app.loadGraphData(await response.json());
        await app.queuePrompt(0, 1);
    }""")
    bob.page.wait_for_function("() => Object.values(app.nodeOutputs || {}).some(o => (o.images || []).length)",
                               timeout=LOAD_TIMEOUT_MS)
    bob.page.wait_for_function("() => Array.isArray(window.comfyserveClusterQueue)"
                               " && window.comfyserveClusterQueue.length === 0", timeout=LOAD_TIMEOUT_MS)
    unknown = [line for line in bob.console if "Unknown message type" in line]
    assert unknown == []
    assert bob.bad == []


def test_a_fresh_users_first_reload_shows_a_graph_that_runs(proxy: Proxy, browser: object) -> None:
    bob = login(browser, proxy, "bob")  # the template browser was closed: nothing chosen
    page = bob.page
    page.reload()
    page.wait_for_function("() => !!(window.app && window.app.graph && app.graph.nodes.length)",
                           timeout=LOAD_TIMEOUT_MS)
    types = page.evaluate("app.graph.nodes.map(n => n.type)")
    assert sorted(types) == ["EmptyImage", "SaveImage"], "the default graph must be the runtime's, not KSampler's"
    assert page.evaluate("app.graph.nodes.every(n => !!LiteGraph.registered_node_types[n.type])")
    assert page.evaluate("window.comfyserveDefaultWorkflow") == types
    assert not page.get_by_text("Missing Node Types").is_visible()
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/prompt"),
                              timeout=LOAD_TIMEOUT_MS) as queued:
        page.click("[data-testid=queue-button]")
    assert queued.value.status == 200
    page.wait_for_function("() => Object.values(app.nodeOutputs || {}).some(o => (o.images || []).length)",
                           timeout=LOAD_TIMEOUT_MS)
    assert bob.bad == []


def test_the_dashboard_follows_a_task_live(proxy: Proxy, browser: object) -> None:
    bob = login(browser, proxy, "bob")
    page = bob.page
    page.goto(proxy.url + "/dashboard")
    page.get_by_text("Live").wait_for(timeout=LOAD_TIMEOUT_MS)
    queued = page.evaluate("""async (prompt) => (await (await fetch('/api/prompt', {method: 'POST',
        headers: {'Content-Type': 'application/json'}, body: JSON.stringify({prompt})})).json())""",
                           json.loads(json.dumps(graph("live", color=7, seconds=1.5, size=64))))
    prompt_id = queued["prompt_id"]
    row = page.locator("#queue tr[data-state=running]", has_text=prompt_id[:8])
    row.wait_for(timeout=LOAD_TIMEOUT_MS)  # no reload: the page follows the stream
    page.locator("#queue tr", has_text="TestSleep").wait_for(timeout=LOAD_TIMEOUT_MS)
    thumb = page.locator("#history img.thumb").first
    thumb.wait_for(timeout=LOAD_TIMEOUT_MS)
    page.wait_for_function("(img) => img.complete && img.naturalWidth === 64", arg=thumb.element_handle(),
                           timeout=LOAD_TIMEOUT_MS)
    text = page.locator("#tasks").inner_text()
    assert "success" in text and "UTC" in text and "None" not in text and "True" not in text
    assert bob.bad == []


def test_the_admin_confirms_before_removing_a_user(proxy: Proxy, browser: object) -> None:
    alice = login(browser, proxy, "alice")
    page = alice.page
    page.goto(proxy.url + "/admin")
    asked: list[str] = []
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
    page.locator("#users tr", has_text="bob").get_by_role("button", name="Remove").click()
    assert asked and "Remove bob?" in asked[0]
    assert page.locator("#users tr", has_text="bob").count() == 1, "dismissed: nothing happens"
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#users tr", has_text="bob").get_by_role("button", name="Remove").click()
    page.get_by_text("User bob removed").wait_for(timeout=LOAD_TIMEOUT_MS)
    assert page.locator("#users tr", has_text="bob").count() == 0
    assert alice.bad == []


def test_restart_button_rolls_the_pool_for_admins_and_explains_itself_to_users(proxy: Proxy,
                                                                              browser: object) -> None:
    alice, bob = login(browser, proxy, "alice"), login(browser, proxy, "bob")
    queued = [bob.page.evaluate("""async (prompt) => (await (await fetch('/api/prompt', {method: 'POST',
        headers: {'Content-Type': 'application/json'}, body: JSON.stringify({prompt})})).json()).prompt_id""",
                                graph(f"roll{n}", color=40 + n, seconds=0.5)) for n in range(3)]
    bob.page.locator("button[aria-label='Restart server']").click()
    bob.page.get_by_text("Restart refused").first.wait_for(timeout=LOAD_TIMEOUT_MS)
    bob.page.get_by_text("Only an admin can restart the pool").first.wait_for(timeout=LOAD_TIMEOUT_MS)
    alice.page.locator("button[aria-label='Restart server']").click()
    alice.page.get_by_text("Rolling restart started").first.wait_for(timeout=LOAD_TIMEOUT_MS)
    status = poll(alice, "async () => { const s = await (await fetch('/api/restart')).json();"
                         " return s.running ? null : s; }")
    assert len(status["done"]) == 1 and status["failed"] == {}
    for prompt_id in queued:  # nothing lost: every queued task finished
        entry = poll(bob, f"async () => (await (await fetch('/api/history/{prompt_id}')).json())['{prompt_id}']")
        assert entry["status"]["status_str"] == "success"
    assert bob.bad == [(403, "POST", proxy.url + "/api/restart")]
    assert alice.bad == []
