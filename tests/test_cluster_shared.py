"""Cluster edition: two proxies on one Redis serve the same users consistently."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from support.cluster import INSTANCE_TOKEN, Cluster, graph
from support.server import install_gate_plugin, next_json, open_gate
from support.wait import until


async def test_two_proxies_on_one_redis(start_cluster, aiohttp_server, redis_url: str) -> None:
    from cluster_proxy.app import create_cluster_app
    from cluster_proxy.keys import CORE, POOL
    from cluster_proxy.settings import ClusterSettings

    first: Cluster = await start_cluster(instances=2, redis_url=redis_url)
    urls = tuple(first.pool.instances)
    second_app = await create_cluster_app(ClusterSettings(
        data_dir=first.data_dir, instance_urls=urls, instance_token=INSTANCE_TOKEN, health_interval_s=0.2,
        instance_lost_s=1.0, redis_url=redis_url))
    second_server = await aiohttp_server(second_app)
    second = Cluster(first.data_dir, second_server, first.tokens, first.instances)
    try:
        await until(lambda: len(second_app[POOL].up()) == 2)
        alice_on_second = second.http("alice")
        ws = await alice_on_second.ws_connect("/ws?clientId=tab")
        await next_json(ws)
        alice_on_first, bob_on_second = first.http("alice"), second.http("bob")
        ids = []
        for index in range(6):
            response = await alice_on_first.post("/prompt", json={
                "prompt": graph("a", color=index, seconds=0.2), "client_id": "tab"})
            ids.append((await response.json())["prompt_id"])
        for index in range(2):
            await bob_on_second.post("/prompt", json={"prompt": graph("b", color=100 + index, seconds=0.2)})
        queue_first = await (await alice_on_first.get("/queue")).json()
        queue_second = await (await alice_on_second.get("/queue")).json()
        assert _ids(queue_first) <= set(ids) and _ids(queue_second) <= set(ids)
        # Alice's socket on the second proxy sees every one of her tasks end, whichever proxy ran it.
        pending = set(ids)
        while pending:
            event = await next_json(ws, timeout_s=30)
            if event["type"] == "executing" and event["data"].get("node") is None:
                pending.discard(event["data"]["prompt_id"])
        await until(lambda: _history_size(bob_on_second, 2), timeout_s=30)
        history = await (await alice_on_second.get("/history")).json()
        assert set(history) == set(ids)
        assert all(entry["status"]["status_str"] == "success" and "cluster" not in entry for entry in history.values())
        assert history == await (await alice_on_first.get("/history")).json()
        # Every task ran exactly once.
        runs = [first.app[POOL], second_app[POOL]]
        per_proxy = [sum(i.tasks_run for i in pool.instances.values()) for pool in runs]
        assert sum(per_proxy) == 8, per_proxy
        assert first.app[CORE] is not second_app[CORE]
    finally:
        await second.aclose()


def _ids(queue: dict[str, Any]) -> set[str]:
    return {item[1] for item in queue["queue_running"] + queue["queue_pending"]}


async def _history_size(http: Any, size: int) -> bool:
    return len(await (await http.get("/history")).json()) == size


async def test_a_proxy_that_goes_away_leaves_its_running_task_to_another(start_cluster, aiohttp_server,
                                                                        redis_url: str, data_dir: Path) -> None:
    from cluster_proxy.app import create_cluster_app
    from cluster_proxy.keys import CORE, POOL
    from cluster_proxy.settings import ClusterSettings

    install_gate_plugin(data_dir)
    first: Cluster = await start_cluster(instances=1, redis_url=redis_url)
    second_app = await create_cluster_app(ClusterSettings(
        data_dir=first.data_dir, instance_urls=tuple(first.pool.instances), instance_token=INSTANCE_TOKEN,
        health_interval_s=0.2, instance_lost_s=1.0, redis_url=redis_url))
    second = Cluster(first.data_dir, await aiohttp_server(second_app), first.tokens, first.instances)
    try:
        await until(lambda: len(second_app[POOL].up()) == 1)
        http = second.http("alice")
        response = await first.http("alice").post("/prompt", json={"prompt": graph("o", color=1, gate="o")})
        prompt_id = (await response.json())["prompt_id"]
        await until(lambda: any(run.last_node for run in first.core.runs.values()))
        await first.server.close()  # the first proxy goes away while its task runs
        open_gate(data_dir, "o")
        await until(lambda: _history_size(http, 1), timeout_s=30)
        entry = (await (await http.get(f"/history/{prompt_id}")).json())[prompt_id]
        assert entry["status"]["status_str"] == "success"
        assert "cluster" not in entry  # followed to its end, not run again
        assert second_app[CORE].proxy_id != first.core.proxy_id
    finally:
        await second.aclose()
