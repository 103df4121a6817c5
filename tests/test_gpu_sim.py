"""The simulated GPU of bench/gpu_sim.py: its nodes load into an instance, keep one checkpoint per
process and record each task's start and end; the bench's figures follow from such records."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.gpu_sim import run_dir
from bench.gpu_sim_figures import Costs, Task, figures, install, read_records, task_graph
from support.server import events_until, is_done, wait_history

FREE = Costs(load_s=0.0, steps=2, step_s=0.0)  # no time spent: the test checks what is recorded, not how long


async def test_sim_nodes_load_keep_one_checkpoint_and_record_each_task(instance, data_dir: Path) -> None:
    install(data_dir, ["sim_a.safetensors", "sim_b.safetensors"])
    client = await instance()
    info = await (await client.get("/object_info/SimCheckpointLoader")).json()
    assert sorted(info["SimCheckpointLoader"]["input"]["required"]["ckpt_name"][0]) == [
        "sim_a.safetensors", "sim_b.safetensors", "sim_warmup.safetensors"]

    tasks = [Task("c0", "one", "sim_a.safetensors"), Task("c0", "two", "sim_a.safetensors"),
             Task("c1", "three", "sim_b.safetensors")]
    ids = []
    for task in tasks:  # queued at once: the instance runs them one after another, in order
        resp = await client.post("/prompt", json={"prompt": task_graph(task.ckpt, task.label, FREE)})
        assert resp.status == 200, await resp.text()
        ids.append((await resp.json())["prompt_id"])
    entries = [await wait_history(client, prompt_id) for prompt_id in ids]

    records = read_records(data_dir)
    assert [(r["label"], r["ckpt"], r["loaded"]) for r in records] == [
        ("one", "sim_a.safetensors", True), ("two", "sim_a.safetensors", False), ("three", "sim_b.safetensors", True)]
    assert len({r["pid"] for r in records}) == 1
    for record in records:
        stamps = [record[key] for key in ("start_us", "load_end_us", "sample_start_us", "end_us")]
        assert all(isinstance(stamp, int) for stamp in stamps) and stamps == sorted(stamps)
    assert all(prev["end_us"] <= nxt["start_us"] for prev, nxt in zip(records, records[1:], strict=False))
    for entry, record in zip(entries, records, strict=True):
        assert entry["status"]["status_str"] == "success"
        assert entry["outputs"]["2"] == {"gpu_sim": [record]}

    start_us = records[0]["start_us"]
    result = figures(records, tasks, {task.label: start_us for task in tasks}, start_us, instances=1)
    assert (result.loads, result.min_loads, result.instances_used) == (2, 2, 1)
    assert len(result.gaps_ms) == 2 and min(result.gaps_ms) >= 0
    assert result.missing == [] and result.repeated == []


async def test_the_sampler_reports_each_step_as_progress(instance, data_dir: Path) -> None:
    install(data_dir, ["sim_a.safetensors"])
    client = await instance()
    ws = await client.ws_connect("/ws?clientId=tab")
    steps = Costs(load_s=0.0, steps=3, step_s=0.0)
    resp = await client.post("/prompt", json={"prompt": task_graph("sim_a.safetensors", "one", steps),
                                              "client_id": "tab"})
    assert resp.status == 200, await resp.text()
    prompt_id = (await resp.json())["prompt_id"]
    events = await events_until(ws, is_done(prompt_id))
    progress = [(e["data"]["value"], e["data"]["max"]) for e in events
                if e["type"] == "progress" and e["data"].get("prompt_id") == prompt_id]
    assert progress == [(1, 3), (2, 3), (3, 3)]  # one per step, as KSampler's; the last one's value is max
    await ws.close()


def record(pid: int, label: str, start_ms: int, end_ms: int, loaded: bool) -> dict:
    return {"pid": pid, "label": label, "ckpt": label[0], "loaded": loaded, "load_s": 0.5, "steps": 10,
            "step_s": 0.01, "start_us": start_ms * 1000, "load_end_us": (start_ms + (500 if loaded else 0)) * 1000,
            "sample_start_us": (start_ms + (500 if loaded else 0)) * 1000, "end_us": end_ms * 1000}


def test_figures_count_only_gaps_where_the_next_task_was_waiting() -> None:
    tasks = [Task("u", "a1", "a"), Task("u", "a2", "a"), Task("v", "b1", "b"), Task("v", "b2", "b"),
             Task("v", "b3", "b")]
    records = [
        record(1, "a1", 0, 600, True), record(1, "a2", 610, 710, False),  # a2 was waiting: a 10 ms gap
        record(2, "b1", 5, 605, True), record(2, "b2", 900, 1000, False),  # b2 came after b1 ended: no gap
        record(2, "b3", 1000, 1100, False), record(2, "b3", 1100, 1200, False),  # b3 ran twice
    ]
    accepted = {"a1": 0, "a2": 1_000, "b1": 1_000, "b2": 800_000, "b3": 801_000}  # microseconds
    result = figures(records, tasks, accepted, 0, instances=3)
    assert result.gaps_ms == [10.0, 0.0, 0.0]
    assert (result.loads, result.min_loads, result.instances_used) == (2, 3, 2)
    assert result.makespan_s == 1.2 and result.client_done_s == {"u": 0.71, "v": 1.2}
    assert result.repeated == ["b3"] and result.missing == []
    assert result.ideal_s == (6 * 0.1 + 3 * 0.5) / 3


def test_keep_folder_is_made_if_missing_and_a_run_never_reuses_one(tmp_path: Path) -> None:
    keep = tmp_path / "not" / "there"  # --keep DIR: a new folder used to fail the run at its first mode
    assert run_dir(str(keep), "direct").is_dir()
    assert run_dir(str(keep), "direct-baseline").is_dir()
    with pytest.raises(FileExistsError):  # an earlier run's records would count in this run's figures
        run_dir(str(keep), "direct")
