"""Cluster edition on Redis: a cancelled task stays cancelled through a store call, and calls stay bounded.

redis-py 8 gives clients a 5 s ``socket_timeout`` by default and then sends each command under
``asyncio.wait_for``, which on Python 3.11 returns normally when a cancel lands just as the send completes:
the call answered and the cancelled task (a proxy's scheduler, a run being handed back) went on. The
cluster's clients have no socket timeout; each store call is bounded by ``call_timeout_s`` instead, so a
Redis that accepts a connection and never answers still costs a call that long, not forever.
The cancel is swept over every turn of the event loop of one call (stepping the loop, not the clock).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from cluster_proxy.accounts_store import RedisBackend
from cluster_proxy.hub import UserHub
from cluster_proxy.store import StateUnavailable
from cluster_proxy.store_redis import RedisStateStore
from support.wait import cancelled_after

TURNS = 24  # more loop turns than one store call takes on an idle local Redis
SILENT_BOUND_S = 0.2  # the call bound against a Redis that never answers


@pytest.fixture
async def hub(redis_url: str) -> AsyncIterator[UserHub]:
    hub = UserHub()
    await hub.start_bus(redis_url)
    yield hub
    await hub.aclose()


async def test_a_cluster_redis_call_cancelled_at_any_turn_ends_cancelled(redis_url: str, hub: UserHub) -> None:
    state, accounts = RedisStateStore(redis_url), RedisBackend(redis_url)
    try:
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "state.get_by_id": lambda: state.get_by_id("t"),
            "state.add_instance_url": lambda: state.add_instance_url("http://i"),
            "state.lease_instance": lambda: state.lease_instance("http://i", "me", 10.0),
            "accounts.get": lambda: accounts.get("alice"),
            "hub.send_json": lambda: hub.send_json("alice", "status", {}),
        }
        swallowed = [(name, turns) for name, call in calls.items() for turns in range(TURNS)
                     if not await cancelled_after(call, turns)]
        assert swallowed == [], "these calls returned normally after their task was cancelled"
    finally:
        await state.aclose()
        await accounts.aclose()


async def test_a_redis_that_never_answers_costs_a_call_its_bound(silent_redis: str,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Without a socket timeout, the bound is the stores' own: ``StateUnavailable`` once it has passed,
    and the hub hands the event to this proxy's sockets (a publish that never answers is a refused one)."""
    state = RedisStateStore(silent_redis, call_timeout_s=SILENT_BOUND_S)
    accounts = RedisBackend(silent_redis, call_timeout_s=SILENT_BOUND_S)
    try:
        for call in (state.pending, state.instance_urls, accounts.all):
            with pytest.raises(StateUnavailable, match="no answer within"):
                await call()
    finally:
        await state.aclose()
        await accounts.aclose()

    hub = UserHub()
    hub.call_timeout_s = SILENT_BOUND_S
    with pytest.raises(StateUnavailable, match="no answer within"):
        await hub.start_bus(silent_redis)  # the subscribe is bounded too
    with caplog.at_level(logging.WARNING, logger="comfyserve.cluster.hub"):
        await hub.send_json("alice", "status", {})  # no socket here: only that it returns
    assert any("cannot publish" in r.getMessage() for r in caplog.records)
    await hub.aclose()
