"""Who may call what: the request facts every role's auth middleware decides on.

One policy for every server role (standard instance, real-ComfyUI gateway,
API front and worker, queue service, cluster proxy), applied by
``standard.auth.AccessGuard`` (instances, API, queue) and the cluster's login
middleware:

- **Host.** A browser page can rebind its own name to our address (DNS
  rebinding) and then call us "same-origin" with ``Host: attacker.example``.
  Where nothing but the network protects a server (no token), the ``Host``
  must be one we serve: an IP literal (a name cannot be rebound if there is
  no name), ``localhost`` (``*.localhost``), this machine's host name (and
  ``NAME.local``), or an ``--allowed-host`` (``*``: any). With a token or a login, the credential is
  the protection (the browser keeps a cookie for the real name, a rebound
  page has neither it nor the token), so ``Host`` is only checked there when
  ``--allowed-host`` names hosts.
- **Origin.** Opaque origins (``null``, ``file://``, any non-http(s) scheme)
  and other origins are refused wherever the browser supplies the
  credential by itself (a cookie, or the network alone): on every request
  without a token, on state-changing requests and WebSocket upgrades with a
  cookie. A request with an ``Authorization`` header brings its own
  credential: a page cannot send that to us cross-origin without CORS.
- **The client.** ``X-Forwarded-For`` / ``-Proto`` / ``-Host`` are believed
  only from a ``--trusted-proxy``; :func:`client_address`,
  :func:`request_is_https` and :func:`request_host` are the one way to ask.
- **Guessing.** :class:`FailureThrottle` slows wrong credentials per client
  address in bounded memory.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aiohttp import web

from .errors import ConfigError
from .options import add_option

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SHORT_TOKEN_CHARS = 16
ANY_HOST = "*"
HOST_ANSWERS_MAX = 256  # Host headers remembered per policy (a client writes them: bounded)


def _host_key(name: str) -> str:
    """``Name.Example.:8000`` -> ``name.example`` (the form hosts are compared in)."""
    name = name.strip().lower()
    if name != ANY_HOST:
        parsed = urlsplit("//" + name)
        name = parsed.hostname or name
    return name.rstrip(".")


def _machine_names() -> frozenset[str]:
    """This machine's own name, short and with mDNS's ``.local`` (``gethostname`` asks the kernel, not DNS)."""
    name = socket.gethostname().lower().rstrip(".")
    short = name.split(".", 1)[0]
    return frozenset(n for n in (name, short, short + ".local") if n and n != ".local")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class AccessPolicy:
    """The operator's answers to "which names are ours" and "whose forwarded headers to believe"."""

    allowed_hosts: frozenset[str] = frozenset()
    trusted_proxies: tuple[IPNetwork, ...] = ()
    secure_cookies: bool = False
    machine_names: frozenset[str] = field(default_factory=_machine_names)
    # Host header -> host_allowed's answer: every request asks, mostly with the same one or two values.
    _host_answers: dict[str, bool] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def build(cls, allowed_hosts: Iterable[str] = (), trusted_proxies: Iterable[str] = (),
              secure_cookies: bool = False) -> AccessPolicy:
        """Raises ConfigError for a proxy that is not an address or a network."""
        networks = []
        for proxy in trusted_proxies:
            try:
                networks.append(ipaddress.ip_network(proxy.strip(), strict=False))
            except ValueError:
                raise ConfigError(f"--trusted-proxy must be an IP address or network, got {proxy!r}") from None
        hosts = frozenset(_host_key(h) for h in allowed_hosts if h.strip())
        return cls(allowed_hosts=hosts, trusted_proxies=tuple(networks), secure_cookies=secure_cookies)

    @property
    def hosts_configured(self) -> bool:
        return bool(self.allowed_hosts) and ANY_HOST not in self.allowed_hosts

    def is_trusted_proxy(self, address: str | None) -> bool:
        if not address or not self.trusted_proxies:
            return False
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        return any(ip in network for network in self.trusted_proxies)

    def host_allowed(self, host_header: str | None) -> bool:
        """Whether a ``Host`` header names this server (see the module docstring)."""
        if host_header is None or ANY_HOST in self.allowed_hosts:
            return True  # no Host: not a browser (they always send one)
        answer = self._host_answers.get(host_header)
        if answer is None:
            answer = self._parse_host_allowed(host_header)
            if len(self._host_answers) < HOST_ANSWERS_MAX:
                self._host_answers[host_header] = answer
        return answer

    def _parse_host_allowed(self, host_header: str) -> bool:
        try:
            parsed = urlsplit("//" + host_header.strip())
            parsed.port  # noqa: B018  (a bad port raises)
        except ValueError:
            return False
        name = (parsed.hostname or "").rstrip(".")
        if not name or parsed.username is not None or parsed.password is not None:
            return False
        if name == "localhost" or name.endswith(".localhost") or _is_ip(name):
            return True
        return name in self.allowed_hosts or name in self.machine_names


DEFAULT_POLICY = AccessPolicy()


