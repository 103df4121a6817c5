"""``InstanceClient.run``: submit + follow to the end, through failures, interrupts and broken sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from standard.backend.proxy import forward_http
from standard.client import ClientTimeouts, InstanceClient
from standard.datadir import init_data_dir
from standard.errors import PromptLost, PromptRejected
from support.backend import Backend, start_backend, start_front
from support.server import gated_graph, install_gate_plugin, open_gate, tiny_graph

HTTP = web.AppKey("http", aiohttp.ClientSession)

FAST = ClientTimeouts(connect_s=1.0, request_s=5.0, ws_open_s=5.0, disconnected_s=None,
                      reconnect_min_s=0.02, reconnect_max_s=0.2, history_poll_s=0.05, idle_check_s=0.5)

FAIL_PLUGIN = '''
class TestFail:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "fail"
    CATEGORY = "testing"

    def fail(self, image):
        raise ValueError("boom on purpose")


NODE_CLASS_MAPPINGS = {"TestFail": TestFail}
'''


@pytest.fixture
async def gated(tmp_path: Path) -> Backend:  # type: ignore[misc]
    root = init_data_dir(tmp_path / "gated").root
    install_gate_plugin(root)
    (root / "custom_nodes" / "test_fail.py").write_text(FAIL_PLUGIN)
    started = await start_backend(root)
    yield started
    await started.server.close()


async def wait_running(client: InstanceClient, prompt_id: str | None = None) -> str:
    for _ in range(400):
        running = (await client.queue())["queue_running"]
        if running and (prompt_id is None or running[0][1] == prompt_id):
            return running[0][1]
        await asyncio.sleep(0.025)
    raise AssertionError("nothing started running")


async def test_run_returns_executed_events_and_outputs(backend) -> None:
    async with InstanceClient(backend.url, timeouts=FAST) as client:
        result = await client.run(tiny_graph("run"), extra_data={"note": "x"}, timeout_s=30)
        assert result.ok and result.status == "success" and result.error is None
        assert result.outputs == {"2": {"images": [{"filename": "run_00001_.png", "subfolder": "", "type": "output"}]}}
        [executed] = result.executed
        assert executed["type"] == "executed"
        assert executed["data"]["node"] == "2" and executed["data"]["prompt_id"] == result.prompt_id
        assert executed["data"]["output"] == result.outputs["2"]
        kinds = [e["type"] for e in result.events]
        assert kinds[0] == "execution_start" and "executed" in kinds
        assert result.history["status"]["status_str"] == "success"
        assert result.history["prompt"][3]["note"] == "x"
        assert result.reconnects == 0


async def test_run_reports_validation_errors_as_prompt_rejected(backend) -> None:
    async with InstanceClient(backend.url, timeouts=FAST) as client:
        with pytest.raises(PromptRejected) as info:
            await client.run({"1": {"class_type": "KSampler", "inputs": {}}}, timeout_s=30)
    assert info.value.body["error"]["type"] == "missing_node_type"
    assert "KSampler" in str(info.value)
    assert "node_errors" in info.value.body


async def test_run_reports_a_failing_node(gated) -> None:
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "TestFail", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "never"}},
    }
    async with InstanceClient(gated.url, timeouts=FAST) as client:
        result = await client.run(graph, timeout_s=30)
    assert result.status == "error" and not result.ok
    assert result.error is not None and "boom on purpose" in result.error["exception_message"]
    assert result.error["node_id"] == "2"
    assert result.outputs == {} and result.executed == []


async def test_run_reports_an_interrupt(gated) -> None:
    async with InstanceClient(gated.url, timeouts=FAST) as client:
        task = asyncio.create_task(client.run(gated_graph("gate-i", "interrupted"), timeout_s=30))
        await wait_running(client)
        await client.interrupt()
        open_gate(gated.data_dir, "gate-i")
        result = await asyncio.wait_for(task, 30)
    assert result.status == "interrupted"


async def test_run_survives_the_front_restarting_mid_prompt(gated, tmp_path: Path) -> None:
    """The socket breaks, the prompt finishes meanwhile, the events are rebuilt from /history."""
    front_dir = init_data_dir(tmp_path / "front").root
    front = await start_front(gated.url, front_dir, token="t")
    port = front.port
    async with InstanceClient(f"http://127.0.0.1:{port}", "t", timeouts=FAST) as client, \
            InstanceClient(gated.url, timeouts=FAST) as direct:
        task = asyncio.create_task(client.run(gated_graph("gate-f", "survivor"), timeout_s=40))
        prompt_id = await wait_running(direct)
        await front.close()
        open_gate(gated.data_dir, "gate-f")
        for _ in range(400):
            if await direct.history_entry(prompt_id) is not None:
                break
            await asyncio.sleep(0.025)
        assert not task.done()
        front = await start_front(gated.url, front_dir, port=port, token="t")
        try:
            result = await asyncio.wait_for(task, 30)
        finally:
            await front.close()
    assert result.ok and result.prompt_id == prompt_id
    assert "executed" not in [e["type"] for e in result.events]  # it happened while the socket was down
    assert result.outputs["3"]["images"][0]["filename"] == "survivor_00001_.png"
    assert [e["data"]["node"] for e in result.executed] == ["3"]


async def test_run_polls_history_when_websockets_are_blocked(gated) -> None:
    """Behind a gateway that passes HTTP but refuses WebSockets, run() still follows by polling."""
    async def http_only(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return web.json_response({"error": "websockets blocked"}, status=404)
        return await forward_http(request, request.app[HTTP], gated.url, strip_auth=False, max_body_bytes=1 << 20)

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app[HTTP] = aiohttp.ClientSession()
        yield
        await app[HTTP].close()

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", http_only)
    gateway = TestServer(app, host="127.0.0.1")
    await gateway.start_server()
    try:
        async with InstanceClient(f"http://127.0.0.1:{gateway.port}", timeouts=FAST) as client:
            task = asyncio.create_task(client.run(gated_graph("gate-p", "polled"), timeout_s=40))
            await wait_running(client)
            open_gate(gated.data_dir, "gate-p")
            result = await asyncio.wait_for(task, 30)
    finally:
        await gateway.close()
    assert result.ok and result.events == [] and result.reconnects == 0
    assert result.outputs["3"]["images"][0]["filename"] == "polled_00001_.png"
    assert [e["data"]["node"] for e in result.executed] == ["3"]


async def test_run_notices_a_prompt_the_instance_lost(tmp_path: Path) -> None:
    root = init_data_dir(tmp_path / "lossy").root
    install_gate_plugin(root)
    first = await start_backend(root, shutdown_timeout_s=0.1)
    port = first.server.port
    async with InstanceClient(first.url, timeouts=FAST) as client:
        task = asyncio.create_task(client.run(gated_graph("gate-l", "lost"), timeout_s=40))
        await wait_running(client)
        await first.server.close()  # the instance restarts with an empty queue
        again = await start_backend(root, port=port)
        try:
            with pytest.raises(PromptLost):
                await asyncio.wait_for(task, 30)
        finally:
            open_gate(root, "gate-l")
            await again.server.close()
