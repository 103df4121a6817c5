"""Flags of task inputs, shared by ``comfyserve api`` (front) and ``comfyserve worker`` (URL fetches)."""

from __future__ import annotations

import argparse
from typing import Any

from standard.errors import ConfigError
from standard.options import add_option

from .inputs import (
    DEFAULT_INPUT_FETCH_TIMEOUT_S,
    DEFAULT_INPUT_RETENTION_S,
    DEFAULT_MAX_INPUT_FILE_BYTES,
    DEFAULT_MAX_INPUT_TOTAL_BYTES,
    InputLimits,
)
from .outputs import DEFAULT_MAX_INLINE_OUTPUT_BYTES
from .webhook import WebhookPolicy, WebhookRefused


def add_input_arguments(parser: argparse.ArgumentParser, *, front: bool) -> None:
    add_option(parser, "--max-input-file", type=int, default=DEFAULT_MAX_INPUT_FILE_BYTES, metavar="BYTES",
               help="largest input file a task may bring inline or by URL (413 / error result past it)")
    add_option(parser, "--input-url-allow", action="append", default=[], metavar="PREFIX",
               help="URL inputs must start with this scheme://host[:port]/path (repeatable; env: comma-separated). "
                    "Default: any URL except localhost and non-public IP addresses (the webhook policy)")
    add_option(parser, "--input-fetch-timeout", type=float, default=DEFAULT_INPUT_FETCH_TIMEOUT_S,
               help="seconds a worker may take to fetch one task's URL inputs")
    add_option(parser, "--max-inline-output", type=int, default=DEFAULT_MAX_INLINE_OUTPUT_BYTES, metavar="BYTES",
               help="tasks queued with ?return=base64 get their output files' bytes inline up to this sum")
    if front:
        add_option(parser, "--max-input-total", type=int, default=DEFAULT_MAX_INPUT_TOTAL_BYTES, metavar="BYTES",
                   help="largest sum of a task's inline input files (413 past it)")
        add_option(parser, "--input-retention", type=float, default=DEFAULT_INPUT_RETENTION_S,
                   help="seconds after which a task's input folder (DIR/input/api/ID) is removed even if the task "
                        "never finished (0: never)")


def input_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The checked input settings of ``add_input_arguments``, as settings keyword arguments."""
    total = getattr(args, "max_input_total", max(args.max_input_file, DEFAULT_MAX_INPUT_TOTAL_BYTES))
    if args.max_input_file <= 0 or total <= 0 or args.input_fetch_timeout <= 0:
        raise ConfigError("--max-input-file, --max-input-total and --input-fetch-timeout must be positive")
    allow = tuple(prefix.strip() for prefix in args.input_url_allow or () if prefix.strip())
    try:
        WebhookPolicy(allow, what="input URL")
    except WebhookRefused as exc:
        raise ConfigError(f"--input-url-allow: {exc}") from None
    if args.max_inline_output < 0:
        raise ConfigError("--max-inline-output must be >= 0")
    values: dict[str, Any] = {"max_inline_output_bytes": args.max_inline_output,
                              "input_limits": InputLimits(max_file_bytes=args.max_input_file, max_total_bytes=total),
                              "input_url_allow": allow, "input_fetch_timeout_s": args.input_fetch_timeout}
    if hasattr(args, "input_retention"):
        if args.input_retention < 0:
            raise ConfigError("--input-retention must be >= 0")
        values["input_retention_s"] = args.input_retention
    return values
