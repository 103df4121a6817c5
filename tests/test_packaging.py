"""The wheel ``pip install .`` builds: every package, the page templates inside ``standard/``,
no top-level package named ``web``, and a login page served from that layout."""

from __future__ import annotations

import shutil
import signal
import subprocess
import zipfile
from pathlib import Path

import httpx
import pytest

from standard.ports import free_port
from support.processes import VENV_BIN, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("standard", "api_edition", "cluster_proxy", "queue_service")
BUILD_TIMEOUT_S = 50.0
START_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from a clean copy (a stale ``build/`` in the checkout could add files)."""
    source = tmp_path_factory.mktemp("source")
    for name in (*PACKAGES, "web", "data-dir-template", "pyproject.toml", "README.md"):
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([str(VENV_BIN / "python"), "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
                   check=True, capture_output=True, timeout=BUILD_TIMEOUT_S)
    return next(out.glob("comfyserve-*.whl"))


def test_the_wheel_holds_every_module_and_the_templates_but_no_web_package(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert not [name for name in names if name.split("/")[0] == "web"]
    for template in (ROOT / "web" / "templates").iterdir():
        assert f"standard/web/templates/{template.name}" in names
    for package in PACKAGES:
        for module in (ROOT / package).rglob("*.py"):
            assert module.relative_to(ROOT).as_posix() in names, "a package missing from pyproject's list"


def test_an_installed_wheel_serves_the_login_page(wheel: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip does with a pure-Python wheel
    env = {**cli_env, "PYTHONPATH": str(site)}  # ahead of the checkout's editable install
    located = subprocess.run([str(VENV_BIN / "python"), "-c", "import standard.pages as p; print(p.web_dir())"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert Path(located.stdout.strip()) == site / "standard" / "web"
    port = free_port()
    proc = subprocess.Popen([str(VENV_BIN / "python"), "-m", "standard", "--port", str(port),
                             "--data-dir", str(tmp_path / "data"), "--token", "T0k-T0k-T0k-T0k"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, START_TIMEOUT_S, proc)
        page = httpx.get(f"http://127.0.0.1:{port}/login")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert page.status_code == 200
    assert 'name="token"' in page.text and "</html>" in page.text.lower()
