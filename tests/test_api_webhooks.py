"""Webhook targets are checked where the connection goes: every address a name resolves to, at connect time."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from api_edition.webhook import WebhookPolicy, WebhookRefused, WebhookSender


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
    sender = WebhookSender("secret", attempts=3, backoff_s=0.0, resolver=resolver, on_give_up=gave_up.set)
    try:
        assert await sender.deliver(f"http://inward.example:{port}/hook", {"task_id": "t"}) is False
    finally:
        await sender.aclose()
    assert gave_up.is_set()
    assert requests == []
    assert resolver.asked == ["inward.example"]  # refused is final: not retried


async def test_an_allowed_name_is_delivered_to_the_address_it_resolves_to(aiohttp_server: Any) -> None:
    port, requests, bodies = await receiver(aiohttp_server)
    resolver = FixedResolver({"receiver.example": ["127.0.0.1"]})
    policy = WebhookPolicy((f"http://receiver.example:{port}/",))
    sender = WebhookSender("secret", policy=policy, attempts=1, resolver=resolver)
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
