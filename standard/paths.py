"""Confining request-supplied paths to their root.

Every filename, subfolder, type or userdata path that arrives in a request
goes through :func:`resolve_inside` before it touches the disk.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from .errors import PathOutsideRoot


def _check_part(part: str) -> None:
    if "\x00" in part:
        raise PathOutsideRoot("path contains a NUL byte")
    if os.path.isabs(part) or PurePosixPath(part).is_absolute() or PureWindowsPath(part).drive:
        raise PathOutsideRoot(f"absolute path not allowed: {part!r}")
    if ".." in PurePosixPath(part.replace("\\", "/")).parts:
        raise PathOutsideRoot(f"'..' not allowed: {part!r}")


def resolve_inside(root: str | os.PathLike[str], *parts: str) -> Path:
    """Join ``parts`` under ``root`` and return the resolved path.

    Raises :class:`PathOutsideRoot` for absolute parts, ``..``, NUL bytes, or a
    symlink that leads out of ``root``. The result may not exist yet.
    """
    for part in parts:
        _check_part(part)
    base = Path(root).resolve()
    candidate = base.joinpath(*[p.replace("\\", "/") for p in parts if p]).resolve()
    if candidate != base and not candidate.is_relative_to(base):
        raise PathOutsideRoot("path leaves its root")
    return candidate


def is_inside(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> bool:
    """True when ``path`` (resolved, symlinks followed) lies within ``root``."""
    base = Path(root).resolve()
    target = Path(path).resolve()
    return target == base or target.is_relative_to(base)
