"""The /api_prompt front refuses hostile input before anything is queued."""

from __future__ import annotations

import json

import httpx

from support.api import TOKEN, ApiFactory
from support.server import tiny_graph


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


async def test_a_task_id_that_cannot_be_a_header_is_400_before_queuing(api: ApiFactory) -> None:
    live = await api()
    for task_id in ("a\r\nX-Evil: 1", "a\nb", "a\rb", "nul\x00", "bell\x07", "del\x7f", "x" * 257, ""):
        resp = await live.submit(tiny_graph(), task_id=task_id)
        assert resp.status_code == 400, (task_id, resp.text)
        assert resp.json()["error"]["type"] == "bad_request"
    assert await queue_length(live) == 0
    ok = await live.submit(tiny_graph(), task_id="x" * 256)
    assert ok.status_code == 200 and ok.headers["X-Task-Id"] == "x" * 256


async def test_a_repeated_task_id_is_two_tasks(api: ApiFactory) -> None:
    live = await api()
    first, second = [await live.submit(tiny_graph(), task_id="same") for _ in range(2)]
    assert (first.text, second.text) == ("1", "2")
    assert first.headers["X-Eas-Queueservice-Request-Id"] != second.headers["X-Eas-Queueservice-Request-Id"]
    assert await queue_length(live) == 2


async def idempotent_submit(live, key: str, **params: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=live.url, trust_env=False) as http:
        return await http.post("/api_prompt", params=params, content=json.dumps(tiny_graph()).encode(),
                               headers={"Authorization": TOKEN, "Idempotency-Key": key})


async def test_an_idempotency_key_makes_a_retry_answer_the_first_put(api: ApiFactory) -> None:
    queue_side = await api()
    remote_front = await api(queue_url=queue_side.url, sqlite_path=None)
    for n, live in enumerate((queue_side, remote_front)):
        first = await idempotent_submit(live, f"retry-{n}", task_id="t")
        again = await idempotent_submit(live, f"retry-{n}", task_id="t")
        assert first.status_code == again.status_code == 200, (first.text, again.text)
        assert again.text == first.text
        assert again.headers["X-Eas-Queueservice-Request-Id"] == first.headers["X-Eas-Queueservice-Request-Id"]
        generated = [await idempotent_submit(live, f"no-task-id-{n}") for _ in range(2)]
        assert generated[0].text == generated[1].text
        assert generated[0].headers["X-Task-Id"] == generated[1].headers["X-Task-Id"]
        assert generated[0].headers["X-Task-Id"].startswith("task-")
    assert await queue_length(queue_side) == 4
    too_long = await idempotent_submit(queue_side, "k" * 257)
    assert too_long.status_code == 400
    assert await queue_length(queue_side) == 4


async def test_with_dedupe_task_id_a_repeated_task_id_answers_the_first_task(api: ApiFactory) -> None:
    queue_side = await api(dedupe_task_id=True)
    remote_front = await api(queue_url=queue_side.url, sqlite_path=None, dedupe_task_id=True)
    for live in (queue_side, remote_front):
        first, again = [await live.submit(tiny_graph(), task_id=f"same-{live.port}") for _ in range(2)]
        assert first.status_code == again.status_code == 200, (first.text, again.text)
        assert again.text == first.text
        assert again.headers["X-Eas-Queueservice-Request-Id"] == first.headers["X-Eas-Queueservice-Request-Id"]
    assert await queue_length(queue_side) == 2
    keyed = await idempotent_submit(queue_side, "same-" + str(queue_side.port), task_id="other")
    assert keyed.text == "1"  # the header wins, and it names the same key as the first task_id
