"""Optional per-task webhook: POST the result JSON to the task's ``webhook`` URL.

Signed with ``X-Comfyserve-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>``
and ``X-Comfyserve-Timestamp`` so a receiver can reject forgeries and replays.
The key is the webhook secret alone (``--webhook-secret``; ``comfyserve api``
keeps a generated one in ``DIR/.comfyserve/webhook_secret``), never the
service token: a receiver must not hold the key to the API. Without a key
(``comfyserve worker`` with no ``--webhook-secret``) deliveries go unsigned.
Retried under ``standard.retry.WEBHOOK`` (5 tries, jittered backoff; a 503/429's
``Retry-After``, seconds or HTTP-date, is waited for up to a minute); a refused
target, a 4xx other than 408/429 and a refused address are final. The sink
result stays the source of truth, so a webhook that keeps failing is only
counted and logged. Redirects are not followed.

Where a webhook may point (``WebhookPolicy``; the front checks at
``/api_prompt``, the worker again before delivering, since items can be put on
the input queue directly):

- With ``--webhook-allow PREFIX`` (repeatable) the URL must match one of the
  prefixes, compared as parsed parts, not as strings: same scheme, same host,
  same port (the scheme's default when not written), and a path equal to the
  prefix's path or below it at a ``/`` boundary. So a ``http://good.example.com``
  prefix refuses ``http://good.example.com.evil.net/`` and
  ``http://good.example.com@evil.net/``.
- Without it, any http(s) URL is allowed except one whose host is ``localhost``
  (or ``*.localhost``) or an address that is not globally routable: loopback,
  private, link-local (``169.254.169.254``), unspecified, shared
  (``100.64.0.0/10``, where ``100.100.100.200`` serves cloud metadata),
  reserved or multicast — in any spelling the resolver accepts (``127.1``,
  ``2130706433``), and IPv4 inside IPv6 judged by its IPv4 part
  (``::ffff:127.0.0.1``, ``::7f00:1``, NAT64 ``64:ff9b::7f00:1``, 6to4).
  A host *name* is checked when the sender connects: every address it resolves
  to must pass, and the connection goes to those checked addresses (aiohttp's
  resolver hook: no second lookup to rebind, Host header and TLS SNI keep the
  name). To reach an internal receiver an operator lists it with
  ``--webhook-allow``; names under an allowed prefix may resolve anywhere.
- Always refused: other schemes, user info (``user@host``), ``.``/``..`` path
  segments.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from standard.errors import ComfyServeError, RequestError, WorkerError
from standard.private import load_or_create_key
from standard.retry import WEBHOOK, RetryLater, RetryPolicy, retry_after_s

log = logging.getLogger("comfyserve.api.webhook")

SIGNATURE_HEADER = "X-Comfyserve-Signature"
TIMESTAMP_HEADER = "X-Comfyserve-Timestamp"
DEFAULT_PORTS = {"http": 80, "https": 443}


class WebhookRefused(RequestError):
    """The URL is not an allowed webhook target; the message says why."""


class _Final(ComfyServeError):
    """A delivery that another try cannot fix (refused target, a 4xx answer)."""


class AddressRefused(WorkerError, OSError):
    """A webhook host name resolved to an address the policy refuses (raised at connect time)."""


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # well-known prefix: the IPv4 is the last 32 bits
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")  # local-use translation: never public


def is_public(ip: IPAddress) -> bool:
    """Globally routable unicast; an IPv4 carried inside IPv6 is judged by that IPv4."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _LOCAL_NAT64:
            return False
        embedded = ip.ipv4_mapped
        if embedded is None and (int(ip) >> 32 == 0 or ip in _NAT64):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)  # ::a.b.c.d and NAT64
        if embedded is not None:
            return is_public(embedded)
        if ip.sixtofour is not None and not is_public(ip.sixtofour):
            return False
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True, slots=True)
class Target:
    """A URL reduced to what is compared: scheme, host, port, path."""

    scheme: str
    host: str
    port: int
    path: str

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"

    def covers(self, other: Target) -> bool:
        if (self.scheme, self.host, self.port) != (other.scheme, other.host, other.port):
            return False
        if self.path in ("", "/") or other.path == self.path:
            return True
        return other.path.startswith(self.path if self.path.endswith("/") else self.path + "/")


def parse_target(url: str, what: str = "webhook") -> Target:
    """Normalise an http(s) URL; ``WebhookRefused`` when it cannot be a webhook (``what``: the noun in messages)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise WebhookRefused(f"not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        raise WebhookRefused(f"{what} must be an http(s) URL with a host, got {url!r}")
    if parts.username is not None or parts.password is not None:
        raise WebhookRefused(f"{what} URL must not carry user info (user@host)")
    path = parts.path or "/"
    if any(segment in (".", "..") for segment in unquote(path).split("/")):
        raise WebhookRefused(f"{what} URL path must not contain '.' or '..' segments")
    host = parts.hostname.rstrip(".")  # urlsplit lowercases it
    return Target(scheme, host, port or DEFAULT_PORTS[scheme], path)


def _literal_ip(host: str) -> IPAddress | None:
    """The address a literal host names, in any form the resolver takes (``127.1``, ``0x7f000001``)."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except (OSError, ValueError):
            return None


