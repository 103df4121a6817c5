"""The data dir: its layout (``DataDir``), and creating it from ``data-dir-template/``.

``DIR`` is a mounted bucket, a NAS path or any local folder. Starting any
edition fills in what is missing from ``data-dir-template/`` and never
overwrites what exists.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .paths import resolve_inside

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "data-dir-template"

MODEL_FOLDERS: tuple[str, ...] = (
    "checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models",
    "clip_vision", "style_models", "embeddings", "diffusers", "vae_approx",
    "controlnet", "gligen", "upscale_models", "hypernetworks", "photomaker",
    "classifiers", "model_patches", "audio_encoders",
)

WORK_FOLDERS: tuple[str, ...] = ("input", "output", "temp", "user")

_USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class WorkDirs:
    """The four folders a ComfyUI session reads and writes."""

    input: Path
    output: Path
    temp: Path
    user: Path

    def by_type(self, kind: str) -> Path:
        """The folder for ComfyUI's ``type`` parameter (input/output/temp)."""
        if kind not in ("input", "output", "temp"):
            raise ValueError(f"unknown type {kind!r}")
        return getattr(self, kind)

    def create(self) -> None:
        for folder in (self.input, self.output, self.temp, self.user):
            folder.mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class DataDir:
    """Paths inside one data dir."""

    root: Path

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def custom_nodes(self) -> Path:
        return self.root / "custom_nodes"

    @property
    def users(self) -> Path:
        return self.root / "users"

    def model_folder(self, name: str) -> Path:
        return resolve_inside(self.models, name)

    def workdirs(self) -> WorkDirs:
        """The shared working folders (standard and API editions)."""
        return WorkDirs(*(self.root / name for name in WORK_FOLDERS))

    def user_workdirs(self, user: str) -> WorkDirs:
        """One cluster user's private working folders under ``users/<name>``."""
        if not _USER_NAME.match(user):
            raise ValueError(f"invalid user name {user!r}")
        base = resolve_inside(self.users, user)
        return WorkDirs(*(base / name for name in WORK_FOLDERS))


def init_data_dir(root: str | Path) -> DataDir:
    """Create the data dir's layout under ``root`` from the template; keep what exists."""
    data_dir = DataDir(Path(root).expanduser().resolve())
    data_dir.root.mkdir(parents=True, exist_ok=True)
    if TEMPLATE_DIR.is_dir():
        _copy_missing(TEMPLATE_DIR, data_dir.root)
    for folder in MODEL_FOLDERS:
        (data_dir.models / folder).mkdir(parents=True, exist_ok=True)
    data_dir.custom_nodes.mkdir(exist_ok=True)
    data_dir.workdirs().create()
    return data_dir


def usable_data_dir(root: str | Path) -> DataDir:
    """:func:`init_data_dir` for a role starting on ``root``: ConfigError when the folder cannot be had."""
    try:
        return init_data_dir(root)
    except OSError as exc:
        raise ConfigError(f"cannot use the data dir: {exc}") from None


def _copy_missing(src: Path, dst: Path) -> None:
    for entry in src.iterdir():
        target = dst / entry.name
        if entry.is_dir():
            target.mkdir(exist_ok=True)
            _copy_missing(entry, target)
        elif not target.exists():
            shutil.copy2(entry, target)
