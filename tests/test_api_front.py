"""The /api_prompt front: what it accepts, what it refuses, and that it answers like the queue's put."""

from __future__ import annotations

import json

import httpx

from support.api import SERVICE, TOKEN, ApiFactory
from support.metrics import value
from support.server import tiny_graph


async def test_bare_graph_is_queued_with_task_id_and_extra_tags(api: ApiFactory) -> None:
    live = await api()
    resp = await live.submit(tiny_graph("a"), task_id="txt2img_0", user="alice")
    assert resp.status_code == 200
    assert resp.text == "1"
    request_id = resp.headers["X-Eas-Queueservice-Request-Id"]
    assert resp.headers["X-Task-Id"] == "txt2img_0"
    async with live.input() as queue:
        [frame] = await queue.get(0, 5)
    assert frame.index == 1
    assert frame.tags == {"task_id": "txt2img_0", "user": "alice", "requestId": request_id}
    assert json.loads(frame.data) == tiny_graph("a")


async def test_wrapped_graph_and_service_path(api: ApiFactory) -> None:
    live = await api()
    resp = await live.submit({"prompt": tiny_graph("b"), "client_id": "x"}, path=f"/api/predict/{SERVICE}/api_prompt",
                             task_id="t")
    assert resp.status_code == 200, resp.text
    async with live.input() as queue:
        [frame] = await queue.get(int(resp.text), 1)
    assert json.loads(frame.data) == tiny_graph("b")


async def test_missing_task_id_is_generated_and_returned(api: ApiFactory) -> None:
    live = await api()
    async with httpx.AsyncClient(base_url=live.url, trust_env=False) as http:
        resp = await http.post("/api_prompt", json=tiny_graph(), headers={"Authorization": f"Bearer {TOKEN}",
                                                                         "Accept": "application/json"})
    assert resp.status_code == 200
    body = resp.json()
    assert body["task_id"] == resp.headers["X-Task-Id"] and body["task_id"].startswith("task-")
    assert body["request_id"] == resp.headers["X-Eas-Queueservice-Request-Id"]
    async with live.input() as queue:
        [frame] = await queue.get(body["index"], 1)
    assert frame.tags["task_id"] == body["task_id"]


async def test_bad_bodies_are_refused_before_queuing(api: ApiFactory) -> None:
    live = await api(max_payload_bytes=2048)
    cases = [
        (b"not json", 400, "invalid_json"),
        (b"", 400, "empty_body"),
        (b"[1, 2]", 400, "invalid_prompt"),
        (b"{}", 400, "invalid_prompt"),
        (json.dumps({"1": {"inputs": {}}}).encode(), 400, "invalid_prompt"),
        (json.dumps({"1": {"class_type": "SaveImage", "inputs": {"images": ["9", 0]}}}).encode(), 400,
         "invalid_prompt"),
        (json.dumps({"nodes": [], "links": []}).encode(), 400, "invalid_prompt"),  # the UI format
        (json.dumps(tiny_graph("x" * 4000)).encode(), 413, "payload_too_large"),
    ]
    for body, status, kind in cases:
        resp = await live.submit(body, task_id="t")
        assert resp.status_code == status, (body[:50], resp.text)
        assert resp.json()["error"]["type"] == kind
    async with live.input() as queue:
        assert (await queue.attributes())["stream.length"] == "0"


async def test_token_is_required_everywhere(api: ApiFactory) -> None:
    live = await api()
    for token in ("wrong", ""):
        resp = await live.submit(tiny_graph(), token=token, task_id="t")
        assert resp.status_code == 401
    async with httpx.AsyncClient(base_url=live.url, trust_env=False) as http:
        assert (await http.get(f"/api/predict/{SERVICE}/sink", params={"_attrs_": "true"})).status_code == 401
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/healthz")).status_code == 200


async def test_full_input_queue_is_429_with_retry_after(api: ApiFactory) -> None:
    live = await api(max_length=2)
    for i in range(2):
        assert (await live.submit(tiny_graph(), task_id=f"t{i}")).status_code == 200
    resp = await live.submit(tiny_graph(), task_id="t2")
    assert resp.status_code == 429
    assert resp.headers["Retry-After"] == "1"
    assert resp.json()["error"]["type"] == "queue_full"


async def test_queue_routes_share_the_port_and_metrics_count(api: ApiFactory) -> None:
    live = await api()
    await live.submit(tiny_graph(), task_id="t")
    await live.submit(b"junk", task_id="u")
    async with live.input() as queue:
        attrs = await queue.attributes()
    assert attrs["meta.name"] == SERVICE and attrs["stream.length"] == "1"
    metrics = await live.metrics()
    assert value(metrics, "comfyserve_api_queue_length", queue="svc") == 1
    assert value(metrics, "comfyserve_api_tasks_accepted_total") == 1
    assert value(metrics, "comfyserve_api_tasks_refused_total", reason="invalid_json") == 1


async def test_webhook_must_be_http(api: ApiFactory) -> None:
    live = await api()
    resp = await live.submit(tiny_graph(), task_id="t", webhook="file:///etc/passwd")
    assert resp.status_code == 400


async def test_stateless_front_puts_on_a_remote_queue(api: ApiFactory) -> None:
    queue_side = await api()
    front = await api(queue_url=queue_side.url, sqlite_path=None)
    resp = await front.submit(tiny_graph(), task_id="remote")
    assert resp.status_code == 200, resp.text
    async with queue_side.input() as queue:
        [frame] = await queue.get(int(resp.text), 1)
    assert frame.tags["task_id"] == "remote"
    assert frame.request_id == resp.headers["X-Eas-Queueservice-Request-Id"]
    full = await api(max_length=1)
    front2 = await api(queue_url=full.url, sqlite_path=None)
    assert (await front2.submit(tiny_graph(), task_id="a")).status_code == 200
    resp = await front2.submit(tiny_graph(), task_id="b")
    assert resp.status_code == 429 and resp.headers["Retry-After"] == "1"


def test_cli_refuses_impossible_configurations(capsys: object, tmp_path: object) -> None:
    from standard.cli import main

    assert main(["api"]) == 2
    assert main(["api", "--data-dir", str(tmp_path), "--listen"]) == 2  # public address without a token
    assert main(["api", "--data-dir", str(tmp_path), "--instances", "-1"]) == 2
    assert main(["worker", "--queue-url", "http://127.0.0.1:1"]) == 2  # no --instance-url
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert "--data-dir is required" in err and "without a token" in err and "--instance-url is required" in err
