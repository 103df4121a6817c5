"""Limits of the API edition: a cap on runs cut off mid-task (--max-attempts) and webhook targets (--webhook-allow)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from api_edition.webhook import WebhookPolicy, WebhookRefused
from queue_service.client import QueueClient
from standard.datadir import init_data_dir
from standard.ports import free_port
from standard.server.app import create_embedded_app
from standard.settings import StandardSettings
from support.api import SERVICE, TOKEN, ApiFactory, Procs, read_results, results_final, submit, wait_running
from support.metrics import scrape, value
from support.processes import wait_for_port
from support.server import gated_graph, install_gate_plugin, open_gate, tiny_graph
from support.wait import until

CRASH_PLUGIN = '''
"""Test plugin: a node that kills its instance's process, as an out-of-memory kill or a segfault would."""
import os
from pathlib import Path

INPUT_DIR = Path(__file__).resolve().parent.parent / "input"


class TestCrash:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "key": ("STRING", {"default": "crash"}),
                             "times": ("INT", {"default": -1, "min": -1, "max": 100})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "crash"
    CATEGORY = "testing"

    def crash(self, image, key, times):
        marks = INPUT_DIR / (key + ".crashes")  # one "x" per crash, so the test can count the runs
        done = len(marks.read_text()) if marks.exists() else 0
        if times < 0 or done < times:
            with marks.open("a") as out:
                out.write("x")
            os._exit(3)
        return (image,)


