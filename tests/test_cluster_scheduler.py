"""Cluster edition: scheduling (order, fair share, positions), interrupts and deletes per user."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from cluster_proxy import runner
from cluster_proxy.graph import stage_graph
from cluster_proxy.pool import Instance, Pool
from cluster_proxy.scheduler import Scheduler, dispatch_order, pick_instance
from cluster_proxy.store import SqliteStateStore, Task
from standard.client import InstanceClient
from support.clock import FakeClock
from support.cluster import INSTANCE_TOKEN, Cluster, graph
from support.server import events_until, install_gate_plugin, is_done, next_json, open_gate
from support.wait import until


def _task(user: str, seq: int, models: list[str] | None = None) -> Task:
    return Task(id=f"{user}{seq}", user=user, prompt_id=f"{user}{seq}", number=seq, seq=seq, prompt={},
                extra_data={}, outputs_to_execute=[], models=models or [])


def test_dispatch_order_shares_fairly_and_keeps_each_users_order() -> None:
    pending = [_task("a", i) for i in range(1, 5)] + [_task("b", 10), _task("b", 11), _task("c", 20)]
    order = [t.id for t in dispatch_order(pending, {}, {})]
    assert order == ["a1", "b10", "c20", "a2", "b11", "a3", "a4"]
    # A user already running a task waits behind those who run none.
    order = [t.id for t in dispatch_order(pending, {"a": 1}, {})]
    assert order[:3] == ["b10", "c20", "a1"]


def test_an_instance_that_ran_the_models_is_preferred() -> None:
    one = Instance("http://one", client=None, state="up", models={"x.safetensors"}, last_used_s=5.0)  # type: ignore[arg-type]
    two = Instance("http://two", client=None, state="up", models=set(), last_used_s=1.0)  # type: ignore[arg-type]
    assert pick_instance([one, two], _task("a", 1, ["x.safetensors"])) is one
    assert pick_instance([one, two], _task("a", 1, ["y.safetensors"])) is two  # idle longest


class _Started:
    """A scheduler over a real store and hand-made instances; records what it starts where."""

    def __init__(self, tmp_path: Any, instances: list[Instance], **options: Any) -> None:
        self.store = SqliteStateStore(tmp_path / "state.sqlite")
        self.pool = Pool(health_interval_s=1, lost_after_s=1, info_cache_s=1)
        for instance in instances:
            self.pool.instances[instance.url] = instance
        self.clock = FakeClock()
        self.started: list[tuple[str, str]] = []
        self.scheduler = Scheduler(self.store, self.pool, lambda t, i: self.started.append((t.id, i.url)),
                                   self._nothing, clock=self.clock, **options)

    @staticmethod
    async def _nothing() -> None:
        return None

    async def add(self, *tasks: Task) -> None:
        for task in tasks:
            assert await self.store.add(task)

    async def next(self) -> list[tuple[str, str]]:
        """Dispatch; what started, and the instances free again (as if those tasks ended at once)."""
        before = len(self.started)
        await self.scheduler.dispatch()
        new = self.started[before:]
        for task_id, url in new:
            done = await self.store.finish(task_id, {})
            assert done is not None
            await self.store.release_instance(url, task_id)
            self.pool.release(self.pool.instances[url], task_id, done.models)
        return new


def _up(url: str, models: set[str] | None = None) -> Instance:
    return Instance(url, client=None, state="up", models=models or set())  # type: ignore[arg-type]


async def test_affinity_picks_a_users_task_whose_model_an_instance_holds_but_never_past_the_bound(tmp_path) -> None:
    sched = _Started(tmp_path, [_up("http://x", {"x.ckpt"})], prefetch=0, affinity_wait_s=5.0)
    await sched.add(_task("a", 1, ["y.ckpt"]), *[_task("a", n, ["x.ckpt"]) for n in (2, 3, 4)])
    assert await sched.next() == [("a2", "http://x")]  # a1 is passed over: its clock starts
    sched.clock.advance(4.9)
    assert await sched.next() == [("a3", "http://x")]
    sched.clock.advance(0.1)  # a1 has waited the bound: it goes, though a4 matches
    assert await sched.next() == [("a1", "http://x")]
    assert await sched.next() == [("a4", "http://x")]


async def test_affinity_never_passes_over_the_user_whose_turn_it_is(tmp_path) -> None:
    busy = _up("http://busy")
    busy.task_id = "a0"
    sched = _Started(tmp_path, [_up("http://x", {"x.ckpt"}), busy], prefetch=0, affinity_wait_s=5.0)
    await sched.store.add(_task("a", 0))
    await sched.store.claim("a0", "http://busy")  # alice runs one: bob's turn
    await sched.add(_task("a", 1, ["x.ckpt"]), _task("b", 2, ["y.ckpt"]))
    assert await sched.next() == [("b2", "http://x")]


async def test_without_affinity_or_known_models_tasks_go_in_order(tmp_path) -> None:
    # Off: the first task goes first, whatever the instance holds. A task whose models are unknown fits
    # any instance: never passed over for one that matches.
    for wait_s, first in ((0.0, ["y.ckpt"]), (5.0, [])):
        (tmp_path / f"w{wait_s}").mkdir()
        sched = _Started(tmp_path / f"w{wait_s}", [_up("http://x", {"x.ckpt"})], prefetch=0,
                         affinity_wait_s=wait_s)
        await sched.add(_task("a", 1, first), _task("a", 2, ["x.ckpt"]), _task("a", 3, []))
        assert [await sched.next() for _ in range(3)] == [[("a1", "http://x")], [("a2", "http://x")],
                                                          [("a3", "http://x")]]


async def test_equal_users_go_where_their_models_are_and_checkpoints_spread(tmp_path) -> None:
    sched = _Started(tmp_path, [_up("http://x", {"x.ckpt"}), _up("http://y", {"y.ckpt"}), _up("http://z")],
                     prefetch=0, affinity_wait_s=5.0)
    await sched.add(_task("a", 1, ["y.ckpt"]), _task("b", 2, ["x.ckpt"]), _task("c", 3, ["x.ckpt"]),
                    _task("c", 4, ["w.ckpt"]))
    started = dict(await sched.next())
    # Each user one task (fair share); each to the instance holding its model; c's needs a load
    # anyway: the one no instance holds, on the instance holding none of the waiting ones.
    assert started == {"a1": "http://y", "b2": "http://x", "c4": "http://z"}


async def test_a_busy_instance_is_queued_ahead_only_work_it_holds_the_models_for(tmp_path) -> None:
    x, y = _up("http://x", {"x.ckpt"}), _up("http://y", {"y.ckpt"})
    x.task_id, y.task_id, y.ahead = "b0", "r2", ["r3"]  # both run a task; y has one queued behind it
    sched = _Started(tmp_path, [x, y], prefetch=1, affinity_wait_s=5.0)
    await sched.add(_task("b", 0))
    await sched.store.claim("b0", "http://x")  # bob runs one: alice's turn
    await sched.add(_task("a", 1, ["y.ckpt"]), _task("b", 2, ["x.ckpt"]))
    assert await sched.scheduler.dispatch() == 0  # x's model is still wanted: no load of y.ckpt queued there
    await sched.add(_task("a", 3, ["z.ckpt"]))  # no instance holds it: a load, but not on a busy instance
    assert await sched.scheduler.dispatch() == 0 and x.ahead == []
    await sched.add(_task("a", 4, ["x.ckpt"]))  # one x holds the model for: queued ahead at once
    assert await sched.scheduler.dispatch() == 1 and x.ahead == ["a4"]


async def test_a_load_on_a_busy_instance_waits_for_its_last_step_and_the_work_waiting_then(tmp_path) -> None:
    # A burst: bob's y.ckpt task arrives before alice's next x.ckpt one. Queued on x at once, the load would
    # take x.ckpt away from the task that arrives a moment later; decided at a0's last step, x keeps it.
    x = _up("http://x", {"x.ckpt"})
    x.task_id = "a0"
    sched = _Started(tmp_path, [x], prefetch=1, affinity_wait_s=5.0)
    await sched.add(_task("a", 0, ["x.ckpt"]))
    await sched.store.claim("a0", "http://x")
    await sched.add(_task("b", 1, ["y.ckpt"]))
    assert await sched.scheduler.dispatch() == 0 and x.ahead == []  # nobody waits for x.ckpt now: still no load
    await sched.add(_task("a", 2, ["x.ckpt"]))
    sched.scheduler.last_step(x, "a0")
    assert await sched.scheduler.dispatch() == 1 and x.ahead == ["a2"]


async def test_a_model_no_instance_holds_goes_first_to_a_spare_instance(tmp_path) -> None:
    # x and y both hold x.ckpt; alice's w.ckpt task would wait for the bound behind her x.ckpt ones. The spare
    # instance that would load it (idle longest: x) keeps its slot empty while busy and takes it at its last
    # step; y goes on with x.ckpt.
    x, y = _up("http://x", {"x.ckpt"}), _up("http://y", {"x.ckpt"})
    x.task_id, y.task_id, x.last_used_s, y.last_used_s = "b0", "b9", 1.0, 2.0
    sched = _Started(tmp_path, [x, y], prefetch=1, affinity_wait_s=5.0)
    await sched.add(_task("b", 0), _task("b", 9))
    await sched.store.claim("b0", "http://x")
    await sched.store.claim("b9", "http://y")
    await sched.add(_task("a", 1, ["x.ckpt"]), _task("a", 2, ["w.ckpt"]), _task("a", 3, ["x.ckpt"]))
    assert await sched.scheduler.dispatch() == 1 and y.ahead == ["a1"] and x.ahead == []
    sched.scheduler.last_step(x, "b0")
    assert await sched.scheduler.dispatch() == 1 and x.ahead == ["a2"] and x.models == {"w.ckpt"}
    # Idle: the same, at once.
    (tmp_path / "idle").mkdir()
    idle = _Started(tmp_path / "idle", [_up("http://x", {"x.ckpt"}), _up("http://y", {"x.ckpt"})], prefetch=0,
                    affinity_wait_s=5.0)
    await idle.add(_task("a", 1, ["x.ckpt"]), _task("a", 2, ["w.ckpt"]), _task("a", 3, ["x.ckpt"]))
    assert dict(await idle.next()) == {"a2": "http://x", "a1": "http://y"}


async def test_before_any_load_was_seen_a_model_being_loaded_is_loaded_again_from_four_tasks_per_holder(
        tmp_path) -> None:
    # The start of a burst: its first tasks all want a.ckpt, d's b.ckpt one comes a moment later. x loads a.ckpt;
    # y and z (holding the warm-up's model) do not load it too for two tasks: one of them is there for d's.
    warm = {"w.ckpt"}
    sched = _Started(tmp_path, [_up("http://x", warm), _up("http://y", warm), _up("http://z", warm)], prefetch=0,
                     affinity_wait_s=5.0)
    await sched.add(_task("a", 1, ["a.ckpt"]), _task("b", 2, ["a.ckpt"]), _task("c", 3, ["a.ckpt"]))
    assert await sched.scheduler.dispatch() == 1 and sched.started == [("a1", "http://x")]
    await sched.add(_task("d", 4, ["b.ckpt"]))
    assert await sched.scheduler.dispatch() == 1 and sched.started[1][0] == "d4"
    await sched.add(_task("b", 5, ["a.ckpt"]), _task("c", 6, ["a.ckpt"]))  # 4 tasks for 1 holder: a load pays
    assert await sched.scheduler.dispatch() == 1 and sched.started[2][0] == "b2"
    # Instances holding nothing yet (a pool just started) take the first tasks as without affinity.
    (tmp_path / "fresh").mkdir()
    fresh = _Started(tmp_path / "fresh", [_up("http://x"), _up("http://y"), _up("http://z")], prefetch=0,
                     affinity_wait_s=5.0)
    await fresh.add(_task("a", 1, ["a.ckpt"]), _task("b", 2, ["a.ckpt"]), _task("c", 3, ["a.ckpt"]))
    assert await fresh.scheduler.dispatch() == 3


async def test_an_instance_about_to_be_free_is_chosen_for_as_if_idle(tmp_path) -> None:
    # x runs alice's a0. Busy, it is queued ahead on bob's turn (alice runs one): bob's task needs a load, which
    # waits. Once a0 reported its last step, x is chosen for as at a0's end: alice's turn again, and her task x
    # holds the model for, no load.
    for last_step, expected in ((False, None), (True, "a1")):
        (tmp_path / str(last_step)).mkdir()
        x = _up("http://x", {"x.ckpt"})
        x.task_id = "a0"
        sched = _Started(tmp_path / str(last_step), [x], prefetch=1, affinity_wait_s=5.0)
        await sched.add(_task("a", 0, ["x.ckpt"]))
        await sched.store.claim("a0", "http://x")
        await sched.add(_task("a", 1, ["x.ckpt"]), _task("b", 2, ["z.ckpt"]))
        if last_step:
            sched.scheduler.last_step(x, "a0")
        started = await sched.scheduler.dispatch()
        assert (started, x.ahead) == ((0, []) if expected is None else (1, [expected]))


async def test_without_affinity_an_idle_instance_goes_before_one_about_to_be_free(tmp_path) -> None:
    x, y = _up("http://x", {"x.ckpt"}), _up("http://y")
    x.task_id = "a0"
    sched = _Started(tmp_path, [x, y], prefetch=1, affinity_wait_s=0.0)
    sched.scheduler.last_step(x, "a0")  # x holds the model, but its task still runs: y takes it now
    await sched.add(_task("a", 1, ["x.ckpt"]))
    assert await sched.next() == [("a1", "http://y")] and x.ahead == []


async def test_a_last_step_counts_only_for_the_task_running_and_not_without_prefetch(tmp_path) -> None:
    x = _up("http://x", {"x.ckpt"})
    x.task_id = "a0"
    sched = _Started(tmp_path, [x], prefetch=1, affinity_wait_s=5.0)
    sched.scheduler.last_step(x, "a9")  # a task that ran there before, or one still queued
    assert not x.finishing
    sched.scheduler.last_step(x, "a0")
    assert x.finishing
    x.task_id = "a1"  # the next one runs now
    assert not x.finishing
    off = _Started(tmp_path, [_up("http://y")], prefetch=0)
    y = off.pool.instances["http://y"]
    y.task_id = "a0"
    off.scheduler.last_step(y, "a0")
    assert not y.finishing and off.scheduler.slots() == []


async def test_a_task_queued_behind_one_that_ends_during_its_claim_holds_the_instance(tmp_path) -> None:
    # The claim of a task queued ahead is awaited; the run it was queued behind may end meanwhile (a task held
    # at a gate opened with the next ones). It used to stay "ahead" of nothing: the instance looked idle, and the
    # next task was claimed as running there while it waited behind this one.
    x = _up("http://x")
    x.task_id = "a0"
    sched = _Started(tmp_path, [x], prefetch=1)
    claim = sched.store.claim

    async def ends_meanwhile(task_id: str, instance: str, proxy: str = "", ahead: bool = False) -> Task | None:
        if x.task_id == "a0":
            sched.pool.release(x, "a0")
        return await claim(task_id, instance, proxy, ahead)

    sched.store.claim = ends_meanwhile  # type: ignore[method-assign]
    await sched.add(_task("b", 1), _task("a", 2))
    await sched.scheduler.dispatch()
    assert (x.task_id, x.ahead) == ("b1", ["a2"])  # b1 runs; a2 is queued behind it
    assert [(t.id, t.queued_ahead) for t in await sched.store.running()] == [("b1", True), ("a2", True)]
    assert not await sched.store.lease_instance("http://x", "a2", 15.0)  # b1 holds the lease
    sched.pool.withdraw(x, "b1")  # b1 deleted before it started: a2 holds the instance
    assert (x.task_id, x.ahead) == ("a2", [])
    sched.pool.withdraw(x, "a2")
    assert x.free


async def _submit(http: Any, prompt: dict, **extra: Any) -> str:
    response = await http.post("/prompt", json={"prompt": prompt, **extra})
    assert response.status == 200, await response.text()
    return (await response.json())["prompt_id"]


async def _history(http: Any) -> dict:
    return await (await http.get("/history")).json()


@pytest.mark.parametrize("prefetch", [0, 1])
async def test_a_late_user_is_not_starved_and_sees_their_wait_position(start_cluster, data_dir: Path,
                                                                       prefetch: int) -> None:
    # With --prefetch 1 alice's second task was queued on the instance (her turn: bob had none) before
    # bob came: it stays first in line, shown pending; bob's goes next, ahead of alice's others.
    install_gate_plugin(data_dir)
    cluster: Cluster = await start_cluster(instances=1, prefetch=prefetch)
    http_a, http_b = cluster.http("alice"), cluster.http("bob")
    alice_ids = [await _submit(http_a, graph("a", color=i, gate="a")) for i in range(4)]  # held until seen
    await until(lambda: len(cluster.core.runs) == 1 + prefetch)
    bob_id = await _submit(http_b, graph("b", color=99, seconds=0.05))
    queue = (await (await http_b.get("/cluster/queue")).json())["queue"]
    assert queue == [{"prompt_id": bob_id, "position": prefetch, "state": "pending", "notes": []}]
    alice_queue = (await (await http_a.get("/cluster/queue")).json())["queue"]
    assert [q["state"] for q in alice_queue] == ["running", "pending", "pending", "pending"]
    assert [q["position"] for q in alice_queue[1:]] == ([1, 2, 3] if prefetch == 0 else [0, 2, 3])
    assert bob_id not in str(alice_queue)
    open_gate(data_dir, "a")
    await until(lambda: _all_done(cluster, 5), timeout_s=30)
    tasks = [t for u in ("alice", "bob") for t in await cluster.core.store.user_tasks(u, "done")]
    started = [t.prompt_id for t in sorted(tasks, key=lambda t: t.started_ms)]
    assert started[:2 + prefetch] == [*alice_ids[:1 + prefetch], bob_id]
    assert [p for p in started if p != bob_id] == alice_ids  # alice's in her order


async def test_a_task_queued_ahead_reaches_its_instance_behind_the_one_handed_out_before_it(
        start_cluster, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each run stages its graph in a thread before it submits: alice's a1, queued ahead first, is slow at it
    # (held until bob's is staged); bob's, handed out behind it, must not overtake it in the instance's queue.
    install_gate_plugin(data_dir)
    bob_staged = threading.Event()

    def stage(prompt: dict[str, Any], *args: Any) -> dict[str, Any]:
        color = prompt["1"]["inputs"]["color"]
        if color == 1:
            assert bob_staged.wait(30)
        staged = stage_graph(prompt, *args)
        if color == 99:
            bob_staged.set()
        return staged

    monkeypatch.setattr(runner, "stage_graph", stage)
    cluster: Cluster = await start_cluster(instances=1, prefetch=1)
    http_a, http_b = cluster.http("alice"), cluster.http("bob")
    a0 = await _submit(http_a, graph("a", color=0, gate="a0"))
    await until(lambda: len(cluster.core.runs) == 1)
    a1 = await _submit(http_a, graph("a", color=1))
    await until(lambda: len(cluster.core.runs) == 2)  # queued ahead behind a0, still staging
    b = await _submit(http_b, graph("b", color=99))
    open_gate(data_dir, "a0")  # a1 holds the instance now; bob's goes ahead behind it
    await until(lambda: _all_done(cluster, 3), timeout_s=30)
    tasks = [t for u in ("alice", "bob") for t in await cluster.core.store.user_tasks(u, "done")]
    assert [t.prompt_id for t in sorted(tasks, key=lambda t: t.started_ms)] == [a0, a1, b]


async def _all_done(cluster: Cluster, count: int) -> bool:
    done = sum([len(await cluster.core.store.user_tasks(u, "done")) for u in ("alice", "bob")])
    return done == count


async def test_queue_lists_only_the_users_tasks_and_deletes_only_theirs(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=1)
    http_a, http_b = cluster.http("alice"), cluster.http("bob")
    running = await _submit(http_a, graph("a", color=1, seconds=1.0))
    waiting_a = await _submit(http_a, graph("a", color=2, seconds=0.1))
    waiting_b = await _submit(http_b, graph("b", color=3, seconds=0.1))
    queue_a = await (await http_a.get("/queue")).json()
    ids_a = [item[1] for item in queue_a["queue_running"] + queue_a["queue_pending"]]
    assert set(ids_a) == {running, waiting_a}
    jobs_b = await (await http_b.get("/jobs")).json()
    assert [job["id"] for job in jobs_b["jobs"]] == [waiting_b]
    # Alice names bob's task: refused, and bob's task stays.
    response = await http_a.post("/queue", json={"delete": [waiting_b]})
    assert response.status == 404
    assert await (await http_a.post(f"/jobs/{waiting_b}/cancel")).json() == {"cancelled": False}
    assert (await http_a.post("/interrupt", json={"prompt_id": waiting_b})).status == 404
    queue_b = await (await http_b.get("/queue")).json()
    assert [item[1] for item in queue_b["queue_pending"]] == [waiting_b]
    # Her own: fine.
    assert (await http_a.post("/queue", json={"delete": [waiting_a]})).status == 200
    queue_a = await (await http_a.get("/queue")).json()
    assert queue_a["queue_pending"] == []
    # "clear" clears only hers.
    await http_a.post("/queue", json={"clear": True})
    assert [item[1] for item in (await (await http_b.get("/queue")).json())["queue_pending"]] == [waiting_b]


async def _running_everywhere(cluster: Cluster) -> bool:
    """Each instance of the cluster is executing a prompt (asked directly, with the instance token)."""
    for server in cluster.instances:
        async with InstanceClient(str(server.make_url("")).rstrip("/"), INSTANCE_TOKEN) as instance:
            if not (await instance.queue())["queue_running"]:
                return False
    return True


async def test_interrupt_stops_only_the_users_own_task(start_cluster, data_dir: Path) -> None:
    install_gate_plugin(data_dir)
    cluster: Cluster = await start_cluster(instances=2)
    http_a, http_b = cluster.http("alice"), cluster.http("bob")
    ws_b = await http_b.ws_connect("/ws?clientId=b")
    await next_json(ws_b)
    # Both held at their gates until the test opens them; both stop on an interrupt that reaches them.
    task_a = await _submit(http_a, graph("a", color=1, gate="a", interruptible=True))
    task_b = await _submit(http_b, graph("b", color=2, gate="b", interruptible=True), client_id="b")
    await until(lambda: len(cluster.core.runs) == 2)
    await until(lambda: _running_everywhere(cluster))  # both prompts execute on their instances
    assert (await http_b.post("/interrupt", json={"prompt_id": task_a})).status == 404
    assert (await http_a.post("/interrupt", json={})).status == 200  # global: only alice's tasks
    alice = cluster.user("alice")
    await until(lambda: _status(alice, task_a))
    assert await _status(alice, task_a) == "error"
    entry = (await alice.history(task_a))[task_a]
    assert "execution_interrupted" in [m[0] for m in entry["status"]["messages"]]
    open_gate(data_dir, "b")  # only now: bob's task was still waiting at its gate when alice's was cut
    events = await events_until(ws_b, is_done(task_b))
    assert "execution_success" in [e["type"] for e in events], " ".join(e["type"] for e in events)


async def _status(client: Any, prompt_id: str) -> str | None:
    entry = (await client.history(prompt_id)).get(prompt_id)
    return entry["status"]["status_str"] if entry else None


async def test_history_deletes_only_the_users_items(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=1)
    alice, bob = cluster.user("alice"), cluster.user("bob")
    result_a = await alice.run(graph("a", color=1), timeout_s=30)
    result_b = await bob.run(graph("b", color=2), timeout_s=30)
    http_a = cluster.http("alice")
    assert (await http_a.post("/history", json={"delete": [result_b.prompt_id]})).status == 404
    assert list(await bob.history()) == [result_b.prompt_id]
    await http_a.post("/history", json={"clear": True})
    assert await alice.history() == {}
    assert list(await bob.history()) == [result_b.prompt_id]
    assert result_a.ok
