"""A split-deployment worker (queue over HTTP) with the client features: URL inputs, progress, events, cancel."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

from aiohttp import web
from PIL import Image

from api_edition.client import ApiClient
from api_edition.settings import WorkerSettings
from api_edition.worker import Worker
from support.api import SERVICE, TOKEN, ApiFactory
from support.server import halfway_graph, install_gate_plugin
from support.wait import until


async def test_an_http_worker_fetches_reports_progress_streams_and_cancels(api: ApiFactory, instance_url: Any,
                                                                          data_dir: Path,
                                                                          aiohttp_server: Any) -> None:
    install_gate_plugin(data_dir)
    picture = io.BytesIO()
    Image.new("RGB", (4, 5), "blue").save(picture, format="PNG")
    files = web.Application()
    files.router.add_get("/p.png", lambda request: web.Response(body=picture.getvalue()))
    server = await aiohttp_server(files)
    origin = f"http://127.0.0.1:{server.port}/"
    live = await api(data_dir=data_dir, input_url_allow=(origin,))
    url = await instance_url()
    async with ApiClient(live.url, TOKEN, service=SERVICE) as client:
        fetched = await client.submit({"1": {"class_type": "LoadImage", "inputs": {"image": "p.png"}},
                                       "2": {"class_type": "SaveImage",
                                             "inputs": {"images": ["1", 0], "filename_prefix": "split"}}},
                                      inputs={"p.png": origin + "p.png"}, task_id="fetched")
        stuck = await client.submit(halfway_graph("never", "stuck"), task_id="stuck")
        events = client.events(stuck)
        first = await anext(events)  # subscribed before the worker starts
        assert (first.kind, first.data["state"]) == ("status", "queued")
        worker = Worker(WorkerSettings(queue_url=live.url, service=SERVICE, instance_url=url, token=TOKEN,
                                       data_dir=data_dir, input_url_allow=(origin,)))
        running = asyncio.create_task(worker.run())
        try:
            result = await client.result(fetched, timeout_s=30)
            assert result.ok, result.events
            with Image.open(io.BytesIO(await client.output(result.files()[0]))) as image:
                assert image.size == (4, 5)
            await until(lambda: not any((data_dir / "input" / "api").iterdir()), what="the input folder removed")

            async def halfway() -> bool:
                answer = await client.status(stuck)
                return answer is not None and answer.get("progress") == {"value": 1, "max": 4}

            await until(halfway, what="progress over HTTP")
            assert (await client.status(stuck))["worker"] == worker.name
            assert (await client.cancel(stuck))["cancel_requested"] is True
            seen = [event async for event in events]
            kinds = [event.kind for event in seen]
            assert "executing" in kinds and "progress" in kinds and kinds[-1] == "result"
            assert seen[-1].data["state"] == "cancelled"
            cancelled = await client.result(stuck, timeout_s=30)
            assert cancelled.error["exception_type"] == "cancelled"
            assert cancelled.tags["task_id"] == "stuck"
        finally:
            await worker.shutdown(running, 1.0)
