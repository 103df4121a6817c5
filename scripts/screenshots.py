"""Screenshots of the cluster's dashboard and admin page for the README (not a test).

Starts ``comfyserve cluster --instances 2`` on a throw-away data dir with an admin (lead) and two
users, runs a few workflows so every table has something in it (one still running when the
pictures are taken), and saves ``docs/dashboard.png`` and ``docs/admin.png`` from Chromium.

    .venv/bin/python scripts/screenshots.py [--out docs]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from standard.ports import free_port  # noqa: E402
from support.browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402
from support.cluster import PASSWORD, graph, make_users, write_sleep_plugin  # noqa: E402


def wait_ready(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("the cluster never became ready")


def submit(url: str, token: str, prompt: dict) -> str:
    request = urllib.request.Request(url + "/prompt", data=json.dumps({"prompt": prompt}).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["prompt_id"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        tokens = asyncio.run(make_users(data_dir, ("lead", "maya", "tom"), admin="lead"))
        write_sleep_plugin(data_dir)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "COMFYSERVE_LOG_LEVEL": "WARNING"}
        proc = subprocess.Popen([str(ROOT / ".venv/bin/comfyserve"), "cluster", "--data-dir", str(data_dir),
                                 "--instances", "2", "--shutdown-timeout", "2", "--port", str(port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(url)
            for n in range(3):
                submit(url, tokens["maya"], graph(f"portrait_{n}", color=0x3366AA + n * 0x201010, size=256))
            submit(url, tokens["tom"], graph("landscape", color=0x88AA33, size=256))
            time.sleep(4)  # let the short ones finish
            submit(url, tokens["maya"], graph("upscale", color=0xAA5533, seconds=60, size=256))
            submit(url, tokens["tom"], graph("batch", color=0x5533AA, seconds=60, size=256))
            submit(url, tokens["maya"], graph("variation", color=0x33AA99, size=256))
            time.sleep(2)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
                for name, path, shot in (("maya", "/dashboard", "dashboard.png"), ("lead", "/admin", "admin.png")):
                    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
                    page.goto(url + "/login")
                    page.fill("input[name=name]", name)
                    page.fill("input[name=password]", PASSWORD)
                    page.click("button[type=submit]")
                    page.goto(url + path)
                    if path == "/dashboard":
                        page.get_by_text("Live").wait_for()  # the live stream is connected
                    page.wait_for_function("[...document.images].every(i => i.complete)")
                    page.screenshot(path=str(args.out / shot), full_page=True)
                    print(args.out / shot)
                browser.close()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()
