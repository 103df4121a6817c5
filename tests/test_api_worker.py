"""Workers end to end in one process: /api_prompt -> input queue -> worker -> instance -> sink queue."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from api_edition.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from standard.ports import free_port
from standard.retry import WEBHOOK
from standard.server.app import create_embedded_app
from standard.settings import StandardSettings
from support.api import TOKEN, ApiFactory, read_results, results_final
from support.metrics import kinds, value
from support.server import tiny_graph
from support.wait import until

BOOM_PLUGIN = '''
class TestBoom:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "boom"
    CATEGORY = "testing"
    def boom(self, image):
        raise RuntimeError("boom on purpose")

NODE_CLASS_MAPPINGS = {"TestBoom": TestBoom}
'''


async def test_results_carry_task_id_request_id_and_outputs(api: ApiFactory, instance_url: Any,
                                                            data_dir: Path) -> None:
    live = await api(instance_urls=(await instance_url(),))
    ids = {}
    for i in range(3):
        resp = await live.submit(tiny_graph(f"txt2img_{i}"), task_id=f"txt2img_{i}", user="u1")
        assert resp.status_code == 200
        ids[f"txt2img_{i}"] = resp.headers["X-Eas-Queueservice-Request-Id"]
    async with live.sink() as sink:
        frames = await read_results(sink, 3)
        await results_final(live.endpoint, 3)
    assert sorted(f.tags["task_id"] for f in frames) == sorted(ids)
    for frame in frames:
        task_id = frame.tags["task_id"]
        assert frame.tags["requestId"] == ids[task_id]
        assert frame.tags["status"] == "success" and frame.tags["user"] == "u1"
        *executed, outputs = json.loads(frame.data)
        assert {e["type"] for e in executed} == {"executed"}
        assert {e["data"]["prompt_id"] for e in executed} == {frame.tags["prompt_id"]}
        # Tasks 2 and 3 reuse the cached EmptyImage, whose ``executed`` has ``output: null`` on the
        # WebSocket (as in ComfyUI); the sink lists only the nodes that produced output.
        assert {e["data"]["node"]: e["data"]["output"] for e in executed} == outputs
        assert all(e["data"]["output"]["images"] for e in executed)
        [image] = outputs["2"]["images"]
        assert image["filename"] == f"{task_id}_00001_.png"
        assert (data_dir / "output" / image["filename"]).is_file()
    async with live.input() as queue:
        assert (await queue.attributes())["stream.length"] == "0"  # every input committed


API_KINDS = {
    "comfyserve_api_queue_length": "gauge", "comfyserve_api_tasks_accepted": "counter",
    "comfyserve_api_tasks_refused": "counter", "comfyserve_api_worker_tasks_in_flight": "gauge",
    "comfyserve_api_worker_instance_up": "gauge", "comfyserve_api_worker_tasks": "counter",
    "comfyserve_api_worker_task_seconds": "histogram", "comfyserve_api_worker_failures": "counter",
    "comfyserve_api_worker_redeliveries": "counter", "comfyserve_api_worker_tasks_abandoned": "counter",
    "comfyserve_api_webhook_failures": "counter",
}


async def test_metrics_have_prometheus_types_and_move_when_tasks_run(api: ApiFactory, instance_url: Any) -> None:
    live = await api(instance_urls=(await instance_url(),))
    before = await live.metrics()
    assert kinds(before) == API_KINDS
    assert value(before, "comfyserve_api_tasks_accepted_total") == 0
    assert value(before, "comfyserve_api_worker_task_seconds_count") == 0
    await live.submit(tiny_graph("metered"), task_id="ok")
    await live.submit({"1": {"class_type": "NoSuchNode", "inputs": {}}}, task_id="bad")
    async with live.sink() as sink:
        await read_results(sink, 2)
    after = await live.metrics()
    assert value(after, "comfyserve_api_tasks_accepted_total") == 2
    assert value(after, "comfyserve_api_worker_tasks_total", status="success") == 1
    assert value(after, "comfyserve_api_worker_tasks_total", status="error") == 1
    assert value(after, "comfyserve_api_worker_failures_total") == 1
    # The task time is a histogram: _sum and _count keep their names, _bucket is new.
    assert value(after, "comfyserve_api_worker_task_seconds_count") == 2
    assert value(after, "comfyserve_api_worker_task_seconds_bucket", le="+Inf") == 2
    assert value(after, "comfyserve_api_worker_task_seconds_sum") > 0
    assert value(after, "comfyserve_api_worker_instance_up") == 1
    assert value(after, "comfyserve_api_worker_tasks_in_flight") == 0
    assert value(after, "comfyserve_api_queue_length", queue="svc") == 0


async def test_unknown_node_and_failing_node_give_error_results(api: ApiFactory, instance_url: Any,
                                                                data_dir: Path) -> None:
    (data_dir / "custom_nodes" / "test_boom.py").write_text(BOOM_PLUGIN)
    live = await api(instance_urls=(await instance_url(),))
    unknown = {"1": {"class_type": "KSampler", "inputs": {"seed": 1}},
               "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}
    failing = tiny_graph("f")
    failing["3"] = {"class_type": "TestBoom", "inputs": {"image": ["1", 0]}}
    failing["2"]["inputs"]["images"] = ["3", 0]
    await live.submit(unknown, task_id="unknown")
    await live.submit(failing, task_id="failing")
    async with live.sink() as sink:
        frames = {f.tags["task_id"]: f for f in await read_results(sink, 2)}
    for task_id in ("unknown", "failing"):
        frame = frames[task_id]
        assert frame.tags["status"] == "error"
        [event] = json.loads(frame.data)
        assert event["type"] == "execution_error"
    unknown_error = json.loads(frames["unknown"].data)[0]["data"]
    assert "KSampler" in json.dumps(unknown_error)
    failing_error = json.loads(frames["failing"].data)[0]["data"]
    assert failing_error["exception_message"].startswith("boom on purpose")
    assert failing_error["node_type"] == "TestBoom"


async def test_redelivered_task_is_committed_not_run_again(api: ApiFactory, instance_url: Any) -> None:
    live = await api(instance_urls=(await instance_url(),))
    async with live.sink() as sink, live.input() as queue:
        # A task whose result is already on the sink (its worker died between put and commit).
        await sink.put(b"[]", {"task_id": "done", "requestId": "rid-1"})
        await queue.put(json.dumps(tiny_graph()), {"task_id": "done", "requestId": "rid-1"})
        await live.submit(tiny_graph("next"), task_id="next")
        frames = await read_results(sink, 2)
        await results_final(live.endpoint, 2)
        assert sorted(f.tags["task_id"] for f in frames) == ["done", "next"]
        assert (await queue.attributes())["stream.length"] == "0"
    metrics = await live.metrics()
    assert value(metrics, "comfyserve_api_worker_redeliveries_total") == 1
    assert value(metrics, "comfyserve_api_worker_tasks_total", status="success") == 1


def _logged(caplog: pytest.LogCaptureFixture, *parts: str) -> bool:
    return any(all(part in r.getMessage() for part in parts) for r in caplog.records)


async def test_full_sink_stops_the_worker_taking_input(api: ApiFactory, instance_url: Any,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    # One task at a time (--prefetch 0): the queues hold 2 items, too few for one more taken ahead.
    live = await api(instance_urls=(await instance_url(),), max_length=2, prefetch=0)
    for i in range(2):
        await live.submit(tiny_graph(f"s{i}"), task_id=f"s{i}")
    async with live.sink() as sink, live.input() as queue:
        async def sink_full() -> bool:
            return (await sink.attributes())["stream.length"] == "2"

        await until(sink_full, what="both results on the sink")
        await live.submit(tiny_graph("s2"), task_id="s2")  # runs, then its put waits for room
        await live.submit(tiny_graph("s3"), task_id="s3")  # not taken while s2 is held
        await until(lambda: _logged(caplog, "sink put failed", "is full"), what="the worker holding s2's result")
        attrs = await queue.attributes()
        assert attrs["stream.length"] == "2"
        first = int(attrs["stream.firstEntry"])
        assert (await queue.search(first))["IsPending"] is True
        assert (await queue.search(first + 1))["IsPending"] is False
        frames = await read_results(sink, 4)
        assert sorted(f.tags["task_id"] for f in frames) == ["s0", "s1", "s2", "s3"]


async def test_worker_waits_for_its_instance(api: ApiFactory, aiohttp_server: Any, data_dir: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    live = await api(instance_urls=(f"http://127.0.0.1:{port}",))
    await live.submit(tiny_graph("late"), task_id="late")
    await until(lambda: _logged(caplog, "is not ready", "waiting"), what="the worker finding its instance down")
    async with live.input() as queue:
        assert (await queue.search(1))["IsPending"] is False  # nobody took it while the instance is down
    assert value(await live.metrics(), "comfyserve_api_worker_instance_up") == 0
    await aiohttp_server(create_embedded_app(StandardSettings(data_dir=data_dir, token=TOKEN)), port=port)
    async with live.sink() as sink:
        [frame] = await read_results(sink, 1)
    assert frame.tags["task_id"] == "late" and frame.tags["status"] == "success"


async def test_redis_store(api: ApiFactory, instance_url: Any, redis_url: str) -> None:
    url = await instance_url()
    live = await api(instance_urls=(url, url), redis_url=redis_url)
    names = [worker.name for worker, _ in live.live.pool.workers]
    assert len(set(names)) == 2  # two workers on one instance are still two consumers of the queue
    for i in range(4):
        assert (await live.submit(tiny_graph(f"r{i}"), task_id=f"r{i}")).status_code == 200
    async with live.sink() as sink:
        frames = await read_results(sink, 4)
        await results_final(live.endpoint, 4)
    assert sorted(f.tags["task_id"] for f in frames) == [f"r{i}" for i in range(4)]
    assert all(f.tags["status"] == "success" for f in frames)


async def test_webhook_is_signed_and_retried(api: ApiFactory, instance_url: Any, aiohttp_server: Any) -> None:
    calls: list[tuple[int, dict[str, str], bytes]] = []
    delivered = asyncio.Event()

    async def receiver(request: web.Request) -> web.Response:
        calls.append((len(calls), dict(request.headers), await request.read()))
        if len(calls) == 1:
            return web.Response(status=503, headers={"Retry-After": "2"})
        delivered.set()
        return web.Response(text="ok")

    hook_app = web.Application()
    hook_app.router.add_post("/hook", receiver)
    hook = await aiohttp_server(hook_app)
    waits: list[float] = []  # the retry's waits, recorded instead of slept
    live = await api(instance_urls=(await instance_url(),), webhook_secret="s3cret",
                     webhook_allow=(f"http://127.0.0.1:{hook.port}/hook",),  # loopback needs the operator's opt-in
                     webhook_retry=WEBHOOK.but(pause=waits.append))
    await live.submit(tiny_graph("w"), task_id="hooked", webhook=f"http://127.0.0.1:{hook.port}/hook")
    async with live.sink() as sink:
        [frame] = await read_results(sink, 1)
    assert "webhook" not in frame.tags
    await asyncio.wait_for(delivered.wait(), 10)
    assert len(calls) == 2
    assert waits == [2.0]  # the receiver's Retry-After
    _, headers, body = calls[1]
    assert verify("s3cret", headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
    assert not verify("other", headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
    payload = json.loads(body)
    assert payload["task_id"] == "hooked" and payload["status"] == "success"
    assert payload["result"] == json.loads(frame.data)


async def test_queued_tasks_survive_a_redis_restart(api: ApiFactory, aiohttp_server: Any, data_dir: Path,
                                                    redis_server: Any, redis_url: str) -> None:
    port = free_port()  # the instance comes up only after the restart
    live = await api(instance_urls=(f"http://127.0.0.1:{port}",), redis_url=redis_url)
    for i in range(3):
        assert (await live.submit(tiny_graph(f"aof{i}"), task_id=f"aof{i}")).status_code == 200
    await asyncio.to_thread(redis_server.restart)
    await aiohttp_server(create_embedded_app(StandardSettings(data_dir=data_dir, token=TOKEN)), port=port)
    async with live.sink() as sink:
        frames = await read_results(sink, 3)
    assert sorted(f.tags["task_id"] for f in frames) == ["aof0", "aof1", "aof2"]


def test_save_image_never_overwrites_a_name_taken_since_its_scan(tmp_path: Path, monkeypatch: Any) -> None:
    """Instances sharing one output dir: a counter another process took after the scan is skipped."""
    import numpy as np

    from standard.engine import nodes_io
    from standard.engine.compat import folder_paths

    out = tmp_path / "out"
    out.mkdir()
    (out / "same_00001_.png").write_bytes(b"saved by another instance")
    monkeypatch.setattr(folder_paths, "get_save_image_path",
                        lambda prefix, directory, w=0, h=0: (str(out), "same", 1, "", prefix))
    node = nodes_io.SaveImage()
    monkeypatch.setattr(node, "directory", lambda: str(out))
    result = node.save_images(np.zeros((2, 4, 4, 3), np.float32), "same")
    assert [image["filename"] for image in result["ui"]["images"]] == ["same_00002_.png", "same_00003_.png"]
    assert (out / "same_00001_.png").read_bytes() == b"saved by another instance"
    assert (out / "same_00003_.png").stat().st_size > 0


async def test_items_put_on_the_input_queue_directly(api: ApiFactory, instance_url: Any) -> None:
    """The platform's SDK may put on the input queue itself: wrapped graphs run, junk gets an error result."""
    live = await api(instance_urls=(await instance_url(),))
    async with live.input() as queue, live.sink() as sink:
        await queue.put(json.dumps({"prompt": tiny_graph("direct")}), {"task_id": "wrapped"})
        await queue.put(b"not json", {"task_id": "junk"})
        frames = {f.tags["task_id"]: f for f in await read_results(sink, 2)}
    assert frames["wrapped"].tags["status"] == "success"
    assert frames["junk"].tags["status"] == "error"
    assert json.loads(frames["junk"].data)[0]["data"]["exception_type"] == "invalid_json"


