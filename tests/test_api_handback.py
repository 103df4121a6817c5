"""The hand-back with --prefetch: a task queued ahead on a busy worker's instance goes to a worker that became
idle (``queue_service.handback``), unless it has started; either way it runs once and has one result."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_api_limits import queue_length
from test_api_prefetch import instance_queue, queued_behind, state_of, status

from api_edition.settings import WorkerSettings
from api_edition.worker import Worker
from queue_service import watch as watch_module
from support.api import SERVICE, TOKEN, ApiFactory, LiveApi, read_results, results_final
from support.server import drain_gate_graph, gated_graph, install_gate_plugin, open_gate, runs_of, tiny_graph
from support.wait import until


async def history(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(trust_env=False) as http:
        return (await http.get(f"{url}/history", headers={"Authorization": TOKEN})).json()


def ran_there(entries: dict[str, Any], prefix: str) -> bool:
    """A prompt saving under ``prefix`` is in an instance's history."""
    return any(node.get("inputs", {}).get("filename_prefix") == prefix
               for entry in entries.values() for node in entry["prompt"][2].values())


@pytest.fixture
async def second_worker(api: ApiFactory) -> AsyncIterator[Callable[[LiveApi, str], Worker]]:
    """``second_worker(live, instance_url)``: a worker of the same service on another instance, started now
    (its watch opens once its instance answers), stopped at the end."""
    running: list[asyncio.Task[None]] = []

    def start(live: LiveApi, url: str) -> Worker:
        worker = Worker(WorkerSettings(queue_url=live.url, service=SERVICE, instance_url=url, token=TOKEN,
                                       max_attempts=live.settings.max_attempts, prefetch=1))
        running.append(asyncio.create_task(worker.run()))
        return worker

    yield start
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)


async def test_a_worker_that_opens_later_runs_the_task_queued_ahead_on_a_busy_one(
        api: ApiFactory, instance_url: Any, data_dir: Path, store_kind: str, request: pytest.FixtureRequest,
        second_worker: Callable[[LiveApi, str], Worker]) -> None:
    install_gate_plugin(data_dir)
    url_a, url_b = await instance_url(), await instance_url()
    redis = {"redis_url": request.getfixturevalue("redis_url")} if store_kind == "redis" else {}
    # --max-attempts 1: a handed-back task counted as a run would be reported too_many_attempts on B.
    live = await api(instance_urls=(url_a,), data_dir=data_dir, prefetch=1, max_attempts=1, **redis)
    open_gate(data_dir, "two")  # two would pass at once wherever it starts
    await live.submit(drain_gate_graph("one", "one"), task_id="one")
    await live.submit(drain_gate_graph("two", "two"), task_id="two")
    await until(lambda: queued_behind(url_a), what="two queued on instance A behind one (no worker idle)")
    second_worker(live, url_b)
    async with live.sink() as sink:
        [frame] = await read_results(sink, 1)
        assert (frame.tags["task_id"], state_of(frame)) == ("two", "success")
        assert (await status(live, "one"))["state"] == "running"  # two did not wait for one
        assert await queued_behind(url_a, 0)
        open_gate(data_dir, "one")
        [frame] = await read_results(sink, 1)
        assert (frame.tags["task_id"], state_of(frame)) == ("one", "success")
        await results_final(live.endpoint, 2)
    assert (runs_of(data_dir, "one"), runs_of(data_dir, "two")) == (1, 1)
    assert not ran_there(await history(url_a), "two") and ran_there(await history(url_b), "two")
    assert await queue_length(live.endpoint, f"{SERVICE}/attempts") == 0
    assert await queue_length(live.endpoint, SERVICE) == 0
    await until(lambda: no_progress_records(live), what="no progress record left (A's for two went with it)")


async def no_progress_records(live: LiveApi) -> bool:
    return await queue_length(live.endpoint, f"{SERVICE}/progress") == 0


