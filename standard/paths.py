"""Confining request-supplied paths to their root.

Every filename, subfolder, type or userdata path that arrives in a request
goes through :func:`resolve_inside` before it touches the disk. It also refuses
names the file system cannot hold (:class:`PathTooLong`, a 400 through
``json_errors_middleware``), so a 300-character name never becomes an
``ENAMETOOLONG`` deep inside a handler.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from .errors import PathOutsideRoot, PathTooLong

# POSIX limits of Linux file systems, in bytes of the encoded name.
NAME_MAX_BYTES = 255
PATH_MAX_BYTES = 4095


def _check_part(part: str) -> None:
    if "\x00" in part:
        raise PathOutsideRoot("path contains a NUL byte")
    if os.path.isabs(part) or PurePosixPath(part).is_absolute() or PureWindowsPath(part).drive:
        raise PathOutsideRoot(f"absolute path not allowed: {part!r}")
    if ".." in PurePosixPath(part.replace("\\", "/")).parts:
        raise PathOutsideRoot(f"'..' not allowed: {part!r}")
    check_name_lengths(part)


def check_name_lengths(part: str) -> None:
    """Raise :class:`PathTooLong` when a component of ``part`` exceeds ``NAME_MAX_BYTES``."""
    for name in part.replace("\\", "/").split("/"):
        if len(os.fsencode(name)) > NAME_MAX_BYTES:
            raise PathTooLong(f"name longer than {NAME_MAX_BYTES} bytes: {name[:40]!r}...")


def resolve_inside(root: str | os.PathLike[str], *parts: str) -> Path:
    """Join ``parts`` under ``root`` and return the resolved path.

    Raises :class:`PathOutsideRoot` for absolute parts, ``..``, NUL bytes, or a
    symlink that leads out of ``root``; :class:`PathTooLong` for a name or path
    the file system cannot hold. The result may not exist yet.
    """
    for part in parts:
        _check_part(part)
    base = Path(root).resolve()
    joined = base.joinpath(*[p.replace("\\", "/") for p in parts if p])
    if len(os.fsencode(joined)) > PATH_MAX_BYTES:
        raise PathTooLong(f"path longer than {PATH_MAX_BYTES} bytes")
    candidate = joined.resolve()
    if candidate != base and not candidate.is_relative_to(base):
        raise PathOutsideRoot("path leaves its root")
    return candidate


def is_inside(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> bool:
    """True when ``path`` (resolved, symlinks followed) lies within ``root``."""
    base = Path(root).resolve()
    target = Path(path).resolve()
    return target == base or target.is_relative_to(base)
