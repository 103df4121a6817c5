"""Command-line options that also read the environment.

Every flag ``--some-flag`` has the environment variable ``COMFYSERVE_SOME_FLAG``
(read here, in one place); the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

ENV_PREFIX = "COMFYSERVE_"


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _from_env(raw: str, kwargs: dict[str, Any]) -> Any:
    action = kwargs.get("action")
    if action in ("store_true", "store_false"):
        value = raw.strip().lower() in ("1", "true", "yes", "on")
        return value if action == "store_true" else not value
    if action == "append":
        return [part for part in raw.split(",") if part]
    convert = kwargs.get("type")
    return convert(raw) if convert else raw


def add_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *flags: str, **kwargs: Any) -> None:
    """``parser.add_argument`` whose default comes from ``COMFYSERVE_<FLAG>`` if set."""
    long_flag = next((f for f in flags if f.startswith("--")), flags[0])
    name = kwargs.pop("env", None) or env_name(long_flag)
    raw = os.environ.get(name)
    if raw is not None:
        kwargs["default"] = _from_env(raw, kwargs)
    help_text = kwargs.get("help")
    if help_text is not None and help_text != argparse.SUPPRESS:
        kwargs["help"] = f"{help_text} [env {name}]"
    parser.add_argument(*flags, **kwargs)
