"""Who may call the API edition's client routes: ``/api_task``, ``/api_task/cancel``, ``/api_events``,
``/workflows`` and ``/api_output`` behind the access guard.

The same rules as ``/api_prompt`` (the service token; without one, loopback only with the Host and Origin
checks), the same routes under the service root, and ids no task can have refused before the store is read.
The front has one token per service (no users): "another user's token" is any token but the service's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from standard.guard import AccessPolicy
from support.access import EVIL_ORIGINS
from support.api import SERVICE, TOKEN, ApiFactory, LiveApi
from support.server import tiny_graph

ROUTES = (("GET", "/api_task"), ("POST", "/api_task/cancel"), ("GET", "/api_events"),
          ("GET", f"/api/predict/{SERVICE}/api_task"), ("POST", f"/api/predict/{SERVICE}/api_task/cancel"),
          ("GET", f"/api/predict/{SERVICE}/api_events"))
# Every client route with what it is called with: the task routes with a queued task's id, the workflow
# list, and an output file that exists (what a refused call must not give away).
SECRET_OUTPUT = b"the bytes of an output only the token holder may read"
GUARDED = (*((method, path, {"task_id": "mine"}) for method, path in ROUTES),
           ("GET", "/workflows", {}), ("GET", "/api_output", {"filename": "out.png", "subfolder": "t"}))
HOSTILE_IDS = ("a\x00b", "line\nbreak", "cr\rlf", "tab\there", "del\x7f", "esc\x1b[2J", "x" * 257, "é" * 300)


async def queued_task(live: LiveApi, task_id: str = "mine") -> str:
    resp = await live.submit(tiny_graph(), task_id=task_id)
    assert resp.status_code == 200, resp.text
    return resp.headers["X-Eas-Queueservice-Request-Id"]


async def call(live: LiveApi, method: str, path: str, params: dict[str, Any],
               headers: dict[str, str] | None = None) -> httpx.Response:
    """One request; an event stream is read up to its first event only (a queued task's stream stays open)."""
    async with httpx.AsyncClient(base_url=live.url, trust_env=False, timeout=10) as http:
        async with http.stream(method, path, params=params, headers=headers or {}) as resp:
            if resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                lines = []
                async for line in resp.aiter_lines():
                    if not line:
                        break
                    lines.append(line)
                resp._content = "\n".join(lines).encode()
            else:
                await resp.aread()
            return resp


async def guarded_front(api: ApiFactory, data_dir: Path, **settings: Any) -> LiveApi:
    """A front with a queued task "mine", a saved workflow and an output file."""
    (data_dir / "workflows").mkdir(exist_ok=True)
    (data_dir / "workflows" / "square.json").write_text(json.dumps(tiny_graph()))
    (data_dir / "output" / "t").mkdir()
    (data_dir / "output" / "t" / "out.png").write_bytes(SECRET_OUTPUT)
    live = await api(data_dir=data_dir, **settings)
    await queued_task(live)
    return live


async def answered(live: LiveApi, method: str, path: str, params: dict[str, Any],
                   headers: dict[str, str] | None = None) -> None:
    """The route itself answers a caller that is let in (so the refusals above were the guard's)."""
    if method != "GET":
        return  # a cancel would change what the refused calls must leave alone
    resp = await call(live, method, path, params, headers)
    assert resp.status_code == 200, (path, resp.text)


def refused_quietly(resp: httpx.Response) -> None:
    assert TOKEN not in resp.text and SECRET_OUTPUT not in resp.content and "square" not in resp.text


async def state(live: LiveApi, task_id: str = "mine") -> str:
    resp = await call(live, "GET", "/api_task", {"task_id": task_id}, {"Authorization": TOKEN})
    assert resp.status_code == 200, resp.text
    return resp.json()["state"]


@pytest.mark.parametrize(("method", "path", "params"), GUARDED)
async def test_no_token_a_wrong_or_another_token_or_a_foreign_origin_is_401_and_changes_nothing(
        api: ApiFactory, data_dir: Path, method: str, path: str, params: dict[str, Any]) -> None:
    live = await guarded_front(api, data_dir)
    for headers in ({}, {"Authorization": "wrong-token"}, {"Authorization": f"Bearer {TOKEN}x"},
                    {"Authorization": f"Bearer other-{TOKEN}"}, {"Origin": "http://evil.example"}):
        resp = await call(live, method, path, params, headers)
        assert resp.status_code == 401, (headers, resp.text)
        assert resp.json()["error"]["type"] == "unauthorized"
        refused_quietly(resp)
    assert await state(live) == "queued"
    await answered(live, method, path, params, {"Authorization": TOKEN})


@pytest.mark.parametrize(("method", "path", "params"), GUARDED)
async def test_without_a_token_rebound_hosts_and_opaque_origins_are_refused(
        api: ApiFactory, data_dir: Path, method: str, path: str, params: dict[str, Any]) -> None:
    live = await guarded_front(api, data_dir, token=None)
    rebound = f"attacker.example:{live.port}"
    resp = await call(live, method, path, params, {"Host": rebound, "Origin": f"http://{rebound}"})
    assert resp.status_code == 421, resp.text
    refused_quietly(resp)
    for origin in EVIL_ORIGINS:
        resp = await call(live, method, path, params, {"Origin": origin})
        assert resp.status_code == 403, (origin, resp.text)
        refused_quietly(resp)
    assert await state(live) == "queued"
    await answered(live, method, path, params)


async def test_with_a_token_the_host_is_checked_when_the_front_is_told_its_names(api: ApiFactory,
                                                                                 data_dir: Path) -> None:
    live = await guarded_front(api, data_dir, access=AccessPolicy.build(allowed_hosts=["comfy.lan"]))
    auth = {"Authorization": TOKEN}
    for method, path, params in GUARDED:
        resp = await call(live, method, path, params, {**auth, "Host": "attacker.example"})
        assert resp.status_code == 421, (path, resp.text)
        refused_quietly(resp)
    assert await state(live) == "queued"
    for method, path, params in GUARDED:
        await answered(live, method, path, params, {**auth, "Host": "comfy.lan"})


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_ids_no_task_can_have_are_400_naming_the_rule(api: ApiFactory, method: str, path: str) -> None:
    live = await api()
    request_id = await queued_task(live)
    auth = {"Authorization": TOKEN}
    for name in ("task_id", "requestId"):
        for bad in HOSTILE_IDS:
            resp = await call(live, method, path, {name: bad}, auth)
            assert resp.status_code == 400, (name, bad, resp.text)
            message = resp.json()["error"]["message"]
            assert name in message and ("control characters" in message or "1-256 characters" in message)
        # A good id beside a bad one is refused too: nothing is looked up or cancelled.
        resp = await call(live, method, path, {name: [request_id if name == "requestId" else "mine", "a\x00"]}, auth)
        assert resp.status_code == 400
    resp = await call(live, method, path, {}, auth)
    assert resp.status_code == 400
    assert await state(live) == "queued"
    async with live.sink() as sink:
        assert await sink.get(0, 10) == []


async def test_status_and_events_answer_under_the_service_root(api: ApiFactory) -> None:
    live = await api()
    request_id = await queued_task(live)
    auth = {"Authorization": TOKEN}
    resp = await call(live, "GET", f"/api/predict/{SERVICE}/api_task", {"task_id": "mine"}, auth)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"request_id": request_id, "task_id": "mine", "state": "queued", "position": 0}
    resp = await call(live, "GET", f"/api/predict/{SERVICE}/api_events", {"requestId": request_id}, auth)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    event, data = resp.text.split("\n", 1)
    assert event == "event: status"
    assert json.loads(data.removeprefix("data: "))["state"] == "queued"
