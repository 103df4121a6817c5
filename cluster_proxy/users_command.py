"""``comfyserve users add NAME [--admin] | remove NAME | list | reset-token NAME --data-dir DIR``.

``add`` and ``reset-token`` print the user's new API token alone on their last
line, so scripts can take it with ``tail -n 1``. The password of ``add`` comes
from ``--password``, ``COMFYSERVE_PASSWORD``, a prompt on a terminal, or is
generated and printed when there is no terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import secrets
import sys

from standard.datadir import init_data_dir
from standard.options import add_option

from .accounts import AccountError, Accounts


def _store_options(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--data-dir", default=None, help="the cluster's data dir (accounts live in DIR/.comfyserve)")
    add_option(parser, "--redis-url", default=None, help="keep accounts in Redis instead (shared by several proxies)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="create an account and print its API token")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="may manage users and instances")
    add_option(add, "--password", default=None, help="the password (else prompted, or generated)")
    remove = actions.add_parser("remove", help="delete an account (its files stay in DIR/users/NAME)")
    remove.add_argument("name")
    actions.add_parser("list", help="list accounts")
    reset = actions.add_parser("reset-token", help="issue a new API token; old token and sessions stop working")
    reset.add_argument("name")
    for sub in (add, remove, reset, actions.choices["list"]):
        _store_options(sub)


def _password(args: argparse.Namespace) -> str:
    if args.password:
        return str(args.password)
    if sys.stdin.isatty():
        first = getpass.getpass(f"Password for {args.name}: ")
        if first != getpass.getpass("Again: "):
            raise AccountError("the passwords differ")
        return first
    generated = secrets.token_urlsafe(12)
    print(f"generated password for {args.name}: {generated}")
    return generated


async def _run(args: argparse.Namespace) -> int:
    data_dir = init_data_dir(args.data_dir)
    accounts = await Accounts.open(data_dir, args.redis_url)
    try:
        if args.action == "add":
            token = await accounts.add(args.name, _password(args), admin=args.admin)
            (data_dir.users / args.name).mkdir(parents=True, exist_ok=True)
            data_dir.user_workdirs(args.name).create()
            print(f"user {args.name} added{' (admin)' if args.admin else ''}; API token:")
            print(token)
        elif args.action == "remove":
            if not await accounts.remove(args.name):
                print(f"no user {args.name!r}", file=sys.stderr)
                return 1
            print(f"user {args.name} removed (files kept in {data_dir.users / args.name})")
        elif args.action == "list":
            for user in await accounts.list():
                print(f"{user.name}{'  admin' if user.is_admin else ''}")
        elif args.action == "reset-token":
            token = await accounts.reset_token(args.name)
            print(f"new API token for {args.name}:")
            print(token)
    except AccountError as exc:
        print(f"comfyserve users: {exc}", file=sys.stderr)
        return 1
    finally:
        await accounts.aclose()
    return 0


def run(args: argparse.Namespace) -> int:
    if not args.data_dir:
        print("comfyserve users: --data-dir is required", file=sys.stderr)
        return 2
    return asyncio.run(_run(args))
