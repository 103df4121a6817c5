"""Webhook targets are checked where the connection goes: every address a name resolves to, at connect time."""

from __future__ import annotations

import asyncio
import email.utils
import socket
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from api_edition.webhook import WebhookPolicy, WebhookRefused, WebhookSender
from standard.retry import WEBHOOK


class FixedResolver(AbstractResolver):
    """The name lookup under the sender's check, answering from a table (no DNS in tests)."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        self.asked.append(host)
        return [ResolveResult(hostname=host, host=address, port=port,
                              family=socket.AF_INET6 if ":" in address else socket.AF_INET, proto=0,
                              flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
                for address in self.table[host]]

    async def close(self) -> None:
        return None


async def receiver(aiohttp_server: Any) -> tuple[int, list[web.Request], list[bytes]]:
    requests: list[web.Request] = []
    bodies: list[bytes] = []

    async def receive(request: web.Request) -> web.Response:
        requests.append(request)
        bodies.append(await request.read())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", receive)
    server = await aiohttp_server(app, host="127.0.0.1")
    return server.port, requests, bodies


@pytest.mark.parametrize("host", ["::7f00:1", "::ffff:7f00:1", "64:ff9b::7f00:1", "64:ff9b::a00:1",
                                  "64:ff9b:1::a9fe:a9fe", "2002:7f00:1::1", "::a9fe:a9fe", "::1"])
def test_ipv4_inside_ipv6_is_judged_by_its_ipv4(host: str) -> None:
    with pytest.raises(WebhookRefused):
        WebhookPolicy().check(f"http://[{host}]:8080/hook")


def test_nat64_of_a_public_address_is_public() -> None:
    WebhookPolicy().check("http://[64:ff9b::808:808]/hook")


@pytest.mark.parametrize("addresses", [["127.0.0.1"], ["::1"], ["::ffff:127.0.0.1"], ["64:ff9b::7f00:1"],
                                       ["10.0.0.7"], ["169.254.169.254"], ["8.8.8.8", "127.0.0.1"]])
async def test_a_name_resolving_inward_is_not_called(aiohttp_server: Any, addresses: list[str]) -> None:
    port, requests, _ = await receiver(aiohttp_server)
    resolver = FixedResolver({"inward.example": addresses})
    gave_up = asyncio.Event()
    waits: list[float] = []
    sender = WebhookSender("secret", retry=WEBHOOK.but(attempts=3, pause=waits.append), resolver=resolver,
                           on_give_up=gave_up.set)
    try:
        assert await sender.deliver(f"http://inward.example:{port}/hook", {"task_id": "t"}) is False
    finally:
        await sender.aclose()
    assert gave_up.is_set()
    assert requests == []
    assert resolver.asked == ["inward.example"]  # refused is final: not retried
    assert waits == []


async def test_an_allowed_name_is_delivered_to_the_address_it_resolves_to(aiohttp_server: Any) -> None:
    port, requests, bodies = await receiver(aiohttp_server)
    resolver = FixedResolver({"receiver.example": ["127.0.0.1"]})
    policy = WebhookPolicy((f"http://receiver.example:{port}/",))
    sender = WebhookSender("secret", policy=policy, retry=WEBHOOK.but(attempts=1), resolver=resolver)
    try:
        assert await sender.deliver(f"http://receiver.example:{port}/hook", {"task_id": "ok"}) is True
        # the same allow-list refuses anything else before a connection is tried
        assert await sender.deliver(f"http://elsewhere.example:{port}/hook", {"task_id": "no"}) is False
    finally:
        await sender.aclose()
    [request] = requests
    assert request.headers["Host"] == f"receiver.example:{port}"
    assert bodies == [b'{"task_id":"ok"}']
    assert resolver.asked == ["receiver.example"]


# -- retries: Retry-After, final answers, jitter (the waits are recorded, never slept) -------------------------


async def scripted_receiver(aiohttp_server: Any,
                            answers: list[tuple[int, dict[str, str]]]) -> tuple[str, list[bytes]]:
    """A receiver on loopback answering (status, headers) of ``answers`` in turn (the last one repeats);
    returns its URL and the bodies it was sent."""
    calls: list[bytes] = []

    async def receive(request: web.Request) -> web.Response:
        calls.append(await request.read())
        status, headers = answers[min(len(calls), len(answers)) - 1]
        return web.Response(status=status, headers=headers)

    app = web.Application()
    app.router.add_post("/hook", receive)
    server = await aiohttp_server(app, host="127.0.0.1")
    return f"http://127.0.0.1:{server.port}/hook", calls


async def deliver_recording(url: str, **retry: Any) -> tuple[bool, list[float], bool]:
    """Deliver once to ``url`` with the waits recorded: (delivered, waits asked for, gave up)."""
    waits: list[float] = []
    gave_up = asyncio.Event()
    sender = WebhookSender("secret", policy=WebhookPolicy((url,)), retry=WEBHOOK.but(pause=waits.append, **retry),
                           on_give_up=gave_up.set)
    try:
        delivered = await sender.deliver(url, {"task_id": "t"})
    finally:
        await sender.aclose()
    return delivered, waits, gave_up.is_set()


async def test_a_503_with_retry_after_is_waited_for_then_delivered(aiohttp_server: Any) -> None:
    url, calls = await scripted_receiver(aiohttp_server, [(503, {"Retry-After": "1"}), (200, {})])
    assert await deliver_recording(url) == (True, [1.0], False)
    assert len(calls) == 2


async def test_retry_after_as_an_http_date_is_honoured(aiohttp_server: Any) -> None:
    when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    url, calls = await scripted_receiver(aiohttp_server, [(429, {"Retry-After": when}), (200, {})])
    delivered, [wait], _ = await deliver_recording(url)
    assert delivered and 25.0 <= wait <= 30.0  # the date has a one-second resolution
    assert len(calls) == 2


async def test_a_long_retry_after_is_capped(aiohttp_server: Any) -> None:
    url, _ = await scripted_receiver(aiohttp_server, [(503, {"Retry-After": "86400"}), (200, {})])
    assert await deliver_recording(url) == (True, [WEBHOOK.retry_after_max_s], False)


async def test_a_400_is_final(aiohttp_server: Any) -> None:
    url, calls = await scripted_receiver(aiohttp_server, [(400, {})])
    assert await deliver_recording(url) == (False, [], True)
    assert len(calls) == 1


async def test_a_failing_receiver_gets_every_try_with_jittered_growing_waits(aiohttp_server: Any) -> None:
    url, calls = await scripted_receiver(aiohttp_server, [(500, {})])
    delivered, waits, gave_up = await deliver_recording(url, attempts=4)
    assert not delivered and gave_up and len(calls) == 4
    assert len(waits) == 3
    for failures, wait in enumerate(waits, 1):
        step = min(WEBHOOK.initial_s * 2 ** (failures - 1), WEBHOOK.max_s)
        assert step / 2 <= wait <= step
