"""--prefetch: a worker queues the next task on its instance behind the running one, and every guarantee
of one-task-at-a-time still holds: one result per task, its own cancel, its attempts, its status, drain."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from test_api_limits import crashes, install_crash_plugin, queue_length

from api_edition import runner
from api_edition.settings import WorkerSettings
from api_edition.worker import Worker
from queue_service.client import QueueClient
from support.api import SERVICE, TOKEN, ApiFactory, LiveApi, no_more, read_results, results_final
from support.server import drain_gate_graph, install_gate_plugin, open_gate, png_bytes, runs_of, tiny_graph
from support.wait import until


async def instance_queue(url: str) -> tuple[list[str], list[str]]:
    """The prompt ids (running, pending) on an instance's own queue (none while it is down)."""
    async with httpx.AsyncClient(trust_env=False) as http:
        try:
            body = (await http.get(f"{url}/queue", headers={"Authorization": TOKEN})).json()
        except httpx.HTTPError:
            return [], []
    return [i[1] for i in body["queue_running"]], [i[1] for i in body["queue_pending"]]


async def status(live: LiveApi, task_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=live.url, trust_env=False) as http:
        resp = await http.get("/api_task", params={"task_id": task_id}, headers={"Authorization": TOKEN})
    return resp.json() if resp.status_code == 200 else {"status_code": resp.status_code}


async def cancel(live: LiveApi, task_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=live.url, trust_env=False) as http:
        resp = await http.post("/api_task/cancel", params={"task_id": task_id}, headers={"Authorization": TOKEN})
    assert resp.status_code == 200, resp.text
    return resp.json()


async def queued_behind(url: str, count: int = 1) -> bool:
    running, pending = await instance_queue(url)
    return len(running) == 1 and len(pending) == count


def state_of(frame: Any) -> str:
    if frame.tags["status"] == "success":
        return "success"
    [event] = json.loads(frame.data)
    return event["data"]["exception_type"]


async def start(api: ApiFactory, instance_url: Any, data_dir: Path, **settings: Any) -> tuple[LiveApi, str]:
    install_gate_plugin(data_dir)
    url = await instance_url()
    return await api(instance_urls=(url,), data_dir=data_dir, **{"prefetch": 1, **settings}), url


async def test_the_next_task_waits_on_the_instance_and_answers_queued_until_it_starts(
        api: ApiFactory, instance_url: Any, data_dir: Path) -> None:
    live, url = await start(api, instance_url, data_dir)
    await live.submit(drain_gate_graph("a", "a"), task_id="a")
    await live.submit(drain_gate_graph("b", "b"), task_id="b")
    await until(lambda: queued_behind(url), what="b queued on the instance behind a")
    assert (await status(live, "a"))["state"] == "running"
    await until(lambda: _state_is(live, "b", "queued"), what="b answered queued")
    answer = await status(live, "b")
    assert answer["position"] == 0 and answer["worker"] == live.live.pool.workers[0][0].name
    open_gate(data_dir, "a")
    await until(lambda: _state_is(live, "b", "running"), what="b running once a ended")
    assert runs_of(data_dir, "b") == 1
    open_gate(data_dir, "b")
    async with live.sink() as sink:
        frames = await read_results(sink, 2)
        await results_final(live.endpoint, 2)
    assert sorted((f.tags["task_id"], state_of(f)) for f in frames) == [("a", "success"), ("b", "success")]
    assert all("models" not in f.tags for f in frames)
    assert (runs_of(data_dir, "a"), runs_of(data_dir, "b")) == (1, 1)


STATE_ORDER = {"queued": 0, "running": 1, "succeeded": 2}


async def test_a_task_held_ahead_answers_queued_until_its_execution_start_never_running_before(
        api: ApiFactory, instance_url: Any, data_dir: Path, aiohttp_server: Any) -> None:
    """The queue hands b to the worker while a runs; b's worker holds it (here: fetching its URL input) before
    it queues it on the instance and records it queued. Its status reads queued all along, running only from
    its execution_start: a client polling it sees its states go forward only."""
    fetching, fetched = asyncio.Event(), asyncio.Event()

    async def held_input(request: web.Request) -> web.Response:
        fetching.set()
        await fetched.wait()
        return web.Response(body=png_bytes(), content_type="image/png")

    files = web.Application()
    files.router.add_get("/in.png", held_input)
    origin = f"http://127.0.0.1:{(await aiohttp_server(files)).port}"
    live, url = await start(api, instance_url, data_dir, input_url_allow=(origin + "/",))
    await live.submit(drain_gate_graph("a", "a"), task_id="a")
    await until(lambda: runs_of(data_dir, "a") == 1, what="a running on the instance")
    await live.submit({"prompt": drain_gate_graph("b", "b"), "inputs": [{"name": "in.png", "url": origin + "/in.png"}]},
                      task_id="b")
    await until(fetching.is_set, what="b's worker fetching its input")
    answer = await status(live, "b")
    assert (answer["state"], answer.get("position")) == ("queued", 0), answer  # held by its worker, not started

    seen: list[str] = []

    async def b_is(state: str) -> bool:
        seen.append((await status(live, "b"))["state"])
        return seen[-1] == state

    fetched.set()
    await until(lambda: queued_behind(url), what="b queued on the instance behind a")
    assert await b_is("queued") and runs_of(data_dir, "b") == 0
    open_gate(data_dir, "a")
    await until(lambda: b_is("running"), what="b running once it started")
    open_gate(data_dir, "b")
    await until(lambda: b_is("succeeded"), what="b succeeded")
    assert seen == sorted(seen, key=STATE_ORDER.__getitem__), seen  # never back from running to queued


