"""Chromium via Playwright for the browser tests: a page logged in to ``browser_instance``.

A browser test module defines the fixture ``browser_instance`` (an ``Instance``: the server the page
talks to, started with ``browser_token``, or without a token when a test parametrizes it to None);
``browser_session`` opens the web UI there, in a context of its own in the module's ``chromium``, and fails
the test on any 4xx/5xx the page gets.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "browser-test-token"
LOAD_TIMEOUT_MS = 30_000
# The web UI's start: its ~23 MB of JavaScript fetched and compiled, its settings and extensions loaded,
# /api/object_info answered. Some 5 s on an idle 2-core machine, 15 s at a load average of 10; only a page
# that never starts should reach this bound.
READY_TIMEOUT_S = 90.0
WEB_UI_READY = ("() => !!(window.app && window.app.graph && window.LiteGraph"
                " && window.LiteGraph.registered_node_types['EmptyImage'])")
T = TypeVar("T")


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
def browser_token() -> str | None:
    """Token auth on, unless a test overrides this fixture."""
    return TOKEN


@dataclass
class Session:
    page: object
    bad: list[tuple[int, str, str]] = field(default_factory=list)
    allowed: set[tuple[int, str, str]] = field(default_factory=set)

    def unexpected(self) -> list[tuple[int, str, str]]:
        return [entry for entry in self.bad if (entry[0], entry[1], entry[2].split("?")[0]) not in self.allowed]


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    """One Chromium per test module; each test opens contexts of its own in it (cookies, storage, cache apart)
    and closes them (``browser_session`` does; see ``fresh_contexts``).

    Per module, not per session: between two of its calls Playwright's sync API leaves its event loop marked as
    running in this thread, so asyncio code may not run here while it lives (``asyncio.run``, the async tests of
    other modules); a fixture of a browser module runs its coroutines with ``run_async``. Saves the driver and
    browser start (1-1.5 s) of every test after a module's first.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def fresh_contexts(browser: object) -> Iterator[object]:
    """Body of a function-scoped fixture: ``browser`` for one test; closes the contexts the test opened."""
    try:
        yield browser
    finally:
        for context in list(browser.contexts):  # type: ignore[attr-defined]
            context.close()


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coro)`` in a thread of its own: in a module with a live ``chromium`` this thread's
    asyncio state belongs to Playwright."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@contextlib.contextmanager
def web_ui_starting(page: Any) -> Iterator[None]:
    """Around what opens the web UI (a ``goto`` with ``wait_until="commit"``, a login's submit): returns once
    the page has started it, that is its ``GET /api/object_info`` (the last request of its start) answered
    and the engine's nodes registered from it. One bound for the whole start, however long each part of it
    takes on a loaded machine."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    with page.expect_response(lambda r: r.request.method == "GET" and r.url.split("?")[0].endswith("/object_info"),
                              timeout=READY_TIMEOUT_S * 1000) as object_info:
        yield
    assert object_info.value.status == 200, f"the web UI's GET {object_info.value.url}: {object_info.value.status}"
    page.wait_for_function(WEB_UI_READY, timeout=max(1.0, deadline - time.monotonic()) * 1000)


@pytest.fixture
def browser_session(browser_instance: Instance, chromium: object) -> Iterator[Session]:
    """A page (logged in with the token, if any) that has loaded the web UI completely.

    Each browser test module defines ``browser_instance``: the server the page talks to.
    """
    context = chromium.new_context(viewport={"width": 1280, "height": 800})  # type: ignore[attr-defined]
    try:
        context.route(lambda url: not url.startswith(browser_instance.url + "/"), lambda route: route.abort())
        page = context.new_page()
        session = Session(page)
        page.on("response", lambda r: r.status >= 400 and session.bad.append(
            (r.status, r.request.method, r.url)))
        # Transport failures count too; ERR_ABORTED is the page cancelling a fetch
        # itself (fetchApi aborts its timeout controller on bodies it never reads).
        page.on("requestfailed", lambda r: r.url.startswith(browser_instance.url)
                and r.failure != "net::ERR_ABORTED"
                and session.bad.append((0, r.method, f"{r.url} ({r.failure})")))
        with web_ui_starting(page):
            page.goto(browser_instance.url + "/", wait_until="commit")  # not "load": that waits for the bundle
            if browser_instance.token is not None:
                assert "/login" in page.url, "the web UI must ask for the token first"
                page.fill("input[name=token]", browser_instance.token)
                page.click("button[type=submit]")
        yield session
        assert session.unexpected() == [], f"the page got error responses: {session.unexpected()}"
    finally:
        context.close()


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
