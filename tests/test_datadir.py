"""The data dir: init from the template, and confinement of request paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from standard.datadir import MODEL_FOLDERS, DataDir
from standard.errors import PathOutsideRoot
from standard.paths import resolve_inside


def test_init_creates_layout_and_keeps_existing_files(tmp_path: Path, cli_env: dict[str, str]) -> None:
    root = tmp_path / "dd"
    (root / "user").mkdir(parents=True)
    (root / "user" / "mine.json").write_text("{}")
    (root / "README.md").write_text("my own readme")
    result = subprocess.run(
        [sys.executable, "-m", "standard.cli", "init", "--data-dir", str(root)],
        env=cli_env, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    for folder in MODEL_FOLDERS:
        assert (root / "models" / folder).is_dir()
    for folder in ("custom_nodes", "input", "output", "temp", "user"):
        assert (root / folder).is_dir()
    assert (root / "user" / "mine.json").read_text() == "{}"
    assert (root / "README.md").read_text() == "my own readme"


@pytest.mark.parametrize(
    "parts",
    [("..", "etc"), ("../../etc/passwd",), ("/etc/passwd",), ("a", "../../x"), ("a\x00b",), ("..\\x",), ("C:\\x",)],
)
def test_resolve_inside_refuses_escapes(tmp_path: Path, parts: tuple[str, ...]) -> None:
    with pytest.raises(PathOutsideRoot):
        resolve_inside(tmp_path, *parts)


def test_resolve_inside_refuses_symlink_out(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(PathOutsideRoot):
        resolve_inside(root, "link", "secret")


def test_resolve_inside_allows_nested(tmp_path: Path) -> None:
    assert resolve_inside(tmp_path, "a/b", "c.png") == (tmp_path / "a" / "b" / "c.png").resolve()


def test_user_workdirs_reject_bad_names(tmp_path: Path) -> None:
    dd = DataDir(tmp_path)
    assert dd.user_workdirs("alice").output == (tmp_path / "users" / "alice" / "output").resolve()
    for bad in ("../bob", "", ".hidden", "a/b"):
        with pytest.raises(ValueError):
            dd.user_workdirs(bad)