async def test_priority_tasks_run_first(api: ApiFactory, aiohttp_server: Any, data_dir: Path) -> None:
    port = free_port()
    live = await api(instance_urls=(f"http://127.0.0.1:{port}",))
    await live.submit(tiny_graph("a"), task_id="a")
    await live.submit(tiny_graph("b"), task_id="b")
    await live.submit(tiny_graph("c"), task_id="urgent", _priority_="1")
    await aiohttp_server(create_embedded_app(StandardSettings(data_dir=data_dir, token=TOKEN)), port=port)
    async with live.sink() as sink:
        frames = await read_results(sink, 3)
    assert [f.tags["task_id"] for f in frames] == ["urgent", "a", "b"]


async def test_run_timeout_reports_an_error_and_interrupts_the_prompt(api: ApiFactory, instance_url: Any,
                                                                      data_dir: Path) -> None:
    from api_edition.settings import WorkerSettings
    from api_edition.worker import Worker
    from support.server import gated_graph, install_gate_plugin, open_gate

    install_gate_plugin(data_dir)
    url = await instance_url()
    live = await api()
    worker = Worker(WorkerSettings(queue_url=live.url, service="svc", instance_url=url, token=TOKEN,
                                   run_timeout_s=1.0))
    task = asyncio.create_task(worker.run())
    try:
        await live.submit(gated_graph("late-gate", "stuck"), task_id="stuck")
        await live.submit(tiny_graph("after"), task_id="after")
        async with live.sink() as sink:
            [stuck] = await read_results(sink, 1)
            open_gate(data_dir, "late-gate")  # the node returns; the interrupt stops the rest of the prompt
            [after] = await read_results(sink, 1)
    finally:
        await worker.shutdown(task, 1.0)
    assert stuck.tags["task_id"] == "stuck" and stuck.tags["status"] == "error"
    assert "did not finish" in json.loads(stuck.data)[0]["data"]["exception_message"]
    assert after.tags["task_id"] == "after" and after.tags["status"] == "success"
    assert not list((data_dir / "output").glob("stuck_*"))  # SaveImage never ran: interrupted