class WebhookPolicy:
    """Where webhooks may go: the operator's prefixes, else anywhere public (see the module docstring).

    ``what`` and ``flag`` name the URL and its allow flag in messages: the same policy guards the
    task inputs a worker fetches by URL (``input_fetch``, ``--input-url-allow``).
    """

    def __init__(self, allow: tuple[str, ...] | list[str] = (), *, what: str = "webhook",
                 flag: str = "--webhook-allow") -> None:
        self.what = what
        self.flag = flag
        self.allow = tuple(parse_target(prefix, what) for prefix in allow)

    def check(self, url: str) -> None:
        """Raises ``WebhookRefused`` unless ``url`` may receive a webhook."""
        target = parse_target(url, self.what)
        if self.allow:
            if not any(prefix.covers(target) for prefix in self.allow):
                allowed = ", ".join(str(prefix) for prefix in self.allow)
                raise WebhookRefused(f"{self.what} {target} is not under an allowed prefix ({allowed})")
            return
        if target.host == "localhost" or target.host.endswith(".localhost"):
            raise WebhookRefused(f"{self.what} host {target.host!r} is local; allow it with {self.flag}")
        ip = _literal_ip(target.host)
        if ip is not None and not is_public(ip):
            raise WebhookRefused(f"{self.what} host {target.host} is not a public address (loopback, private, "
                                 f"link-local or reserved); allow it with {self.flag}")

    def check_resolved(self, host: str, addresses: list[str]) -> None:
        """At connect time: raises ``AddressRefused`` unless every address ``host`` resolved to may be called."""
        if self.allow:
            return  # the operator listed this receiver; it may live on an internal address
        refused = [a for a in addresses if (ip := _literal_ip(a)) is None or not is_public(ip)]
        if refused or not addresses:
            raise AddressRefused(f"{self.what} host {host!r} resolves to {', '.join(refused) or 'nothing'}, "
                                 f"not a public address; allow it with {self.flag}")


class CheckingResolver(AbstractResolver):
    """aiohttp resolves through this, checks every address, and connects only to what it returns."""

    def __init__(self, policy: WebhookPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.inner = inner or ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        self.policy.check_resolved(host, [result["host"] for result in results])
        return results

    async def close(self) -> None:
        await self.inner.close()


WEBHOOK_SECRET_FILE = Path(".comfyserve") / "webhook_secret"


def webhook_secret(configured: str | None, data_dir: Path | None) -> str | None:
    """The signing key: the configured one, else one generated and kept (0600) in the data dir."""
    if configured:
        return configured
    if data_dir is None:
        return None
    return load_or_create_key(data_dir / WEBHOOK_SECRET_FILE)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    """For receivers (and tests): constant-time check of a delivery."""
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


class WebhookSender:
    """Delivers in background tasks so a slow receiver never holds up the worker's next task.

    ``resolver`` is the name lookup under the policy's check (tests inject one; the default
    asks the system).
    """

    def __init__(self, secret: str | None, *, policy: WebhookPolicy | None = None,
                 retry: RetryPolicy = WEBHOOK, on_give_up: Any = None,
                 resolver: AbstractResolver | None = None) -> None:
        self.secret = secret
        self.policy = policy or WebhookPolicy()
        self.retry = retry.but(retry_on=(RetryLater,))
        self.on_give_up = on_give_up
        self._resolver = resolver
        self._http: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[bool]] = set()

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:  # made in the loop that delivers
            connector = aiohttp.TCPConnector(resolver=CheckingResolver(self.policy, self._resolver))
            self._http = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10.0))
        return self._http

    def send(self, url: str, payload: dict[str, Any]) -> None:
        task = asyncio.create_task(self.deliver(url, payload), name="comfyserve-webhook")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def deliver(self, url: str, payload: dict[str, Any]) -> bool:
        """POST ``payload`` to ``url`` under ``self.retry``; False (and ``on_give_up``) when it never took it."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        try:
            await self.retry.call(lambda: self._post(url, body), what=f"webhook {url}", log=log)
            return True
        except (RetryLater, _Final) as exc:
            log.warning("webhook %s for task %s failed: %s (giving up)", url, payload.get("task_id"), exc)
        if self.on_give_up is not None:
            self.on_give_up()
        return False

    async def _post(self, url: str, body: bytes) -> None:
        """One try: ``RetryLater`` (with the receiver's ``Retry-After``) if another may work, ``_Final`` if not."""
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: timestamp}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, timestamp, body)
        try:
            self.policy.check(url)
            async with self._session().post(url, data=body, headers=headers, allow_redirects=False) as response:
                status = response.status
                asked_s = retry_after_s(response.headers.get("Retry-After"))
        except WebhookRefused as exc:
            raise _Final(str(exc)) from exc
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, AddressRefused):
                raise _Final(str(exc.os_error)) from exc  # the policy refuses where the name leads
            raise RetryLater(repr(exc)) from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise RetryLater(repr(exc)) from exc
        if status < 300:
            return
        if 400 <= status < 500 and status not in (408, 429):
            raise _Final(f"HTTP {status}")  # the receiver refuses this delivery: retrying cannot help
        raise RetryLater(f"HTTP {status}", asked_s)

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Give pending deliveries a moment, then cancel them."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
        if self._http is not None:
            await self._http.close()
            self._http = None