def add_access_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The flags of :class:`AccessPolicy`, the same for every role."""
    add_option(parser, "--allowed-host", action="append", default=[], metavar="NAME",
               help="a host name this server is reached by, besides IP addresses, localhost and the "
                    "machine's name (repeatable; '*': any). Without a token, other Host headers are refused "
                    "(DNS rebinding); with a token or logins they are checked only when this is given")
    add_option(parser, "--trusted-proxy", action="append", default=[], metavar="ADDR",
               help="a reverse proxy (IP or network, repeatable) whose X-Forwarded-For / -Proto / -Host "
                    "are believed")
    add_option(parser, "--secure-cookies", action="store_true",
               help="mark session cookies Secure (automatic over https or X-Forwarded-Proto: https)")


def access_policy_from_args(args: argparse.Namespace) -> AccessPolicy:
    return AccessPolicy.build(args.allowed_host or (), args.trusted_proxy or (), bool(args.secure_cookies))


POLICY = web.RequestKey("access_policy", AccessPolicy)  # set by the auth middleware of each role


def policy_of(request: web.Request) -> AccessPolicy:
    return request[POLICY] if POLICY in request else DEFAULT_POLICY


def client_address(request: web.Request) -> str:
    """The real client: the right-most ``X-Forwarded-For`` hop not a trusted proxy, when our peer is one."""
    policy = policy_of(request)
    peer = request.remote or "unknown"
    if not policy.is_trusted_proxy(peer):
        return peer
    hops = [hop.strip() for value in request.headers.getall("X-Forwarded-For", ()) for hop in value.split(",")]
    address = peer
    for hop in reversed([hop for hop in hops if hop]):
        if not _is_ip(hop):
            break  # garbage a client wrote: the last hop we could trust stays the answer
        address = hop
        if not policy.is_trusted_proxy(hop):
            break
    return address


def request_host(request: web.Request) -> str | None:
    """The ``Host`` the browser sent: a trusted proxy's ``X-Forwarded-Host`` (last value), else ``Host``."""
    forwarded = request.headers.get("X-Forwarded-Host")
    if forwarded and policy_of(request).is_trusted_proxy(request.remote):
        return forwarded.split(",")[-1].strip()
    return request.headers.get("Host")


def request_is_https(request: web.Request) -> bool:
    """Served over TLS here, or a trusted proxy says its client used https."""
    if request.secure:
        return True
    if not policy_of(request).is_trusted_proxy(request.remote):
        return False
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[-1].strip().lower()
    return proto == "https"


def cookie_secure(request: web.Request) -> bool:
    """Whether a session cookie set on this response gets ``Secure``."""
    return policy_of(request).secure_cookies or request_is_https(request)


def is_state_changing(request: web.Request) -> bool:
    """Methods that change state, and WebSocket upgrades (a socket can queue prompts)."""
    return request.method not in SAFE_METHODS or request.headers.get("Upgrade", "").lower() == "websocket"


def origin_problem(request: web.Request) -> str | None:
    """Why the request's ``Origin`` is not ours (None: no Origin, or our own)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    try:
        parsed = urlsplit(origin.strip().lower())
        origin_port = parsed.port
    except ValueError:
        return "unparsable Origin refused"
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return "opaque Origin (null, file:, ...) refused"
    host = request_host(request)
    if host is None:
        return "cross-origin request refused"
    try:
        host_parts = urlsplit("//" + host.strip().lower())
        host_port = host_parts.port
    except ValueError:
        return "cross-origin request refused"
    if (host_parts.hostname or "").rstrip(".") != parsed.hostname.rstrip("."):
        return "cross-origin request refused"
    # ComfyUI's rule: ports are compared when both sides name one (a proxy may drop one).
    if origin_port is not None and host_port is not None and origin_port != host_port:
        return "cross-origin request refused"
    return None


def cross_origin_refusal(request: web.Request) -> str | None:
    """For a request authorised by a cookie: why it must be refused (CSRF, cross-site WebSocket), or None."""
    return origin_problem(request) if is_state_changing(request) else None


class FailureThrottle:
    """Wrong credentials per client address: ``burst`` tries, then one more every ``refill_s``.

    A token bucket, not a lock-out: an address that stops failing is free
    again within ``burst * refill_s``; while it is out of tries its requests
    are answered 429 without looking at the credential (otherwise the answer
    would still tell a guesser which guess was right). The table keeps at
    most ``max_addresses`` entries, dropping the least recently failed.
    """

    def __init__(self, *, burst: int = 10, refill_s: float = 6.0, max_addresses: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.refill_s = refill_s
        self.max_addresses = max_addresses
        self._clock = clock
        self._spent: dict[str, tuple[float, float]] = {}  # address -> (tries spent, when)
        self._busy_until = 0.0

    def _level(self, address: str, now: float) -> float:
        spent, at = self._spent.get(address, (0.0, now))
        return max(0.0, spent - (now - at) / self.refill_s)

    def retry_after_s(self, address: str) -> int:
        """0 when ``address`` may try now, else whole seconds until it may."""
        if address not in self._spent:
            return 0
        over = self._level(address, self._clock()) + 1 - self.burst
        return 0 if over <= 0 else max(1, math.ceil(over * self.refill_s))

    def failed(self, address: str) -> None:
        now = self._clock()
        spent = self._level(address, now) + 1
        self._spent.pop(address, None)
        self._spent[address] = (spent, now)  # re-inserted: the dict is ordered by last failure
        if spent + 1 > self.burst:
            self._busy_until = max(self._busy_until, now + (spent + 1 - self.burst) * self.refill_s)
        while len(self._spent) > self.max_addresses:
            del self._spent[next(iter(self._spent))]

    def busy(self) -> bool:
        """Some address is being slowed now (the byte-level fast path then hands everything to us)."""
        return self._clock() < self._busy_until
