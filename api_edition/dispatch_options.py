"""``--prefetch`` and ``--affinity-wait``: how a worker takes tasks, shared by ``comfyserve api`` and ``worker``."""

from __future__ import annotations

import argparse
from typing import Any

from standard.errors import ConfigError
from standard.options import add_option

from .settings import DEFAULT_AFFINITY_WAIT_S, DEFAULT_PREFETCH

MAX_PREFETCH = 8


def add_dispatch_arguments(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--prefetch", type=int, default=DEFAULT_PREFETCH, metavar="N",
               help="tasks a worker keeps queued on its instance behind the running one, so the instance "
                    "starts the next the moment the current one ends; a worker that falls idle meanwhile "
                    "gets such a task back unless it has started (0: one task at a time)")
    add_option(parser, "--affinity-wait", type=float, default=DEFAULT_AFFINITY_WAIT_S, metavar="SECONDS",
               help="a worker prefers waiting tasks whose models its instance already holds; a task is "
                    "passed over for other models at most this long (0: first in, first out)")


def dispatch_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The checked values of ``add_dispatch_arguments``, as settings keyword arguments."""
    if not 0 <= args.prefetch <= MAX_PREFETCH:
        raise ConfigError(f"--prefetch must be between 0 and {MAX_PREFETCH}")
    if args.affinity_wait < 0:
        raise ConfigError("--affinity-wait must be >= 0 (0: off)")
    return {"prefetch": args.prefetch, "affinity_wait_s": args.affinity_wait}
