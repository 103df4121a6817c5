"""Chromium via Playwright for the browser tests: a page logged in to ``browser_instance``.

A browser test module defines the fixture ``browser_instance`` (an ``Instance``: the server the page
talks to, started with ``browser_token``, or without a token when a test parametrizes it to None);
``browser_session`` opens the web UI there and fails the test on any 4xx/5xx the page gets.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "browser-test-token"
LOAD_TIMEOUT_MS = 30_000


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


@pytest.fixture
def browser_session(browser_instance: Instance) -> Iterator[Session]:
    """A page (logged in with the token, if any) that has loaded the web UI completely.

    Each browser test module defines ``browser_instance``: the server the page talks to.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800})
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
            page.goto(browser_instance.url + "/")
            if browser_instance.token is not None:
                assert "/login" in page.url, "the web UI must ask for the token first"
                page.fill("input[name=token]", browser_instance.token)
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
