"""Cluster edition, ``--prefetch``: the next task waits in the busy instance's own queue, and nothing else changes.

Gated tasks (``support.server``: a node that holds its prompt until the test opens its gate, and
counts its runs on disk) make every step visible without sleeping: which task runs, which one
waits on the instance, and how many times each ever started.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from support.cluster import Cluster, ClusterFactory, InstanceProcess
from support.server import drain_gate_graph, install_gate_plugin, open_gate, runs_of
from support.wait import until


async def _submit(http: Any, gate: str) -> str:
    response = await http.post("/prompt", json={"prompt": drain_gate_graph(gate, gate)})
    assert response.status == 200, await response.text()
    return (await response.json())["prompt_id"]


async def _states(http: Any) -> list[tuple[str, Any]]:
    return [(q["state"], q["position"]) for q in (await (await http.get("/cluster/queue")).json())["queue"]]


async def _history(http: Any) -> dict[str, Any]:
    return await (await http.get("/history")).json()


async def _finished(http: Any, count: int) -> bool:
    return len(await _history(http)) == count


async def _states_are(http: Any, expected: list[tuple[str, Any]]) -> bool:
    return await _states(http) == expected


async def _handed_back(cluster: Cluster, prompt_id: str) -> bool:
    task = await cluster.core.store.get("alice", prompt_id)
    return task is not None and bool(task.notes)


class Queued(NamedTuple):
    cluster: Cluster
    http: Any  # alice's session
    ids: list[str]  # in submit order: one running per instance, then one waiting behind each


QueueAhead = Callable[..., Awaitable[Queued]]


@pytest.fixture
def queue_ahead(start_cluster: ClusterFactory, data_dir: Path) -> QueueAhead:
    """Start a cluster (``start_cluster`` options) and submit a gated task per gate name as alice, one
    running on each instance and the rest queued ahead on them: returns once each of those waits in its
    instance's own queue."""
    install_gate_plugin(data_dir)

    async def start(gates: list[str], instances: int = 1, **options: Any) -> Queued:
        cluster = await start_cluster(instances=instances, **options)
        http = cluster.http("alice")
        ids = [await _submit(http, gate) for gate in gates]
        for waiting in ids[len(cluster.pool.instances):]:
            await until(lambda: cluster.waiting_on_instance(waiting), what="a task queued on its instance")
        return Queued(cluster, http, ids)

    return start


async def test_the_next_task_waits_on_the_instance_and_shows_as_pending_until_it_starts(
        queue_ahead: QueueAhead, data_dir: Path) -> None:
    _, http, (first, second) = await queue_ahead(["p1", "p2"])
    await until(lambda: runs_of(data_dir, "p1") == 1)
    queue = await (await http.get("/queue")).json()
    assert [item[1] for item in queue["queue_running"]] == [first]
    assert [item[1] for item in queue["queue_pending"]] == [second]  # ComfyUI's own view: waiting
    assert await _states(http) == [("running", None), ("pending", 0)]
    page = await (await http.get("/dashboard")).text()
    assert "#1 in line" in page
    open_gate(data_dir, "p1")  # the instance's queue starts the second at once, no proxy in between
    await until(lambda: runs_of(data_dir, "p2") == 1)
    await until(lambda: _states_are(http, [("running", None)]))
    open_gate(data_dir, "p2")
    await until(lambda: _finished(http, 2), timeout_s=30)
    history = await _history(http)
    assert {h["status"]["status_str"] for h in history.values()} == {"success"}
    assert runs_of(data_dir, "p1") == runs_of(data_dir, "p2") == 1
    assert "cluster" not in history[second]  # no retry, no hand-back


async def test_deleting_the_waiting_task_and_interrupting_the_running_one_touch_only_their_own(
        queue_ahead: QueueAhead, data_dir: Path) -> None:
    cluster, http, (running, waiting) = await queue_ahead(["c1", "c2"])
    later = await _submit(http, "c3")
    await until(lambda: runs_of(data_dir, "c1") == 1)
    # Deleting the queued-ahead task takes it out of the instance's queue; the next one takes its place.
    assert (await http.post("/queue", json={"delete": [waiting]})).status == 200
    await until(lambda: cluster.waiting_on_instance(later))
    assert await cluster.core.store.get("alice", waiting) is None
    # Interrupting the running one stops it, not the one queued behind it.
    assert (await http.post("/interrupt", json={"prompt_id": running})).status == 200
    await until(lambda: runs_of(data_dir, "c3") == 1)
    open_gate(data_dir, "c3")
    await until(lambda: _finished(http, 2), timeout_s=30)
    history = await _history(http)
    assert history[running]["status"]["status_str"] != "success"
    assert history[later]["status"]["status_str"] == "success"
    assert waiting not in history and runs_of(data_dir, "c2") == 0


