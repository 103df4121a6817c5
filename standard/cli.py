"""The ``comfyserve`` console script: it only parses and dispatches.

Each role is a :class:`standard.serving.Role` that its package declares in the
``comfyserve.roles`` entry-point group (see pyproject.toml); this file finds
them there, so the ground (``standard``) never imports the editions built on it. Only the
chosen role's entry point is loaded (a start pays for its own imports, not every edition's);
without a role (``comfyserve --help``) all are, to list them with their help.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import sys
from collections.abc import Sequence
from importlib.metadata import EntryPoint, entry_points

from .options import add_option
from .serving import Role, run_role

ROLE_GROUP = "comfyserve.roles"
LOOPS = ("auto", "uvloop", "asyncio")
DESCRIPTION = ("Serve ComfyUI workflows: one instance (standard), asynchronous calls through a queue "
               "(api, worker, queue) or many users sharing a pool (cluster, users).")


def role_entries() -> dict[str, EntryPoint]:
    """The installed packages' role entry points by name, not loaded (the first one installed under a name wins)."""
    entries: dict[str, EntryPoint] = {}
    for entry in entry_points(group=ROLE_GROUP):
        entries.setdefault(entry.name, entry)
    if not entries:
        raise SystemExit(f"comfyserve: no roles registered in {ROLE_GROUP}: reinstall the package (pip install -e .)")
    return entries


def registered_roles(only: str | None = None) -> dict[str, Role]:
    """The roles of the installed packages, by name; with ``only``, just that one is imported."""
    roles: dict[str, Role] = {}
    for name, entry in role_entries().items():
        if only is not None and name != only:
            continue
        role = entry.load()
        if not isinstance(role, Role) or role.name != name:
            raise TypeError(f"entry point {entry.value} of {ROLE_GROUP} is not the Role {name!r}")
        roles[name] = role
    return roles


def chosen_role(argv: Sequence[str]) -> str | None:
    """The role named on the command line (its first word that names one), without importing any role."""
    names = role_entries()
    return next((word for word in argv if word in names), None)


def build_parser(roles: dict[str, Role] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comfyserve", description=DESCRIPTION)
    add_option(parser, "--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    add_option(parser, "--loop", choices=LOOPS, default="auto",
               help="event loop of the servers: uvloop (about 20%% less CPU per request) or "
                    "asyncio's own; auto = uvloop when it is installed")
    sub = parser.add_subparsers(dest="role", metavar="ROLE", required=True)
    for role in (registered_roles() if roles is None else roles).values():
        role_parser = sub.add_parser(role.name, help=role.help, description=role.help)
        role.add_arguments(role_parser)
        role_parser.set_defaults(_role=role)
    return parser


def with_passthrough(argv: Sequence[str], roles: dict[str, Role]) -> list[str]:
    """Another program's flags as users type them, for a role with a ``passthrough`` flag.

    argparse refuses ``--comfyui-args --cpu`` (a value that looks like a flag) and
    has no place for ``comfyserve standard ... -- --cpu --preview-method auto``. Here every
    value of the flag (``FLAG VALUE`` or ``FLAG=VALUE``) and the words after a bare
    ``--`` (shell-quoted again) become one ``FLAG=...``, in the order typed.
    """
    argv = list(argv)
    at = next((i for i, word in enumerate(argv) if word in roles), None)
    flag = roles[argv[at]].passthrough if at is not None else None
    if at is None or flag is None:
        return argv
    head, tail = argv, []
    if "--" in argv[at:]:
        cut = argv.index("--", at)
        head, tail = argv[:cut], argv[cut + 1:]
    kept, values = head[:at + 1], []
    words = iter(head[at + 1:])
    for word in words:
        if word == flag:
            value = next(words, None)
            if value is None:
                kept.append(word)  # argparse says what is missing
            else:
                values.append(value)
        elif word.startswith(flag + "="):
            values.append(word[len(flag) + 1:])
        else:
            kept.append(word)
    if tail:
        values.append(shlex.join(tail))
    return kept + ([f"{flag}={' '.join(values)}"] if values else [])


def use_event_loop(choice: str) -> str:
    """Make ``asyncio.run`` (which every role calls) build the chosen loop; returns the one in use."""
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
    words = sys.argv[1:] if argv is None else list(argv)
    roles = registered_roles(only=chosen_role(words))  # no role named (--help, a typo): all, to list them
    args = build_parser(roles).parse_args(with_passthrough(words, roles))
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    previous = asyncio.get_event_loop_policy()
    loop = use_event_loop(args.loop)
    logging.getLogger("comfyserve").debug("event loop: %s", loop)
    try:
        return run_role(args._role, args)
    finally:
        asyncio.set_event_loop_policy(previous)  # called in-process (tests), the choice must not linger


if __name__ == "__main__":
    sys.exit(main())
