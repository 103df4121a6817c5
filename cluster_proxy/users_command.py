"""``comfyserve users add|remove|list|reset-token|passwd|disable|enable [NAME] --data-dir DIR | --redis-url URL``.

Accounts live in the data dir's SQLite, or in Redis with ``--redis-url`` (then
``--data-dir`` is optional: ``add`` leaves the user's folders to the proxy,
which makes them on first use; only ``remove`` needs the data dir, to move the
user's files aside).

``add`` and ``reset-token`` print the user's new API token alone on their last
line, so scripts can take it with ``tail -n 1``. The password of ``add`` and
``passwd`` comes from ``--password``, ``COMFYSERVE_PASSWORD``, a prompt on a
terminal, else the first line of stdin; with nothing there it is generated
and printed. ``remove`` also cancels the user's tasks, deletes their history
and moves their files to ``DIR/users/.removed/NAME-ID`` (see ``retire.py``),
so an account created later with the same name starts empty. ``passwd``,
``disable`` and ``remove`` sign the user out everywhere.
"""

from __future__ import annotations

import argparse
import getpass
import secrets
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from standard.datadir import DataDir, usable_data_dir
from standard.errors import ConfigError
from standard.options import add_option
from standard.serving import Role

from .accounts import AccountError, Accounts


def _store_options(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--data-dir", default=None, help="the cluster's data dir (accounts live in DIR/.comfyserve)")
    add_option(parser, "--redis-url", default=None,
               help="keep accounts in Redis instead (shared by several proxies; then only remove needs --data-dir)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="create an account and print its API token")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="may manage users and instances")
    remove = actions.add_parser("remove", help="delete an account, cancel its tasks, move its files to "
                                               "DIR/users/.removed/NAME-ID")
    actions.add_parser("list", help="list accounts")
    reset = actions.add_parser("reset-token", help="issue a new API token; old token and sessions stop working")
    passwd = actions.add_parser("passwd", help="set a new password; every session of the user ends")
    disable = actions.add_parser("disable", help="the user cannot log in; their token and sessions stop working")
    enable = actions.add_parser("enable", help="the user may log in again (their token works again)")
    for sub in (remove, reset, passwd, disable, enable):
        sub.add_argument("name")
    for sub in (add, passwd):
        add_option(sub, "--password", default=None,
                   help="the password (better: the environment, a prompt or stdin; else generated)")
    for sub in actions.choices.values():
        _store_options(sub)


def _password(args: argparse.Namespace) -> str:
    """Asked before the event loop starts: Ctrl-C at the prompt then simply ends the command."""
    if args.password:
        return str(args.password)
    if sys.stdin.isatty():
        first = getpass.getpass(f"Password for {args.name}: ")
        if first != getpass.getpass("Again: "):
            raise AccountError("the passwords differ")
        return first
    given = sys.stdin.readline().rstrip("\r\n")
    if given:
        return given
    generated = secrets.token_urlsafe(12)
    print(f"generated password for {args.name}: {generated}")
    return generated


async def _run(args: argparse.Namespace, data_dir: DataDir | None, password: str | None) -> int:
    accounts = await Accounts.open(data_dir, args.redis_url)
    try:
        if args.action == "add":
            assert password is not None
            token = await accounts.add(args.name, password, admin=args.admin)
            if data_dir is not None:
                (data_dir.users / args.name).mkdir(parents=True, exist_ok=True)
                data_dir.user_workdirs(args.name).create()
            print(f"user {args.name} added{' (admin)' if args.admin else ''}; API token:")
            print(token)
        elif args.action == "remove":
            assert data_dir is not None
            account_id = await accounts.remove(args.name)
            if account_id is None:
                print(f"no user {args.name!r}", file=sys.stderr)
                return 1
            moved = await _retire(data_dir, args.redis_url, args.name, account_id)
            print(f"user {args.name} removed; tasks cancelled"
                  + (f", files moved to {moved}" if moved is not None else ""))
        elif args.action == "list":
            for user in await accounts.list():
                print(f"{user.name}{'  admin' if user.is_admin else ''}{'  disabled' if user.disabled else ''}")
        elif args.action == "reset-token":
            token = await accounts.reset_token(args.name)
            print(f"new API token for {args.name}:")
            print(token)
        elif args.action == "passwd":
            assert password is not None
            if await accounts.get(args.name) is None:
                raise AccountError(f"no user {args.name!r}")
            await accounts.set_password(args.name, password)
            print(f"new password set for {args.name}; their sessions were signed out")
        elif args.action in ("disable", "enable"):
            await accounts.set_disabled(args.name, args.action == "disable")
            print(f"user {args.name} {args.action}d")
    except AccountError as exc:
        print(f"comfyserve users: {exc}", file=sys.stderr)
        return 1
    finally:
        await accounts.aclose()
    return 0


async def _retire(data_dir: DataDir, redis_url: str | None, name: str, account_id: str) -> Path | None:
    """The removed user's tasks and files, as the proxy would (it may be running: the stores are shared)."""
    from .app import open_store
    from .retire import retire_user
    from .settings import ClusterSettings

    store = await open_store(ClusterSettings(data_dir=data_dir.root, redis_url=redis_url))
    try:
        return await retire_user(data_dir, store, name, account_id)
    finally:
        await store.aclose()


def start(args: argparse.Namespace) -> Coroutine[Any, Any, int] | int:
    if not args.data_dir and (not args.redis_url or args.action == "remove"):
        raise ConfigError("--data-dir is required (or COMFYSERVE_DATA_DIR)" if args.action == "remove"
                          else "--data-dir or --redis-url is required (or COMFYSERVE_DATA_DIR / COMFYSERVE_REDIS_URL)")
    data_dir = usable_data_dir(args.data_dir) if args.data_dir else None
    try:
        password = _password(args) if args.action in ("add", "passwd") else None
    except AccountError as exc:
        print(f"comfyserve users: {exc}", file=sys.stderr)
        return 1
    return _run(args, data_dir, password)


ROLE = Role("users", "manage cluster-edition accounts", add_arguments, start)