async def test_removing_an_instance_hands_its_waiting_task_back_and_the_running_one_finishes(
        queue_ahead: QueueAhead, data_dir: Path) -> None:
    cluster, http, ids = await queue_ahead([f"r{n}" for n in range(4)], instances=2)  # two run, two wait
    busy = cluster.run_of(ids[0]).instance
    waiting = next(p for p in ids[2:] if cluster.run_of(p).instance is busy)
    assert await cluster.core.remove_instance(busy.url, drain=True)
    # Back to the store at once, not left behind a task that may run for hours.
    await until(lambda: _handed_back(cluster, waiting))
    for n in range(4):
        open_gate(data_dir, f"r{n}")
    await until(lambda: _finished(http, 4), timeout_s=30)
    history = await _history(http)
    assert {h["status"]["status_str"] for h in history.values()} == {"success"}
    assert [runs_of(data_dir, f"r{n}") for n in range(4)] == [1, 1, 1, 1]
    assert history[waiting]["cluster"]["notes"] == ["handed back: instance 1 was removed by an admin"]
    await until(lambda: busy.url not in cluster.pool.instances)


async def test_an_instance_dying_under_a_running_and_a_waiting_task_sends_both_elsewhere_once(
        queue_ahead: QueueAhead, data_dir: Path) -> None:
    processes = [InstanceProcess(data_dir) for _ in range(2)]
    try:
        for process in processes:
            process.start()
        cluster, http, ids = await queue_ahead([f"d{n}" for n in range(4)], instances=0,
                                               instance_urls=tuple(p.url for p in processes))
        await until(lambda: runs_of(data_dir, "d0") == 1)
        url = cluster.run_of(ids[0]).instance.url
        waiting = next(p for p in ids[2:] if cluster.run_of(p).instance.url == url)
        victim = next(p for p in processes if p.url == url)
        victim.kill()
        await until(lambda: _handed_back(cluster, ids[0]), timeout_s=30)
        await until(lambda: _handed_back(cluster, waiting))
        for n in range(4):
            open_gate(data_dir, f"d{n}")
        await until(lambda: _finished(http, 4), timeout_s=60)
        history = await _history(http)
        assert {h["status"]["status_str"] for h in history.values()} == {"success"}
        gate = {ids[n]: f"d{n}" for n in range(4)}
        assert runs_of(data_dir, "d0") == 2  # cut off there, run once more elsewhere
        assert runs_of(data_dir, gate[waiting]) == 1  # it never started on the dead instance
        assert [runs_of(data_dir, gate[p]) for p in ids[1:] if p != waiting] == [1, 1]
        lost = f"instance {processes.index(victim) + 1} was lost"
        assert history[ids[0]]["cluster"] == {"attempts": 2, "notes": [lost]}
        assert history[waiting]["cluster"]["notes"] == [f"handed back: {lost} before it started"]
    finally:
        for process in processes:
            process.kill()


async def test_a_rolling_restart_hands_the_waiting_task_back_before_the_instance_restarts(
        queue_ahead: QueueAhead, data_dir: Path) -> None:
    cluster, http, (running, waiting) = await queue_ahead(["s1", "s2"])
    cluster.core.restart.start()
    await until(lambda: _handed_back(cluster, waiting))  # out of the instance's queue: the restart would drop it
    open_gate(data_dir, "s1")
    open_gate(data_dir, "s2")
    await until(lambda: _finished(http, 2), timeout_s=60)
    history = await _history(http)
    assert {h["status"]["status_str"] for h in history.values()} == {"success"}
    assert runs_of(data_dir, "s1") == runs_of(data_dir, "s2") == 1
    assert history[waiting]["cluster"]["notes"] == ["handed back: its instance restarts"]
    assert "cluster" not in history[running]
    await until(lambda: not cluster.core.restart.running, timeout_s=60)
    assert cluster.core.restart.status()["failed"] == {}