async def _state_is(live: LiveApi, task_id: str, state: str) -> bool:
    return (await status(live, task_id)).get("state") == state


async def test_prefetch_0_runs_one_task_at_a_time(api: ApiFactory, instance_url: Any, data_dir: Path) -> None:
    live, url = await start(api, instance_url, data_dir, prefetch=0)
    await live.submit(drain_gate_graph("a", "a"), task_id="a")
    await live.submit(tiny_graph("b"), task_id="b")
    await until(lambda: _state_is(live, "a", "running"), what="a running")
    assert await instance_queue(url) == ([(await instance_queue(url))[0][0]], [])
    answer = await status(live, "b")
    assert (answer["state"], answer["position"], "worker" in answer) == ("queued", 0, False)
    open_gate(data_dir, "a")
    async with live.sink() as sink:
        assert len(await read_results(sink, 2)) == 2


async def test_a_cancel_hits_only_its_own_task_queued_ahead_or_running(api: ApiFactory, instance_url: Any,
                                                                       data_dir: Path) -> None:
    live, url = await start(api, instance_url, data_dir)
    for name in ("a", "b"):
        await live.submit(drain_gate_graph(name, name), task_id=name)
    await live.submit(tiny_graph("c"), task_id="c")
    await until(lambda: queued_behind(url), what="b queued on the instance behind a")
    [a_prompt], [b_prompt] = await instance_queue(url)
    assert (await cancel(live, "b"))["cancel_requested"] is True  # queued ahead: off the instance's queue
    await until(lambda: _state_is(live, "b", "cancelled"), what="b cancelled")
    await until(lambda: queued_behind(url), what="c queued behind a in b's place")
    running, [c_prompt] = await instance_queue(url)
    assert running == [a_prompt] and c_prompt != b_prompt  # a untouched
    assert (await status(live, "a"))["state"] == "running"
    assert (await cancel(live, "a"))["cancel_requested"] is True  # running: interrupted, c goes on
    async with live.sink() as sink:
        frames = await read_results(sink, 3)
        await results_final(live.endpoint, 3)
    assert sorted((f.tags["task_id"], state_of(f)) for f in frames) == [
        ("a", "cancelled"), ("b", "cancelled"), ("c", "success")]
    assert (runs_of(data_dir, "a"), runs_of(data_dir, "b")) == (1, 0)


async def test_a_drain_hands_the_queued_ahead_task_back_unrun(api: ApiFactory, instance_url: Any,
                                                             data_dir: Path) -> None:
    live, url = await start(api, instance_url, data_dir)
    open_gate(data_dir, "b")  # b would pass at once: it must not run at all on the draining worker
    await live.submit(drain_gate_graph("a", "a"), task_id="a")
    await live.submit(drain_gate_graph("b", "b"), task_id="b")
    await until(lambda: queued_behind(url), what="b queued on the instance behind a")
    worker, task = live.live.pool.workers[0]
    draining = asyncio.create_task(worker.shutdown(task, 30.0))
    await until(lambda: queued_behind(url, 0), what="b off the instance's queue")
    assert (await status(live, "a"))["state"] == "running"
    open_gate(data_dir, "a")
    await draining
    async with live.sink() as sink:
        [frame] = await read_results(sink, 1)
        assert await no_more(sink) == []
    assert (frame.tags["task_id"], state_of(frame)) == ("a", "success")
    async with QueueClient(live.endpoint, SERVICE, token=TOKEN) as queue:
        [item] = await queue.get(0, 5)
        assert item.tags["task_id"] == "b" and (await queue.search(item.index))["IsPending"] is False
    assert runs_of(data_dir, "b") == 0
    other = Worker(WorkerSettings(queue_url=live.url, service=SERVICE, instance_url=url, token=TOKEN))
    running = asyncio.create_task(other.run())
    try:
        async with live.sink() as sink:
            [frame] = await read_results(sink, 1)
            assert await no_more(sink) == []
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    assert (frame.tags["task_id"], state_of(frame)) == ("b", "success")
    assert (runs_of(data_dir, "a"), runs_of(data_dir, "b")) == (1, 1)


