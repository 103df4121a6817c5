"""Command-line options that also read the environment, and the value types they share.

Every flag ``--some-flag`` has the environment variable ``COMFYSERVE_SOME_FLAG``
(read here, in one place); the command line wins over the environment. An
environment value is only the *default string* of its flag: argparse converts
and checks it (``type=``, ``choices=``) when the role that has the flag parses
its command line, so building the parsers of every role evaluates nothing, and
a bad value is argparse's usage error (exit 2) naming the variable.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable
from typing import Any

ENV_PREFIX = "COMFYSERVE_"
TRUE_WORDS = ("1", "true", "yes", "on")


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


class EnvValue(str):
    """A flag's default taken from the environment: a string that knows the variable it came from."""

    variable: str

    def __new__(cls, raw: str, variable: str) -> EnvValue:
        value = super().__new__(cls, raw)
        value.variable = variable
        return value


def _checked(convert: Callable[[str], Any] | None, choices: Iterable[Any] | None) -> Callable[[str], Any]:
    """``type=`` for a flag with an environment variable: ``convert`` for a command-line value; for the
    environment's, the same plus the ``choices`` argparse would not hold it to, in errors naming the variable."""
    kind = getattr(convert, "__name__", "str")

    def parse(raw: str) -> Any:
        try:
            value = convert(str(raw)) if convert is not None else str(raw)  # a plain str, as from the command line
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            if not isinstance(raw, EnvValue):
                raise
            reason = str(exc) if isinstance(exc, argparse.ArgumentTypeError) else f"invalid {kind} value"
            raise argparse.ArgumentTypeError(f"{raw.variable}={str(raw)!r}: {reason}") from None
        if isinstance(raw, EnvValue) and choices is not None and value not in choices:
            raise argparse.ArgumentTypeError(
                f"{raw.variable}={str(raw)!r}: invalid choice (choose from {', '.join(map(str, choices))})")
        return value

    parse.__name__ = kind  # argparse says "invalid int value" after the name of ``type``
    return parse


def add_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *flags: str, **kwargs: Any) -> None:
    """``parser.add_argument`` whose default comes from ``COMFYSERVE_<FLAG>`` if set."""
    long_flag = next((f for f in flags if f.startswith("--")), flags[0])
    name = kwargs.pop("env", None) or env_name(long_flag)
    raw = os.environ.get(name)
    action = kwargs.get("action")
    if action in ("store_true", "store_false"):
        if raw is not None:  # any word is a boolean: nothing to refuse
            truth = raw.strip().lower() in TRUE_WORDS
            kwargs["default"] = truth if action == "store_true" else not truth
    elif action == "append":
        if raw is not None:
            kwargs["default"] = [part for part in raw.split(",") if part]
    else:
        kwargs["type"] = _checked(kwargs.get("type"), kwargs.get("choices"))
        if raw is not None:
            kwargs["default"] = EnvValue(raw, name)
    help_text = kwargs.get("help")
    if help_text is not None and help_text != argparse.SUPPRESS:
        kwargs["help"] = f"{help_text} [env {name}]"
    parser.add_argument(*flags, **kwargs)


def port_number(raw: str) -> int:
    """``type=`` of every port flag."""
    try:
        port = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number 1-65535, got {raw!r}") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"must be a port number 1-65535, got {port}")
    return port