async def test_a_rolling_restart_proceeds_when_the_running_task_ends_while_the_waiting_one_is_taken_back(
        queue_ahead: QueueAhead, data_dir: Path) -> None:
    """The running task ends between the waiting task's removal from the instance's queue and the end of its
    withdrawal: the instance has already passed itself to the waiting task, which must not keep it busy (the
    rolling restart waited for it forever)."""
    cluster, http, (running, waiting) = await queue_ahead(["w1", "w2"])
    open_gate(data_dir, "w2")  # it runs once, after the restart
    instance = cluster.run_of(waiting).instance
    waiting_id = cluster.run_of(waiting).task.id
    delete_queued = instance.client.delete_queued

    async def delete_then_let_the_running_task_end(keys: list[str]) -> None:
        await delete_queued(keys)  # out of the instance's queue: it cannot start there
        open_gate(data_dir, "w1")
        await until(lambda: instance.task_id == waiting_id, what="the instance passed to the waiting task")

    restart = instance.client.restart
    leasable_while_restarting: list[bool] = []

    async def restart_once_no_task_holds_the_lease(timeout_s: float = 180.0) -> dict[str, Any]:
        # No task holds the instance now: a sibling proxy sharing the store must not find it leased.
        leasable_while_restarting.append(await cluster.core.store.lease_instance(instance.url, "sibling", 0.0))
        await cluster.core.store.release_instance(instance.url, "sibling")
        return await restart(timeout_s)

    instance.client.delete_queued = delete_then_let_the_running_task_end
    instance.client.restart = restart_once_no_task_holds_the_lease
    cluster.core.restart.start()
    await until(lambda: not cluster.core.restart.running, timeout_s=30, what="the rolling restart ended")
    assert cluster.core.restart.status()["failed"] == {}
    assert leasable_while_restarting == [True]
    await until(lambda: _finished(http, 2), timeout_s=30)
    history = await _history(http)
    assert {h["status"]["status_str"] for h in history.values()} == {"success"}
    assert runs_of(data_dir, "w1") == runs_of(data_dir, "w2") == 1
    assert history[waiting]["cluster"]["notes"] == ["handed back: its instance restarts"]


async def test_deleting_the_waiting_task_as_the_running_one_ends_leaves_the_instance_free(
        queue_ahead: QueueAhead, data_dir: Path) -> None:
    """The same race through a user's delete: the deleted task held the instance for good, which then showed
    as running for ever and took tasks only queued behind that phantom."""
    cluster, http, (running, waiting) = await queue_ahead(["d1", "d2"])
    instance = cluster.run_of(waiting).instance
    waiting_id = cluster.run_of(waiting).task.id
    delete_queued = instance.client.delete_queued

    async def delete_then_let_the_running_task_end(keys: list[str]) -> None:
        await delete_queued(keys)
        open_gate(data_dir, "d1")
        await until(lambda: instance.task_id == waiting_id, what="the instance passed to the waiting task")

    instance.client.delete_queued = delete_then_let_the_running_task_end
    assert (await http.post("/queue", json={"delete": [waiting]})).status == 200
    await until(lambda: _finished(http, 1), timeout_s=30)
    await until(lambda: instance.free, what="the instance is free")
    assert [i["running"] for i in cluster.pool.status()] == [False]
    assert waiting not in await _history(http) and runs_of(data_dir, "d2") == 0


async def test_a_drain_hands_the_waiting_task_back_to_the_store_and_lets_the_running_one_finish(
        queue_ahead: QueueAhead, data_dir: Path) -> None:
    cluster, http, (running, waiting) = await queue_ahead(["t1", "t2"])
    drain = asyncio.create_task(cluster.core.drain(30.0))  # what SIGTERM does
    await until(lambda: _handed_back(cluster, waiting))
    queue = await cluster.run_of(running).instance.client.queue()
    assert queue["queue_pending"] == []  # nothing left to start there once the proxy is gone
    open_gate(data_dir, "t1")
    await drain
    task = await cluster.core.store.get("alice", waiting)
    assert task is not None and task.state == "pending" and runs_of(data_dir, "t2") == 0  # for the next start
    assert (await cluster.core.store.get("alice", running)).state == "done"


class OnItsWay(NamedTuple):
    cluster: Cluster
    http: Any  # alice's session
    waiting: str  # the task whose submit was held on its way to the instance