async def test_a_queued_ahead_task_that_started_when_asked_is_kept_and_runs_once(
        api: ApiFactory, instance_url: Any, data_dir: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch, second_worker: Callable[[LiveApi, str], Worker]) -> None:
    caplog.set_level(logging.INFO, logger="comfyserve.api.worker")
    install_gate_plugin(data_dir)
    url_a, url_b = await instance_url(), await instance_url()
    live = await api(instance_urls=(url_a,), data_dir=data_dir, prefetch=1)
    worker_a = live.live.pool.workers[0][0]
    reported = asyncio.Event()
    report = worker_a._report

    async def held(data: bytes, tags: dict[str, str], index: int) -> int:
        if tags.get("task_id") == "one":  # one's result waits: the queue still counts it as A's
            await reported.wait()
        return await report(data, tags, index)

    monkeypatch.setattr(worker_a, "_report", held)
    await live.submit(drain_gate_graph("one", "one"), task_id="one")
    await live.submit(drain_gate_graph("two", "two"), task_id="two")
    await until(lambda: queued_behind(url_a), what="two queued on instance A behind one")
    open_gate(data_dir, "one")
    await until(lambda: runs_of(data_dir, "two") == 1, what="two started on A")
    second_worker(live, url_b)  # idle: the queue asks A for two, which has started
    await until(lambda: any("has started" in r.getMessage() for r in caplog.records), what="A keeping two")
    reported.set()
    open_gate(data_dir, "two")
    async with live.sink() as sink:
        frames = await read_results(sink, 2)
        await results_final(live.endpoint, 2)
    assert sorted((f.tags["task_id"], state_of(f)) for f in frames) == [("one", "success"), ("two", "success")]
    assert (runs_of(data_dir, "one"), runs_of(data_dir, "two")) == (1, 1)
    assert await history(url_b) == {}


async def test_against_a_queue_service_without_prefetch_slots_a_worker_takes_one_task_at_a_time(
        api: ApiFactory, instance_url: Any, data_dir: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A queue service that ignores ``_prefetch_`` (the platform's) would fill the slot ahead even while
    another worker idles, and could never ask for it back: the worker watches with a window of one."""
    monkeypatch.setattr(watch_module, "PREFETCH_EXTENSIONS", "")  # the service does not say it keeps slots
    install_gate_plugin(data_dir)
    url = await instance_url()
    live = await api(instance_urls=(url,), data_dir=data_dir, prefetch=1)
    await live.submit(drain_gate_graph("one", "one"), task_id="one")
    await live.submit(drain_gate_graph("two", "two"), task_id="two")
    await until(lambda: runs_of(data_dir, "one") == 1, what="one running")
    assert any("taking one task at a time" in r.getMessage() for r in caplog.records)
    assert await queued_behind(url, 0)
    async with live.input() as queue:
        [_, two] = await queue.get(0, 5)
        assert (await queue.search(two.index))["IsPending"] is False  # not taken ahead
    open_gate(data_dir, "one")
    open_gate(data_dir, "two")
    async with live.sink() as sink:
        assert len(await read_results(sink, 2)) == 2



async def test_a_slot_waiting_for_the_same_models_takes_any_task_once_the_running_one_is_in_its_last_step(
        api: ApiFactory, instance_url: Any, data_dir: Path) -> None:
    """At a model switch the next task is queued on the instance before the running one ends (no round trip
    between them): the worker tells the queue when its task reports its last step (here at once: 1 of 1)."""
    install_gate_plugin(data_dir)
    url = await instance_url()
    live = await api(instance_urls=(url,), data_dir=data_dir, prefetch=1, affinity_wait_s=60.0)
    async with live.input() as queue:
        await queue.put(json.dumps(gated_graph("m", "m", steps=1)), {"task_id": "m", "models": "m.safetensors"})
        await until(lambda: runs_on(url, 1), what="m running")
        await queue.put(json.dumps(tiny_graph("k")), {"task_id": "k", "models": "k.safetensors"})
        await until(lambda: queued_behind(url), what="k (other models) queued behind m, still running")
    open_gate(data_dir, "m")
    async with live.sink() as sink:
        frames = await read_results(sink, 2)
        await results_final(live.endpoint, 2)
    assert sorted((f.tags["task_id"], state_of(f)) for f in frames) == [("k", "success"), ("m", "success")]


async def runs_on(url: str, count: int) -> bool:
    running, _ = await instance_queue(url)
    return len(running) == count
