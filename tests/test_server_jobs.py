"""/jobs: the job list, detail and cancel the ComfyUI frontend draws its queue and history from."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.server import (
    events_until,
    gated_graph,
    install_gate_plugin,
    is_done,
    next_json,
    open_gate,
    prompt_uuid,
    tiny_graph,
)


async def test_empty_job_list_shape(instance) -> None:
    client = await instance()
    resp = await client.get("/api/jobs?status=completed,failed,cancelled&limit=200&offset=0")
    assert resp.status == 200
    assert await resp.json() == {"jobs": [], "pagination": {"offset": 0, "limit": 200, "total": 0, "has_more": False}}
    assert (await client.get("/jobs/unknown")).status == 404


@pytest.mark.parametrize("query", ["status=done", "sort_by=name", "sort_order=up", "limit=0", "limit=x", "offset=y"])
async def test_bad_job_query_is_400(instance, query: str) -> None:
    client = await instance()
    resp = await client.get(f"/jobs?{query}")
    assert resp.status == 400
    assert "error" in await resp.json()


async def test_cancel_is_idempotent_and_needs_a_list_of_uuids(instance) -> None:
    """As current ComfyUI: an unknown or finished job is ``cancelled: false`` (the frontend shows any
    non-2xx as an error); a batch with an id that is not a canonical UUID is refused whole."""
    client = await instance()
    assert await (await client.post("/jobs/cancel", json={"job_ids": []})).json() == {"cancelled": False}
    assert (await client.post("/jobs/cancel", json={"job_ids": "x"})).status == 400
    refused = await client.post("/jobs/cancel", json={"job_ids": [prompt_uuid("a"), "nothing", 5]})
    assert refused.status == 400 and (await refused.json())["invalid_ids"] == ["nothing", "5"]
    unknown = await client.post("/jobs/nothing/cancel")
    assert unknown.status == 200 and await unknown.json() == {"cancelled": False}
    assert await (await client.post("/jobs/cancel", json={"job_ids": [prompt_uuid("a")]})).json() == {
        "cancelled": False}


async def test_jobs_follow_a_prompt_from_pending_to_completed_and_cancel(instance, data_dir: Path) -> None:
    install_gate_plugin(data_dir)
    client = await instance()
    ws = await client.ws_connect("/ws?clientId=j")
    await next_json(ws)
    running = await (await client.post("/prompt", json={"prompt": gated_graph("g-j", "j"), "client_id": "j"})).json()
    await events_until(ws, lambda e: e["type"] == "executing" and e["data"].get("node") == "2")
    waiting = await (await client.post("/prompt", json={"prompt": tiny_graph("jw"), "client_id": "j"})).json()
    dropped = await (await client.post("/prompt", json={"prompt": tiny_graph("jd"), "client_id": "j"})).json()

    page = await (await client.get("/jobs?status=in_progress,pending")).json()
    by_id = {job["id"]: job for job in page["jobs"]}
    assert by_id[running["prompt_id"]]["status"] == "in_progress"
    assert by_id[waiting["prompt_id"]]["status"] == "pending"
    assert page["pagination"]["total"] == 3
    detail = await (await client.get(f"/jobs/{waiting['prompt_id']}")).json()
    assert detail["status"] == "pending" and isinstance(detail["create_time"], int)
    assert detail["workflow"]["prompt"] == tiny_graph("jw")

    cancelled = await client.post(f"/jobs/{dropped['prompt_id']}/cancel")
    assert await cancelled.json() == {"cancelled": True}
    assert await (await client.post(f"/jobs/{dropped['prompt_id']}/cancel")).json() == {"cancelled": False}
    open_gate(data_dir, "g-j")
    await events_until(ws, is_done(waiting["prompt_id"]))

    done = await (await client.get("/jobs?status=completed,failed,cancelled")).json()
    assert [job["id"] for job in done["jobs"]] == [waiting["prompt_id"], running["prompt_id"]]
    job = done["jobs"][0]
    assert job["status"] == "completed" and job["outputs_count"] == 1 and job["previewable_outputs_count"] == 1
    assert job["preview_output"]["filename"] == "jw_00001_.png" and job["preview_output"]["nodeId"] == "2"
    assert job["execution_end_time"] >= job["execution_start_time"]
    detail = await (await client.get(f"/api/jobs/{waiting['prompt_id']}")).json()
    assert detail["outputs"]["2"]["images"][0]["filename"] == "jw_00001_.png"
    assert detail["workflow"]["prompt"] == tiny_graph("jw")
    assert detail["execution_status"]["status_str"] == "success"

    # cancelling the running job interrupts it and it is listed as cancelled
    again = await (await client.post("/prompt", json={"prompt": gated_graph("g-j2", "j2"), "client_id": "j"})).json()
    await events_until(ws, lambda e: e["type"] == "executing" and e["data"].get("node") == "2")
    resp = await client.post("/jobs/cancel", json={"job_ids": [again["prompt_id"]]})
    assert await resp.json() == {"cancelled": True}
    open_gate(data_dir, "g-j2")
    await events_until(ws, is_done(again["prompt_id"]))
    cancelled_page = await (await client.get("/jobs?status=cancelled")).json()
    assert [job["id"] for job in cancelled_page["jobs"]] == [again["prompt_id"]]
    await ws.close()