class HeldSubmits:
    """The instance client's submits leave the proxy (a cancel cannot recall them) but are held on their way
    until the client's ``after`` call (a take-back's delete, a hand-back's interrupt) reached the instance, so
    they land right after it; or until the take-back says it waits for the submit's answer (the fix)."""

    def __init__(self, client: Any, after: str, caplog: pytest.LogCaptureFixture) -> None:
        self.client, self.after = client, after
        self.submit, self.call = client.submit, getattr(client, after)
        self.on_its_way, self.overtaken = asyncio.Event(), asyncio.Event()
        self.requests: list[asyncio.Future[str]] = []
        self.caplog = caplog
        client.submit = self._submit_on_its_way
        setattr(client, after, self._call_then_deliver)

    async def _deliver(self, *args: Any, **kwargs: Any) -> str:
        await until(lambda: self.overtaken.is_set() or "is on its way" in self.caplog.text,
                    what="the take-back began")
        return await self.submit(*args, **kwargs)

    async def _submit_on_its_way(self, *args: Any, **kwargs: Any) -> str:
        self.requests.append(asyncio.ensure_future(self._deliver(*args, **kwargs)))
        self.on_its_way.set()
        return await asyncio.shield(self.requests[-1])

    async def _call_then_deliver(self, *args: Any, **kwargs: Any) -> Any:
        result = await self.call(*args, **kwargs)
        self.overtaken.set()
        await asyncio.wait(self.requests)
        return result

    def restore(self) -> None:
        self.client.submit = self.submit
        setattr(self.client, self.after, self.call)


async def _submit_on_its_way(start_cluster: ClusterFactory, data_dir: Path, caplog: pytest.LogCaptureFixture,
                             take_back: Callable[[Cluster, str], Awaitable[None]]) -> OnItsWay:
    """Gated task f1 runs; f2 is queued ahead behind it, its submit leaving the proxy but held on the way until
    ``take_back`` has begun: until the delete of a take-back that did not wait reached the instance (the submit
    lands right after it), or the take-back says it waits for the answer. Returns once the take-back ended and
    the submit was delivered."""
    install_gate_plugin(data_dir)
    caplog.set_level(logging.INFO, logger="comfyserve.cluster.runner")
    cluster = await start_cluster(instances=1)
    http = cluster.http("alice")
    await _submit(http, "f1")
    await until(lambda: runs_of(data_dir, "f1") == 1)
    client = next(iter(cluster.pool.instances.values())).client
    held = HeldSubmits(client, "delete_queued", caplog)  # the submit lands before the take-back goes on
    waiting = await _submit(http, "f2")
    await held.on_its_way.wait()
    await take_back(cluster, waiting)
    await asyncio.wait(held.requests)
    held.restore()
    return OnItsWay(cluster, http, waiting)


async def _instance_idle(cluster: Cluster) -> bool:
    queue = await next(iter(cluster.pool.instances.values())).client.queue()
    return not queue["queue_running"] and not queue["queue_pending"]


