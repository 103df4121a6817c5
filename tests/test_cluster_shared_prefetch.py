"""Cluster edition, two proxies on one Redis: a task one proxy queued ahead on a busy instance (``--prefetch``)
is deleted through the other as through the first, by its owner only.

Proxy A dispatches (its scheduler queues the second task on the instance behind the gated first one); proxy
B starts only once that is done, so it holds neither task: the delete reaches it with nothing of its own to act on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import pytest

from cluster_proxy.app import create_cluster_app
from cluster_proxy.keys import POOL
from cluster_proxy.settings import ClusterSettings
from support.cluster import INSTANCE_TOKEN, Cluster, ClusterFactory
from support.server import drain_gate_graph, install_gate_plugin, open_gate, runs_of
from support.wait import until


async def _submit(http: Any, gate: str) -> str:
    response = await http.post("/prompt", json={"prompt": drain_gate_graph(gate, gate)})
    assert response.status == 200, await response.text()
    return (await response.json())["prompt_id"]


async def _history(http: Any) -> dict[str, Any]:
    return await (await http.get("/history")).json()


async def _finished(http: Any, count: int) -> bool:
    return len(await _history(http)) == count


class Pair(NamedTuple):
    a: Cluster  # queued the tasks
    b: Cluster  # the other proxy on the same Redis
    ids: list[str]  # running on the instance, waiting behind it (queued ahead by A), still in the store


@pytest.fixture
async def pair(start_cluster: ClusterFactory, aiohttp_server: Any, data_dir: Path, redis_url: str) -> Any:
    """Proxy A on one instance with gates g1 (running) and g2 (queued ahead behind it), then proxy B."""
    install_gate_plugin(data_dir)
    a = await start_cluster(instances=1, redis_url=redis_url)
    http = a.http("alice")
    ids = [await _submit(http, "g1"), await _submit(http, "g2"), await _submit(http, "g3")]
    await until(lambda: a.waiting_on_instance(ids[1]), what="the second task queued on the instance")
    await until(lambda: runs_of(data_dir, "g1") == 1)
    app = await create_cluster_app(ClusterSettings(
        data_dir=data_dir, instance_urls=tuple(a.pool.instances), instance_token=INSTANCE_TOKEN,
        health_interval_s=0.2, instance_lost_s=1.0, redis_url=redis_url))
    b = Cluster(data_dir, await aiohttp_server(app), a.tokens, a.instances)
    await until(lambda: len(b.app[POOL].up()) == 1)
    try:
        yield Pair(a, b, ids)
    finally:
        await b.aclose()


@pytest.mark.parametrize("route", ["queue", "jobs"])
async def test_deleting_through_another_proxy_takes_the_task_out_of_the_instance_queue(
        pair: Pair, data_dir: Path, route: str) -> None:
    a, b, (running, waiting, later) = pair
    alice_on_b = b.http("alice")
    if route == "queue":
        assert (await alice_on_b.post("/queue", json={"delete": [waiting]})).status == 200
    else:
        assert await (await alice_on_b.post(f"/jobs/{waiting}/cancel")).json() == {"cancelled": True}
    assert await b.core.store.get("alice", waiting) is None
    await until(lambda: a.waiting_on_instance(later), what="the next task queued in its place")
    assert not await a.waiting_on_instance(waiting)
    open_gate(data_dir, "g1")
    await until(lambda: runs_of(data_dir, "g3") == 1)
    open_gate(data_dir, "g3")
    await until(lambda: _finished(alice_on_b, 2), timeout_s=30)
    history = await _history(alice_on_b)
    assert set(history) == {running, later}
    assert runs_of(data_dir, "g2") == 0


async def test_another_user_cannot_delete_it_through_the_other_proxy(pair: Pair, data_dir: Path) -> None:
    a, b, (running, waiting, later) = pair
    before = await b.core.store.get("alice", waiting)
    response = await b.http("bob").post("/queue", json={"delete": [waiting]})
    assert response.status == 404
    assert (await b.http("bob").post(f"/jobs/{waiting}/cancel")).status == 200  # idempotent: {"cancelled": false}
    assert await b.core.store.get("alice", waiting) == before
    assert await a.waiting_on_instance(waiting)
    open_gate(data_dir, "g1")
    await until(lambda: runs_of(data_dir, "g2") == 1)
    open_gate(data_dir, "g2")
    await until(lambda: runs_of(data_dir, "g3") == 1)
    open_gate(data_dir, "g3")
    await until(lambda: _finished(a.http("alice"), 3), timeout_s=30)
    assert runs_of(data_dir, "g2") == 1


async def test_a_task_that_started_before_the_delete_runs_on_as_on_one_proxy(pair: Pair, data_dir: Path) -> None:
    a, b, (running, waiting, later) = pair
    open_gate(data_dir, "g1")
    await until(lambda: runs_of(data_dir, "g2") == 1)
    await until(lambda: _started(b, waiting))
    assert (await b.http("alice").post("/queue", json={"delete": [waiting]})).status == 404
    open_gate(data_dir, "g2")
    open_gate(data_dir, "g3")
    await until(lambda: _finished(a.http("alice"), 3), timeout_s=30)
    assert (await _history(a.http("alice")))[waiting]["status"]["status_str"] == "success"


async def _started(cluster: Cluster, prompt_id: str) -> bool:
    task = await cluster.core.store.get("alice", prompt_id)
    return task is not None and not task.queued_ahead


async def test_a_delete_made_after_the_proxy_that_queued_it_went_away_still_takes_it_out(
        pair: Pair, data_dir: Path) -> None:
    a, b, (running, waiting, later) = pair
    await a.server.close()  # gone without a word: the other proxy adopts what it followed
    assert (await b.http("alice").post("/queue", json={"delete": [waiting]})).status == 200
    assert await b.core.store.get("alice", waiting) is None
    open_gate(data_dir, "g1")
    await until(lambda: runs_of(data_dir, "g3") == 1, timeout_s=30)
    open_gate(data_dir, "g3")
    await until(lambda: _finished(b.http("alice"), 2), timeout_s=30)
    assert set(await _history(b.http("alice"))) == {running, later}
    assert runs_of(data_dir, "g2") == 0


async def test_a_running_task_the_other_proxy_follows_is_interrupted_through_this_one(
        pair: Pair, data_dir: Path) -> None:
    a, b, (running, waiting, later) = pair
    bob_on_b, alice_on_b = b.http("bob"), b.http("alice")
    assert (await bob_on_b.post("/interrupt", json={"prompt_id": running})).status == 404
    assert await (await bob_on_b.post(f"/jobs/{running}/cancel")).json() == {"cancelled": False}
    assert await a.waiting_on_instance(waiting)  # nothing moved
    assert await (await alice_on_b.post(f"/jobs/{running}/cancel")).json() == {"cancelled": True}
    await until(lambda: runs_of(data_dir, "g2") == 1)  # the one queued behind it starts, untouched
    open_gate(data_dir, "g2")
    await until(lambda: runs_of(data_dir, "g3") == 1)
    open_gate(data_dir, "g3")
    await until(lambda: _finished(alice_on_b, 3), timeout_s=30)
    history = await _history(alice_on_b)
    assert history[running]["status"]["status_str"] == "error"
    assert history[waiting]["status"]["status_str"] == history[later]["status"]["status_str"] == "success"
    assert runs_of(data_dir, "g1") == 1