async def test_an_instance_dying_under_a_running_and_a_queued_task_gives_both_back_and_counts_only_the_run(
        api: ApiFactory, data_dir: Path) -> None:
    """a kills its (supervised) instance while b waits behind it there: both come back to the worker once
    the instance is restarted. a's cut-off run counts (--max-attempts 1: reported at the cap, not run again);
    b never started, so it was not counted: it runs, once."""
    install_crash_plugin(data_dir)
    install_gate_plugin(data_dir)
    live = await api(instances=1, data_dir=data_dir, max_attempts=1, prefetch=1)
    url = live.live.pool.workers[0][0].settings.instance_url
    doomed = drain_gate_graph("a", "doomed")
    doomed["4"] = {"class_type": "TestCrash", "inputs": {"image": ["2", 0], "key": "a", "times": 1}}
    doomed["3"]["inputs"]["images"] = ["4", 0]
    await live.submit(doomed, task_id="a")
    await live.submit(drain_gate_graph("b", "b"), task_id="b")
    await until(lambda: queued_behind(url), timeout_s=45, what="b queued on the instance behind a")
    open_gate(data_dir, "b")
    open_gate(data_dir, "a")  # a kills the instance; b goes down with it
    async with live.sink() as sink:
        frames = await read_results(sink, 2, timeout_s=60)
        await results_final(live.endpoint, 2)
    assert sorted((f.tags["task_id"], state_of(f)) for f in frames) == [("a", "too_many_attempts"),
                                                                        ("b", "success")]
    assert crashes(data_dir, "a") == 1 and runs_of(data_dir, "b") == 1
    assert await queue_length(live.endpoint, f"{SERVICE}/attempts") == 0


async def test_the_front_tags_each_task_with_the_models_of_its_graph(api: ApiFactory) -> None:
    live = await api()
    graph = tiny_graph("m")
    graph["4"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd/v1.safetensors"}}
    graph["5"] = {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1],
                                                         "lora_name": "detail.SAFETENSORS", "strength_model": 1.0}}
    assert (await live.submit(graph, task_id="with")).status_code == 200
    assert (await live.submit(tiny_graph("n"), task_id="without", models="forged.ckpt")).status_code == 200
    async with live.input() as queue:
        items = {item.tags["task_id"]: item.tags for item in await queue.get(0, 5)}
    assert items["with"]["models"] == "detail.SAFETENSORS,sd/v1.safetensors"
    assert "models" not in items["without"]  # the tag is the front's: a client's cannot mislead the workers


def test_prefetch_and_affinity_flags_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     capsys: Any) -> None:
    from api_edition import command, worker_command
    from standard.cli import main

    worker_args = ["--queue-url", "http://127.0.0.1:1", "--instance-url", "http://127.0.0.1:2"]
    parser = argparse.ArgumentParser()
    worker_command.add_arguments(parser)
    defaults = worker_command.settings_from_args(parser.parse_args(worker_args))
    assert (defaults.prefetch, defaults.affinity_wait_s) == (1, 3.0)
    monkeypatch.setenv("COMFYSERVE_PREFETCH", "0")
    monkeypatch.setenv("COMFYSERVE_AFFINITY_WAIT", "0.5")
    parser = argparse.ArgumentParser()
    worker_command.add_arguments(parser)
    settings = worker_command.settings_from_args(parser.parse_args(worker_args))
    assert (settings.prefetch, settings.affinity_wait_s) == (0, 0.5)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    settings_api = command.settings_from_args(parser.parse_args(
        ["--data-dir", str(tmp_path), "--prefetch", "2", "--affinity-wait", "0"]))
    assert (settings_api.prefetch, settings_api.affinity_wait_s) == (2, 0.0)
    assert main(["api", "--data-dir", str(tmp_path), "--prefetch", "-1"]) == 2
    assert main(["worker", *worker_args, "--affinity-wait", "-2"]) == 2
    err = capsys.readouterr().err
    assert "--prefetch must be between 0 and" in err and "--affinity-wait must be >= 0" in err


async def test_a_prompt_the_instance_lost_is_given_back_and_run_again_once(api: ApiFactory, instance_url: Any,
                                                                           data_dir: Path,
                                                                           monkeypatch: pytest.MonkeyPatch,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """b, queued on the instance behind a, disappears from the instance's queue (deleted there): the worker
    does not wait for it for ever; b goes back to the input queue and runs again, once."""
    monkeypatch.setattr(runner, "IDLE_CHECK_S", 0.2)  # how long a quiet prompt waits before it is looked up
    live, url = await start(api, instance_url, data_dir)
    open_gate(data_dir, "b")
    await live.submit(drain_gate_graph("a", "a"), task_id="a")
    await live.submit(drain_gate_graph("b", "b"), task_id="b")
    await until(lambda: queued_behind(url), what="b queued on the instance behind a")
    _, [b_prompt] = await instance_queue(url)
    async with httpx.AsyncClient(trust_env=False) as http:
        resp = await http.post(f"{url}/queue", json={"delete": [b_prompt]}, headers={"Authorization": TOKEN})
        assert resp.status_code == 200
    await until(lambda: _logged(caplog, "is no longer known"), what="the worker finding b lost")
    open_gate(data_dir, "a")
    async with live.sink() as sink:
        frames = await read_results(sink, 2)
        await results_final(live.endpoint, 2)
    assert sorted((f.tags["task_id"], state_of(f)) for f in frames) == [("a", "success"), ("b", "success")]
    assert (runs_of(data_dir, "a"), runs_of(data_dir, "b")) == (1, 1)


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in record.getMessage() for record in caplog.records)
