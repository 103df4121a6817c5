"""Cluster edition: the pool — instances dying mid-task, coming back, added at run time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.cluster import Cluster, InstanceProcess, files_under, graph
from support.server import events_until, install_gate_plugin, is_done, next_json, open_gate
from support.wait import until


@pytest.fixture
def gated(data_dir: Path) -> Path:
    """The data dir with the gate plugin, installed before ``instance_processes`` start on it."""
    install_gate_plugin(data_dir)
    return data_dir


async def test_a_task_whose_instance_dies_is_retried_elsewhere_and_the_user_is_told(
        gated: Path, start_cluster, instance_processes: list[InstanceProcess]) -> None:
    cluster: Cluster = await start_cluster(instances=0, instance_urls=tuple(p.url for p in instance_processes),
                                           admin="bob")
    http = cluster.http("alice")
    ws = await http.ws_connect("/ws?clientId=tab")
    await next_json(ws)
    response = await http.post("/prompt", json={"prompt": graph("r", color=5, gate="r"), "client_id": "tab"})
    prompt_id = (await response.json())["prompt_id"]
    await until(lambda: cluster.core.runs)
    await events_until(ws, lambda e: e["type"] == "executing" and e["data"].get("node") == "2")
    run = next(iter(cluster.core.runs.values()))
    victim = next(p for p in instance_processes if p.url == run.instance.url)
    survivor = next(p for p in instance_processes if p is not victim)
    victim.kill()
    open_gate(gated, "r")  # the victim is gone: only the retry can pass it
    events = await events_until(ws, is_done(prompt_id), timeout_s=30)
    retry = next(e for e in events if e["type"] == "cluster_task_retry")
    assert retry["data"]["prompt_id"] == prompt_id and retry["data"]["reason"].endswith("was lost")
    assert victim.url not in json.dumps(events)  # users never learn an instance's URL
    assert "execution_success" in [e["type"] for e in events]
    entry = (await (await http.get(f"/history/{prompt_id}")).json())[prompt_id]
    assert entry["status"]["status_str"] == "success"
    assert entry["cluster"]["attempts"] == 2
    assert victim.url not in json.dumps(entry)
    assert files_under(cluster.user_dir("alice") / "output") == ["r_00001_.png"]
    assert cluster.pool.instances[victim.url].state == "down"
    assert cluster.pool.instances[survivor.url].tasks_run == 1
    # The instance comes back: it rejoins and takes work again.
    victim.start()
    await until(lambda: cluster.pool.instances[victim.url].state == "up")
    status = await (await cluster.http("bob").get("/cluster/instances")).json()  # admins see the pool
    assert {i["state"] for i in status["instances"]} == {"up"}


async def test_an_admin_adds_an_instance_at_run_time(start_cluster, instance_processes) -> None:
    cluster: Cluster = await start_cluster(instances=0, users=("root", "alice"), admin="root")
    http = cluster.http("alice")
    response = await http.post("/prompt", json={"prompt": graph("later", color=7)})
    assert response.status == 200  # queued although no instance is up yet
    prompt_id = (await response.json())["prompt_id"]
    refused = await http.post("/cluster/instances", json={"url": instance_processes[0].url})
    assert refused.status == 403
    added = await cluster.http("root").post("/cluster/instances", json={"url": instance_processes[0].url})
    assert added.status == 200
    alice = cluster.user("alice")
    await until(lambda: _done(alice, prompt_id), timeout_s=20)
    assert await cluster.core.store.instance_urls() == [instance_processes[0].url]


async def _done(client, prompt_id: str) -> bool:
    return bool(await client.history(prompt_id))
