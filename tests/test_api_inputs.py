"""The /api_prompt front refuses hostile input before anything is queued."""

from __future__ import annotations

import json

from test_api_support import ApiFactory, api  # noqa: F401
from test_server_support import tiny_graph


async def queue_length(live) -> int:
    async with live.input() as queue:
        return int((await queue.attributes())["stream.length"])


async def test_deep_json_and_non_finite_numbers_are_400_and_not_queued(api: ApiFactory) -> None:
    live = await api(max_payload_bytes=1 << 20)
    graph = json.dumps(tiny_graph()).encode()
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                 graph.replace(b'"width": 16', b'"width": NaN'), graph.replace(b'"width": 16', b'"width": 1e999'),
                 graph.replace(b'"width": 16', b'"width": -Infinity')):
        assert body != graph
        resp = await live.submit(body, task_id="t")
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["type"] == "invalid_json"
    assert await queue_length(live) == 0