NODE_CLASS_MAPPINGS = {"TestCrash": TestCrash}
'''


def install_crash_plugin(data_dir: Path) -> None:
    init_data_dir(data_dir)
    (data_dir / "custom_nodes" / "test_crash.py").write_text(CRASH_PLUGIN)


def crash_graph(key: str, prefix: str, times: int = -1) -> dict[str, Any]:
    """EmptyImage -> TestCrash -> SaveImage: the instance dies the first ``times`` runs (-1: every run)."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "TestCrash", "inputs": {"image": ["1", 0], "key": key, "times": times}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def crashes(data_dir: Path, key: str) -> int:
    marks = data_dir / "input" / f"{key}.crashes"
    return len(marks.read_text()) if marks.exists() else 0


async def queue_length(endpoint: str, queue: str) -> int:
    async with QueueClient(endpoint, queue, token=TOKEN) as client:
        return int((await client.attributes())["stream.length"])


def error_of(frame: Any) -> dict[str, Any]:
    assert frame.tags["status"] == "error"
    [event] = json.loads(frame.data)
    assert event["type"] == "execution_error"
    return event["data"]


async def submit_hooked(base: str, graph: dict[str, Any], task_id: str, webhook: str) -> None:
    async with httpx.AsyncClient(base_url=base, trust_env=False) as http:
        resp = await http.post("/api_prompt", params={"task_id": task_id, "webhook": webhook}, json=graph,
                               headers={"Authorization": TOKEN})
    assert resp.status_code == 200, resp.text


async def webhook_receiver(aiohttp_server: Any) -> tuple[int, list[dict[str, Any]], asyncio.Event]:
    calls: list[dict[str, Any]] = []
    called = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        calls.append(json.loads(await request.read()))
        called.set()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", receive)
    server = await aiohttp_server(app)
    return server.port, calls, called


# -- --max-attempts ------------------------------------------------------------------------------


async def test_a_task_that_kills_every_instance_ends_in_one_error_result(procs: Procs, tmp_path: Path,
                                                                         aiohttp_server: Any) -> None:
    """All-in-one (SQLite, supervised local instance): 2 runs, 2 dead instances, then one error result."""
    data_dir = tmp_path / "data"
    install_crash_plugin(data_dir)
    hook_port, calls, called = await webhook_receiver(aiohttp_server)
    port = free_port()
    api_proc = procs.start("api", "api", "--data-dir", str(data_dir), "--port", str(port), "--token", TOKEN,
                           "--service", SERVICE, "--instances", "1", "--instance-down-timeout", "1",
                           "--max-attempts", "2", "--webhook-allow", f"http://127.0.0.1:{hook_port}/")
    wait_for_port(port, timeout_s=30, proc=api_proc)
    base = f"http://127.0.0.1:{port}"
    await submit(base, crash_graph("always", "doomed"), "doomed")
    await submit_hooked(base, tiny_graph("fine"), "fine", f"http://127.0.0.1:{hook_port}/hook")
    async with QueueClient(base, f"{SERVICE}/sink", token=TOKEN) as sink:
        frames = await read_results(sink, 2, timeout_s=45)
    await results_final(base, 2)
    by_task = {frame.tags["task_id"]: frame for frame in frames}
    assert sorted(by_task) == ["doomed", "fine"], procs.log("api")
    error = error_of(by_task["doomed"])
    assert error["exception_type"] == "too_many_attempts"
    assert "cut off mid-run 2 times" in error["exception_message"]
    assert "unreachable" in error["exception_message"] or "no longer known" in error["exception_message"]
    assert crashes(data_dir, "always") == 2  # run exactly max-attempts times, never a third
    assert by_task["fine"].tags["status"] == "success"  # the queue moved on; a normal task is unaffected
    assert await queue_length(base, SERVICE) == 0
    assert await queue_length(base, f"{SERVICE}/attempts") == 0  # nothing left behind
    metrics = await scrape(base + "/metrics", TOKEN)
    await asyncio.wait_for(called.wait(), 10)
    assert [(c["task_id"], c["status"]) for c in calls] == [("fine", "success")]
    assert value(metrics, "comfyserve_api_worker_tasks_abandoned_total") == 1


async def attempts_dropped(endpoint: str) -> None:
    """The worker drops a task's attempt records in the background once its result is on the sink (the next
    task need not wait for it): a reader of the result waits for the drop rather than racing it."""
    async def none_left() -> bool:
        return await queue_length(endpoint, f"{SERVICE}/attempts") == 0

    await until(none_left, what="the attempt records dropped")


async def _attempts_recorded(base: str) -> bool:
    return await queue_length(base, f"{SERVICE}/attempts") == 1


async def test_kill_9_of_the_worker_counts_across_its_restart(procs: Procs, tmp_path: Path,
                                                             aiohttp_server: Any) -> None:
    """Split deployment (workers over HTTP): a kill -9 of the worker mid-task counts, across its restart."""
    data_dir = tmp_path / "data"
    init_data_dir(data_dir)
    install_gate_plugin(data_dir)
    hook_port, calls, called = await webhook_receiver(aiohttp_server)
    base, [(_, instance)] = procs.split(data_dir, 1, "--webhook-allow", f"http://127.0.0.1:{hook_port}/hook")
    limits = ("--max-attempts", "1", "--webhook-allow", f"http://127.0.0.1:{hook_port}/hook")
    worker = procs.worker("worker_a", base, instance, *limits)
    await submit_hooked(base, gated_graph("never", "killed"), "killed", f"http://127.0.0.1:{hook_port}/hook")
    await wait_running(instance)
    assert await _attempts_recorded(base)  # written before the prompt went to the instance
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(10)
    procs.worker("worker_b", base, instance, *limits)  # same consumer id: it takes the item over at once
    async with QueueClient(base, f"{SERVICE}/sink", token=TOKEN) as sink:
        [frame] = await read_results(sink, 1, timeout_s=30)
    await results_final(base, 1)
    error = error_of(frame)
    assert frame.tags["task_id"] == "killed" and error["exception_type"] == "too_many_attempts"
    assert "cut off mid-run 1 times" in error["exception_message"]
    assert "never finished it" in error["exception_message"], procs.log("worker_b")
    assert await queue_length(base, SERVICE) == 0
    assert await queue_length(base, f"{SERVICE}/attempts") == 0
    await asyncio.wait_for(called.wait(), 10)
    [payload] = calls
    assert payload["task_id"] == "killed" and payload["status"] == "error"
    assert payload["result"] == json.loads(frame.data)
    open_gate(data_dir, "never")  # let the orphaned prompt end, so the instance stops at once


class AcceptCutter:
    """A TCP relay in front of an instance that kills the worker behind it (kill -9) the moment the instance
    tells it anything of a prompt (``"prompt_id"``: the answer to ``POST /prompt``, or an event of the
    prompt), and passes that on never: the instance has accepted the prompt, and the worker dies before
    it learns so."""

    MARK = b'"prompt_id"'

    def __init__(self, instance_url: str) -> None:
        self.instance_port = int(instance_url.rsplit(":", 1)[1])
        self.worker: subprocess.Popen[bytes] | None = None
        self.cut = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.instance_port)
        await asyncio.gather(self._copy(reader, up_writer, watch=False), self._copy(up_reader, writer, watch=True),
                             return_exceptions=True)
        for end in (writer, up_writer):
            end.close()

    async def _copy(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, watch: bool) -> None:
        tail = b""
        while (data := await source.read(65536)) and not self.cut.is_set():
            if watch and self.MARK in tail + data:
                assert self.worker is not None
                self.worker.kill()
                self.cut.set()
                break
            tail = data[-len(self.MARK):]
            sink.write(data)
            await sink.drain()
        sink.close()


async def test_a_worker_killed_the_moment_its_instance_accepts_the_prompt_leaves_the_run_counted(
        procs: Procs, tmp_path: Path) -> None:
    """Split deployment, --max-attempts 1: the worker is killed (kill -9) once the instance accepted the prompt
    and before the worker heard of it. The run counts: the count is written before the submit (it used to be
    written just after the accept, and a worker killed in between left its run uncounted)."""
    data_dir = tmp_path / "data"
    init_data_dir(data_dir)
    install_gate_plugin(data_dir)
    base, [(_, instance)] = procs.split(data_dir, 1)
    cutter = AcceptCutter(instance)
    try:
        cutter.worker = procs.worker("worker_a", base, await cutter.start(), "--max-attempts", "1")
        await submit(base, gated_graph("never", "killed"), "killed")
        await asyncio.wait_for(cutter.cut.wait(), 30)
        assert cutter.worker.wait(10) == -signal.SIGKILL
    finally:
        await cutter.aclose()
    await wait_running(instance)  # the prompt runs on...
    assert await _attempts_recorded(base)  # ...and it counts
    procs.worker("worker_b", base, instance, "--max-attempts", "1")  # same consumer id: it takes the item at once
    async with QueueClient(base, f"{SERVICE}/sink", token=TOKEN) as sink:
        [frame] = await read_results(sink, 1, timeout_s=30)
    error = error_of(frame)
    assert frame.tags["task_id"] == "killed" and error["exception_type"] == "too_many_attempts"
    assert "cut off mid-run 1 times" in error["exception_message"], procs.log("worker_b")
    await attempts_dropped(base)
    open_gate(data_dir, "never")  # let the orphaned prompt end, so the instance stops at once


async def test_a_task_that_kills_its_instance_once_still_succeeds(api: ApiFactory, data_dir: Path,
                                                                  redis_url: str) -> None:
    """Default cap (3), Redis store, a supervised local instance: killed once, the second run succeeds."""
    install_crash_plugin(data_dir)
    live = await api(instances=1, data_dir=data_dir, redis_url=redis_url)
    assert live.settings.max_attempts == 3
    resp = await live.submit(crash_graph("once", "survivor", times=1), task_id="survivor")
    assert resp.status_code == 200, resp.text
    async with live.sink() as sink:
        [frame] = await read_results(sink, 1, timeout_s=45)
        await results_final(live.endpoint, 1)
    assert frame.tags["task_id"] == "survivor" and frame.tags["status"] == "success", frame.data
    assert crashes(data_dir, "once") == 1
    assert list((data_dir / "output").glob("survivor_*.png"))
    await attempts_dropped(live.endpoint)


# -- --webhook-allow ----------------------------------------------------------------------------


def test_allowed_prefixes_compare_parsed_urls_not_strings() -> None:
    policy = WebhookPolicy(("http://good.example.com", "https://hooks.example.org:8443/api/"))
    for url in ("http://good.example.com/hook", "http://GOOD.example.com:80/x?y=1",
                "https://hooks.example.org:8443/api/done"):
        policy.check(url)
    for url in ("http://good.example.com.evil.net/", "http://good.example.com@evil.net/",
                "http://evil.net/?http://good.example.com", "https://good.example.com/",
                "http://good.example.com:8080/", "https://hooks.example.org:8443/apix",
                "https://hooks.example.org:8443/api/../admin", "https://hooks.example.org/api/x"):
        with pytest.raises(WebhookRefused):
            policy.check(url)
    WebhookPolicy(("http://127.0.0.1:9000/",)).check("http://127.0.0.1:9000/hook")  # the operator's opt-in


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8188/prompt", "http://localhost/", "http://LOCALHOST./", "http://api.localhost/",
    "http://169.254.169.254/latest/meta-data", "http://100.100.100.200/", "http://10.1.2.3/",
    "http://192.168.0.1/", "http://172.16.0.1/", "http://0.0.0.0/", "http://[::1]/", "http://[::]/",
    "http://[fd00::1]/", "http://[::ffff:127.0.0.1]/", "http://127.1/", "http://2130706433/",
    "http://0x7f000001/", "ftp://example.com/", "http://user@example.com/",
])
def test_default_policy_refuses_local_private_and_odd_urls(url: str) -> None:
    with pytest.raises(WebhookRefused):
        WebhookPolicy().check(url)


def test_default_policy_allows_public_targets() -> None:
    for url in ("https://hooks.example.com/comfy", "http://8.8.8.8:8080/x", "https://[2001:4860::8888]/"):
        WebhookPolicy().check(url)


async def test_front_refuses_a_webhook_with_400_and_queues_nothing(api: ApiFactory) -> None:
    live = await api()
    for webhook in ("http://169.254.169.254/latest/meta-data", "http://127.0.0.1:9/x"):
        resp = await live.submit(tiny_graph(), task_id="t", webhook=webhook)
        assert resp.status_code == 400
        assert resp.json()["error"]["type"] == "webhook_not_allowed"
        assert "--webhook-allow" in resp.json()["error"]["message"]
    allowed = await api(webhook_allow=("https://hooks.example.com/",))
    resp = await allowed.submit(tiny_graph(), task_id="t", webhook="https://hooks.example.com.evil.net/")
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "webhook_not_allowed"
    assert await queue_length(live.endpoint, SERVICE) == 0
    assert await queue_length(allowed.endpoint, SERVICE) == 0
    resp = await allowed.submit(tiny_graph(), task_id="ok", webhook="https://hooks.example.com/done")
    assert resp.status_code == 200
    assert await queue_length(allowed.endpoint, SERVICE) == 1


async def test_worker_skips_a_refused_webhook_of_an_item_put_directly(api: ApiFactory, instance_url: Any,
                                                                     aiohttp_server: Any) -> None:
    hook_port, calls, _ = await webhook_receiver(aiohttp_server)
    live = await api(instance_urls=(await instance_url(),))  # default policy: loopback refused
    async with live.input() as queue, live.sink() as sink:
        await queue.put(json.dumps(tiny_graph("direct-hook")),
                        {"task_id": "direct", "webhook": f"http://127.0.0.1:{hook_port}/hook"})
        [frame] = await read_results(sink, 1)
    assert frame.tags["status"] == "success"  # the result stands; only the delivery is skipped

    async def skipped() -> bool:
        return value(await live.metrics(), "comfyserve_api_webhook_failures_total") == 1

    await until(skipped, what="the worker skipping the webhook")
    assert calls == []


def test_flags_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: Any) -> None:
    from api_edition import command, worker_command
    from standard.cli import main

    monkeypatch.setenv("COMFYSERVE_WEBHOOK_ALLOW", "https://a.example.com/hooks,http://10.0.0.5:8080/")
    monkeypatch.setenv("COMFYSERVE_MAX_ATTEMPTS", "5")
    parser = argparse.ArgumentParser()
    worker_command.add_arguments(parser)
    settings = worker_command.settings_from_args(parser.parse_args(
        ["--queue-url", "http://127.0.0.1:1", "--instance-url", "http://127.0.0.1:2"]))
    assert settings.max_attempts == 5
    assert settings.webhook_allow == ("https://a.example.com/hooks", "http://10.0.0.5:8080/")
    monkeypatch.delenv("COMFYSERVE_WEBHOOK_ALLOW")
    monkeypatch.delenv("COMFYSERVE_MAX_ATTEMPTS")
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    settings_api = command.settings_from_args(parser.parse_args(
        ["--data-dir", str(tmp_path), "--webhook-allow", "http://x.example/", "--webhook-allow", "http://y.example/"]))
    assert settings_api.max_attempts == 3 and settings_api.webhook_allow == ("http://x.example/", "http://y.example/")
    assert main(["api", "--data-dir", str(tmp_path), "--max-attempts", "-1"]) == 2
    assert main(["worker", "--queue-url", "http://127.0.0.1:1", "--instance-url", "http://127.0.0.1:2",
                 "--webhook-allow", "ftp://x/"]) == 2
    err = capsys.readouterr().err
    assert "--max-attempts must be >= 0" in err and "--webhook-allow" in err


async def test_a_submit_that_never_reached_its_instance_is_not_an_attempt(api: ApiFactory, aiohttp_server: Any,
                                                                          data_dir: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """--max-attempts 1: the instance died while its worker waited for input, so the worker's submit of the
    next task never reached it. That is not a run: once the instance is back the task runs and succeeds
    (it used to count, and the task came back as too_many_attempts without a single real run)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = await aiohttp_server(create_embedded_app(StandardSettings(data_dir=data_dir, token=TOKEN)), port=port)
    live = await api(instance_urls=(url,), max_attempts=1)
    async with live.input() as queue:
        async def watching() -> bool:
            return (await queue.attributes())["consumers.status.total"] == "1"

        await until(watching, what="the worker watching the input queue")
    await first.close()  # dead before the task arrives; the idle worker does not notice
    assert (await live.submit(tiny_graph("late"), task_id="late")).status_code == 200
    await until(lambda: any("giving task late back" in r.getMessage() for r in caplog.records),
                what="the worker failing to submit to its dead instance")
    await aiohttp_server(create_embedded_app(StandardSettings(data_dir=data_dir, token=TOKEN)), port=port)
    async with live.sink() as sink:
        [frame] = await read_results(sink, 1)
        await results_final(live.endpoint, 1)
    assert frame.tags["task_id"] == "late" and frame.tags["status"] == "success", frame.data
    await attempts_dropped(live.endpoint)