async def test_deleting_the_waiting_task_while_its_submit_is_on_its_way_keeps_it_off_the_instance(
        start_cluster: ClusterFactory, data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The delete waits for the submit's answer, then takes the task out of the instance's queue: cancelled
    mid-request, the submit reached the instance after the delete, and the deleted task ran there unseen."""
    async def delete(cluster: Cluster, prompt_id: str) -> None:
        assert (await cluster.http("alice").post("/queue", json={"delete": [prompt_id]})).status == 200

    cluster, http, waiting = await _submit_on_its_way(start_cluster, data_dir, caplog, delete)
    assert await cluster.core.store.get("alice", waiting) is None
    open_gate(data_dir, "f2")
    open_gate(data_dir, "f1")
    await until(lambda: _finished(http, 1), timeout_s=30)
    await until(lambda: _instance_idle(cluster), what="the instance's queue is empty")
    assert runs_of(data_dir, "f2") == 0 and waiting not in await _history(http)


async def test_a_drain_while_the_waiting_task_is_on_its_way_hands_it_back_without_it_running_there(
        start_cluster: ClusterFactory, data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A take-back (here a drain) waits for the submit's answer too: the task it hands back to the store must
    not also run on the instance, unseen (twice, counting its run from the store)."""
    drains: list[asyncio.Task[None]] = []

    async def drain(cluster: Cluster, prompt_id: str) -> None:
        drains.append(asyncio.create_task(cluster.core.drain(30.0)))  # what SIGTERM does
        await until(lambda: _handed_back(cluster, prompt_id), what="the waiting task handed back")

    cluster, http, waiting = await _submit_on_its_way(start_cluster, data_dir, caplog, drain)
    open_gate(data_dir, "f2")
    open_gate(data_dir, "f1")
    await drains[0]
    await until(lambda: _instance_idle(cluster), what="the instance's queue is empty")
    task = await cluster.core.store.get("alice", waiting)
    assert task is not None and task.state == "pending" and runs_of(data_dir, "f2") == 0  # runs once, later



async def test_a_drain_that_cuts_a_task_whose_submit_is_on_its_way_never_lets_it_also_run_there_unseen(
        start_cluster: ClusterFactory, data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A running task handed back (here a drain's limit cuts it) waits for its submit's answer, then takes it
    off the instance: an interrupt that overtook the submit found nothing, and the task handed back to the store
    ran to its end on the instance all the same, unseen (twice, counting its run from the store)."""
    install_gate_plugin(data_dir)
    caplog.set_level(logging.INFO, logger="comfyserve.cluster.runner")
    cluster = await start_cluster(instances=1)
    http = cluster.http("alice")
    client = next(iter(cluster.pool.instances.values())).client
    held = HeldSubmits(client, "interrupt", caplog)  # the submit lands right after the interrupt
    cut = await _submit(http, "c1")
    await held.on_its_way.wait()
    key = cluster.run_of(cut).key
    await cluster.core.drain(0.0)  # what SIGTERM does, its limit already reached
    await asyncio.wait(held.requests)
    held.restore()
    open_gate(data_dir, "c1")
    await until(lambda: _instance_idle(cluster), what="the instance's queue is empty")
    task = await cluster.core.store.get("alice", cut)
    entry = await client.history_entry(key)
    assert task is not None and task.state == "pending" and runs_of(data_dir, "c1") <= 1  # runs once, later
    assert entry is None or entry["status"]["status_str"] != "success"


async def test_a_hand_back_interrupts_again_a_task_the_instance_took_but_had_not_yet_begun(
        start_cluster: ClusterFactory, data_dir: Path) -> None:
    """An interrupt that reaches the instance between its taking the prompt off its queue and starting it is
    lost (a pending interrupt is cleared as a prompt starts; here the first one is dropped as if it came then):
    the hand-back sends it again while the task shows as running there, so it does not run to its end unseen."""
    install_gate_plugin(data_dir)
    cluster = await start_cluster(instances=1)
    http = cluster.http("alice")
    client = next(iter(cluster.pool.instances.values())).client
    interrupt, delete_queued = client.interrupt, client.delete_queued
    lost: list[str | None] = []

    async def delete_once_taken(keys: list[str]) -> None:
        await until(lambda: runs_of(data_dir, "w1") == 1, what="the instance took the task")
        await delete_queued(keys)

    async def first_one_lost(prompt_id: str | None = None) -> None:
        if not lost:
            lost.append(prompt_id)
            return
        await interrupt(prompt_id)

    cut = await _submit(http, "w1")
    await until(lambda: cluster.run_of(cut) is not None and cluster.run_of(cut).submit is not None)
    key = cluster.run_of(cut).key
    client.interrupt, client.delete_queued = first_one_lost, delete_once_taken
    await cluster.core.drain(0.0)  # what SIGTERM does, its limit already reached
    client.interrupt, client.delete_queued = interrupt, delete_queued
    open_gate(data_dir, "w1")
    await until(lambda: _instance_idle(cluster), what="the instance's queue is empty")
    task = await cluster.core.store.get("alice", cut)
    entry = await client.history_entry(key)
    assert lost == [key] and task is not None and task.state == "pending" and runs_of(data_dir, "w1") == 1
    assert entry is None or entry["status"]["status_str"] != "success"


async def test_removing_an_instance_keeps_the_result_of_a_task_that_finished_there_before_it_was_stopped(
        start_cluster: ClusterFactory, data_dir: Path) -> None:
    """A task the hand-back finds finished on the instance (it ended before the delete and interrupt reached it)
    is not queued again: its result is recorded, it ran once, and the instance leaves once that is done."""
    install_gate_plugin(data_dir)
    cluster = await start_cluster(instances=1)
    http = cluster.http("alice")
    instance = next(iter(cluster.pool.instances.values()))
    client = instance.client
    delete_queued = client.delete_queued
    ended = await _submit(http, "e1")
    await until(lambda: runs_of(data_dir, "e1") == 1)
    key = cluster.run_of(ended).key

    async def delete_once_finished(keys: list[str]) -> None:
        open_gate(data_dir, "e1")
        await until(lambda: client.history_entry(key), what="the task finished on the instance")
        await delete_queued(keys)

    client.delete_queued = delete_once_finished
    assert await cluster.core.remove_instance(instance.url, drain=False)
    await until(lambda: _finished(http, 1), timeout_s=30)
    await until(lambda: instance.url not in cluster.pool.instances, what="the instance left the pool")
    assert (await _history(http))[ended]["status"]["status_str"] == "success"
    assert (await cluster.core.store.get("alice", ended)).state == "done" and runs_of(data_dir, "e1") == 1
