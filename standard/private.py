"""Secrets and the files that hold them: one way for every role.

A secret (service token, instance token, session key, webhook secret) comes
from its flag, its environment variable, or a file (``--NAME-file PATH`` /
``COMFYSERVE_NAME_FILE``), so it need not sit on the command line where
``ps`` shows it. A child process gets its secrets in its environment
(:func:`child_environment`), never as arguments. Files holding secrets or
their hashes (SQLite stores, generated keys) are created 0600 in 0700
directories, so other local users cannot read them.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path

from .errors import ConfigError
from .options import ENV_PREFIX, add_option, env_name

# Flags that carry a secret; each also has ``--NAME-file``.
SECRET_FLAGS = ("--token", "--instance-token", "--secret-key", "--webhook-secret")
# Credentials of object storage (read from the environment only): our own instances need them,
# third-party code (real ComfyUI and its plugins) does not.
STORAGE_CREDENTIALS = ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SECURITY_TOKEN", "OSS_SESSION_TOKEN")
SECRET_ENV = frozenset(name for flag in SECRET_FLAGS for name in (env_name(flag), env_name(flag + "-file")))
TOKEN_ENV = env_name("--token")


def add_secret_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, *, help: str) -> None:
    """``flag`` and ``flag-file`` (each with its environment variable); see :func:`read_secret_files`."""
    if flag not in SECRET_FLAGS:
        raise ValueError(f"{flag} is not a known secret flag")
    add_option(parser, flag, default=None, help=help)
    add_option(parser, flag + "-file", default=None, metavar="PATH",
               help=f"read {flag} from this file (its content, minus the trailing newline)")


def read_secret_files(args: argparse.Namespace) -> None:
    """Replace every ``--NAME-file`` given by the file's content; ``ConfigError`` when it cannot be used."""
    for flag in SECRET_FLAGS:
        dest = flag.lstrip("-").replace("-", "_")
        path = getattr(args, dest + "_file", None)
        if path is None:
            continue
        if getattr(args, dest, None) is not None:
            raise ConfigError(f"give {flag} or {flag}-file, not both")
        setattr(args, dest, read_secret_file(flag, Path(path).expanduser()))
        setattr(args, dest + "_file", None)


def read_secret_file(flag: str, path: Path) -> str:
    try:
        value = path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{flag}-file {path}: cannot read it ({exc})") from None
    if not value.strip():
        raise ConfigError(f"{flag}-file {path} is empty")
    return value


def child_environment(secret_env: Mapping[str, str | None] | None = None, *, third_party: bool = False
                      ) -> dict[str, str]:
    """The environment for a child: ours without any secret, plus ``secret_env`` (name -> value).

    ``third_party`` (real ComfyUI and its plugins): no ``COMFYSERVE_*`` setting and no storage
    credentials at all; our own roles keep the non-secret settings and the storage credentials.
    Under ``python -X dev`` (the test suite) our own roles run in dev mode too, so its checks
    (asyncio debug, unclosed resources) cover the children; ``-X dev`` is a flag, not inherited.
    """
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    if third_party:
        env = {k: v for k, v in env.items() if not k.startswith(ENV_PREFIX) and k not in STORAGE_CREDENTIALS}
    elif sys.flags.dev_mode:
        env["PYTHONDEVMODE"] = "1"
    for name, value in (secret_env or {}).items():
        if value is not None:
            env[name] = value
    return env


def private_dir(path: Path) -> Path:
    """``path`` (and missing parents) as a directory only its owner can enter."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def private_file(path: Path) -> Path:
    """Create ``path`` empty and 0600 if missing; make an existing one (and its SQLite -wal/-shm) 0600.

    SQLite creates a database's -wal and -shm files with the database file's
    mode, so a store opened on a file made here keeps them private too.
    """
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for item in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if item.exists():
            os.chmod(item, 0o600)
    return path


def load_or_create_key(path: Path) -> str:
    """A random key kept in ``path`` (0600), created on first use; the same one after a restart."""
    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
    else:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(48))
    return path.read_text().strip()
