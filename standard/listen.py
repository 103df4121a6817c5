"""Where a server role listens and who may call it: one settings object and one argument group for every role.

``comfyserve standard``, ``queue``, ``api`` and ``cluster`` all take
``--listen``, ``--port``, ``--token`` (``--token-file``), ``--no-auth``,
``--shutdown-timeout`` and the access flags of :mod:`standard.guard`, declared
here once (:func:`add_listen_arguments`) and checked here once
(:meth:`ListenSettings.check`), so every role refuses the same things with the
same words. Each role's own settings keep these values as plain fields (the
code serving requests reads ``settings.host``, ``settings.token``) and build
them from the :class:`ListenSettings` returned by :func:`listen_settings_from_args`.
"""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass, field

from .errors import ConfigError
from .guard import AccessPolicy, access_policy_from_args, add_access_arguments
from .options import add_option, port_number
from .private import TOKEN_ENV, add_secret_option
from .serving import DEFAULT_SHUTDOWN_TIMEOUT_S, add_shutdown_timeout_option, check_shutdown_timeout

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
EVERY_IPV4_ADDRESS = "0.0.0.0"


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ListenSettings:
    """A server role's address, its credential and its stop; ``logins``: accounts protect it (no token)."""

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    no_auth: bool = False
    logins: bool = False
    access: AccessPolicy = field(default_factory=AccessPolicy)
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S

    def check(self) -> None:
        """Refuse what must not start: a bad port, an empty token, a public address nothing protects."""
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be 1-65535, got {self.port}")
        if self.token is not None and not self.token.strip():
            raise ConfigError("--token must not be empty")
        if self.token is None and not self.no_auth and not self.logins and not is_loopback(self.host):
            raise ConfigError(
                f"refusing to listen on {self.host} without a token: pass --token T "
                f"(or {TOKEN_ENV}), or --no-auth to serve unauthenticated on purpose"
            )
        check_shutdown_timeout(self.shutdown_timeout_s)


def add_listen_arguments(parser: argparse.ArgumentParser, *, default_port: int, token_help: str | None,
                         port_help: str = "port to listen on", access_title: str = "who may call (Host, proxies)",
                         aliases: tuple[str, ...] = ()) -> None:
    """``--listen`` (and ``aliases``), ``--port``, ``--shutdown-timeout``, the access group and, unless
    ``token_help`` is None (a role that logs users in), ``--token``/``--token-file`` and ``--no-auth``."""
    needs = " (needs --token or --no-auth)" if token_help is not None else ""
    add_option(parser, "--listen", *aliases, dest="listen", nargs="?", const=EVERY_IPV4_ADDRESS,
               default="127.0.0.1", metavar="IP", help=f"address to listen on; without a value: 0.0.0.0{needs}")
    add_option(parser, "--port", type=port_number, default=default_port, help=port_help)
    if token_help is not None:
        add_secret_option(parser, "--token", help=token_help)
        add_option(parser, "--no-auth", action="store_true",
                   help="serve without a token on a non-loopback address (on purpose)")
    add_shutdown_timeout_option(parser)
    add_access_arguments(parser.add_argument_group(access_title))


def listen_settings_from_args(args: argparse.Namespace, *, logins: bool = False) -> ListenSettings:
    """The checked settings of :func:`add_listen_arguments` (``logins``: it was given no ``token_help``)."""
    settings = ListenSettings(
        host=args.listen, port=args.port, token=None if logins else args.token,
        no_auth=False if logins else bool(args.no_auth), logins=logins,
        access=access_policy_from_args(args), shutdown_timeout_s=float(args.shutdown_timeout),
    )
    settings.check()
    return settings
