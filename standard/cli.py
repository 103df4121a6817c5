"""The ``comfyserve`` console script: it only parses and dispatches.

Each role lives in its own package as a module with ``add_arguments(parser)``
and ``run(args) -> int``; this file just maps subcommands onto them.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from collections.abc import Sequence

from .errors import ConfigError
from .options import add_option
from .private import read_secret_files
from .serving import refuse

LOOPS = ("auto", "uvloop", "asyncio")
ROLES: dict[str, tuple[str, str]] = {
    "standard": ("standard.command", "one ComfyUI-protocol instance on a data dir"),
    "init": ("standard.init_command", "create a data dir's layout from the template"),
    "queue": ("queue_service.command", "the queue service (wire-compatible with the platform's)"),
    "api": ("api_edition.command", "API edition: /api_prompt front, queue, instances, workers"),
    "worker": ("api_edition.worker_command", "one API-edition worker: input queue -> instance -> sink"),
    "cluster": ("cluster_proxy.command", "cluster edition: multi-user web UI proxy over a pool"),
    "users": ("cluster_proxy.users_command", "manage cluster-edition accounts"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comfyserve", description=__doc__.splitlines()[0])
    add_option(parser, "--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    add_option(parser, "--loop", choices=LOOPS, default="auto",
               help="event loop of the servers: uvloop (about 20%% less CPU per request) or "
                    "asyncio's own; auto = uvloop when it is installed")
    sub = parser.add_subparsers(dest="role", metavar="ROLE", required=True)
    for role, (module_name, help_text) in ROLES.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # that role is not built yet
            raise
        role_parser = sub.add_parser(role, help=help_text, description=help_text)
        module.add_arguments(role_parser)
        role_parser.set_defaults(_run=module.run)
    return parser


def use_event_loop(choice: str) -> str:
    """Make ``asyncio.run`` (which every role calls) build the chosen loop; returns the one in use."""
    if choice not in LOOPS:  # from the environment: argparse checks only the command line
        print(f"comfyserve: --loop must be one of {', '.join(LOOPS)}, got {choice!r}", file=sys.stderr)
        raise SystemExit(2)
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit("comfyserve: --loop uvloop, but uvloop is not installed") from None
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        read_secret_files(args)  # --token-file & co., for every role in one place
    except ConfigError as exc:
        return refuse(args.role, str(exc))
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    previous = asyncio.get_event_loop_policy()
    loop = use_event_loop(args.loop)
    logging.getLogger("comfyserve").debug("event loop: %s", loop)
    try:
        return int(args._run(args) or 0)
    finally:
        asyncio.set_event_loop_policy(previous)  # called in-process (tests), the choice must not linger


if __name__ == "__main__":
    sys.exit(main())
