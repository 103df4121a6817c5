"""``standard.client.InstanceClient`` against real instances on loopback: HTTP, events, timeouts, reconnects."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from standard.client import ClientTimeouts, Connected, Disconnected, InstanceClient
from standard.datadir import init_data_dir
from standard.errors import InstanceError, InstanceUnavailable, PromptRejected
from standard.ports import free_port
from support.backend import start_backend
from support.server import png_bytes
from support.wait import until

FAST = ClientTimeouts(connect_s=1.0, request_s=2.0, ws_open_s=2.0, disconnected_s=3.0,
                      reconnect_min_s=0.02, reconnect_max_s=0.2, history_poll_s=0.05, idle_check_s=1.0,
                      get_retries=2)


async def test_rejected_prompt_carries_comfyuis_error_body(backend) -> None:
    async with InstanceClient(backend.url, timeouts=FAST) as client:
        with pytest.raises(PromptRejected) as info:
            await client.submit(["not", "a", "graph"])  # type: ignore[arg-type]
    body = info.value.body
    assert body["error"]["type"] == "invalid_prompt"
    assert body["node_errors"] == {}
    assert "prompt" in str(info.value).lower()


async def test_history_queue_and_files(backend) -> None:
    async with InstanceClient(backend.url, timeouts=FAST) as client:
        assert await client.history("no-such-prompt") == {}
        assert await client.history_entry("no-such-prompt") is None
        assert await client.history(max_items=5) == {}
        assert await client.queue() == {"queue_running": [], "queue_pending": []}
        await client.delete_queued(["nothing"])
        await client.interrupt()
        image = png_bytes((5, 5))
        first = await client.upload_image(image, "a b.png", subfolder="sub dir")
        assert first == {"name": "a b.png", "subfolder": "sub dir", "type": "input"}
        again = await client.upload_image(png_bytes((6, 6)), "a b.png", subfolder="sub dir")
        assert again["name"] == "a b (1).png"  # ComfyUI's rename instead of overwrite
        assert await client.view("a b.png", "sub dir", "input") == image
        with pytest.raises(InstanceError):
            await client.view("missing.png", "", "input")
        assert await client.health() is True


async def test_dead_instance_is_unavailable_quickly() -> None:
    async with InstanceClient(f"http://127.0.0.1:{free_port()}", timeouts=FAST) as client:
        assert await client.health() is False
        assert await client.ready() is False
        with pytest.raises(InstanceUnavailable):
            await client.queue()
        with pytest.raises(InstanceUnavailable):
            await client.submit({})


async def test_a_silent_server_times_out() -> None:
    """A peer that accepts and never answers: the request timeout applies, not a hang."""
    accepted: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    timeouts = ClientTimeouts(request_s=0.3, connect_s=0.3, ws_open_s=0.3, get_retries=0)
    try:
        async with InstanceClient(f"http://127.0.0.1:{port}", timeouts=timeouts) as client:
            started = time.monotonic()
            with pytest.raises(InstanceUnavailable, match="timed out"):
                await client.history("x")
            with pytest.raises(InstanceUnavailable):
                async for _ in client.events("c", reconnect=False):
                    pass
            assert time.monotonic() - started < 3
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_gets_retry_until_the_instance_comes_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    timeouts = ClientTimeouts(connect_s=1.0, request_s=2.0, reconnect_min_s=0.1, reconnect_max_s=0.5,
                              get_retries=8)
    async with InstanceClient(f"http://127.0.0.1:{port}", timeouts=timeouts) as client:
        pending = asyncio.create_task(client.queue())
        await until(lambda: any("GET /queue failed" in r.getMessage() for r in caplog.records),
                    what="the first GET failing")
        assert not pending.done()  # it is retrying
        started = await start_backend(init_data_dir(tmp_path / "late").root, port=port)
        try:
            assert await asyncio.wait_for(pending, 10) == {"queue_running": [], "queue_pending": []}
        finally:
            await started.server.close()


async def test_events_reconnect_when_the_server_restarts(tmp_path: Path) -> None:
    data_dir = init_data_dir(tmp_path / "d").root
    first = await start_backend(data_dir)
    port = first.server.port
    async with InstanceClient(first.url, timeouts=FAST) as client:
        events = client.events("watcher", markers=True)
        assert await asyncio.wait_for(anext(events), 10) == Connected(0)
        status = await asyncio.wait_for(anext(events), 10)
        assert status["type"] == "status" and status["data"]["sid"] == "watcher"
        await first.server.close()
        assert isinstance(await asyncio.wait_for(anext(events), 10), Disconnected)
        second = await start_backend(data_dir, port=port)
        try:
            assert await asyncio.wait_for(anext(events), 10) == Connected(1)
            status = await asyncio.wait_for(anext(events), 10)
            assert status["data"]["sid"] == "watcher"
        finally:
            await events.aclose()
            await second.server.close()


async def test_events_give_up_after_disconnected_s(tmp_path: Path) -> None:
    started = await start_backend(init_data_dir(tmp_path / "d").root)
    timeouts = ClientTimeouts(disconnected_s=0.5, reconnect_min_s=0.02, reconnect_max_s=0.1, ws_open_s=1.0)
    async with InstanceClient(started.url, timeouts=timeouts) as client:
        events = client.events("x")
        assert (await asyncio.wait_for(anext(events), 10))["type"] == "status"
        await started.server.close()
        began = time.monotonic()
        with pytest.raises(InstanceUnavailable):
            await asyncio.wait_for(anext(events), 10)
        assert 0.4 < time.monotonic() - began < 5


async def test_closed_client_refuses_work_and_closes_twice_safely(backend) -> None:
    client = InstanceClient(backend.url)
    await client.aclose()
    await client.aclose()
    with pytest.raises(InstanceError, match="closed"):
        await client.queue()


async def test_token_is_sent_raw(tmp_path: Path) -> None:
    from aiohttp.test_utils import TestServer

    from standard.server.app import create_embedded_app
    from standard.settings import StandardSettings

    server = TestServer(create_embedded_app(StandardSettings(data_dir=init_data_dir(tmp_path / "t").root,
                                                             token="tok")), host="127.0.0.1")
    await server.start_server()
    try:
        base = f"http://127.0.0.1:{server.port}"
        async with InstanceClient(base, "tok", timeouts=FAST) as client:
            assert await client.queue() == {"queue_running": [], "queue_pending": []}
            events = client.events("t")
            assert (await asyncio.wait_for(anext(events), 10))["type"] == "status"
            await events.aclose()
        async with InstanceClient(base, "nope", timeouts=FAST) as client:
            with pytest.raises(InstanceError, match="401"):
                await client.queue()
    finally:
        await server.close()


async def test_any_json_route(backend) -> None:
    async with InstanceClient(backend.url, timeouts=FAST) as client:
        assert await client.get_json("/models/checkpoints") == []
        assert "system" in await client.get_json("/system_stats")
        with pytest.raises(InstanceError, match="404"):
            await client.get_json("/no/such/route")


def test_public_names() -> None:
    import standard.client as client

    assert all(hasattr(client, name) for name in client.__all__)
    assert {"InstanceClient", "RunResult", "BinaryFrame", "PromptRejected", "PromptLost"} <= set(client.__all__)
