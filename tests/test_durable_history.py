"""The queue and history of ``comfyserve standard`` survive a restart: kill -9, SIGTERM, the Restart button.

Pending prompts run after the restart in their order, once; the prompt that was running is reported failed
(``ServerRestarted``); ``/history``, ``/history/<id>`` and ``/api/jobs`` answer as before. A state file that
is not ours, or one another instance holds, stops the start with exit 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from standard.datadir import init_data_dir
from standard.ports import free_port
from support.metrics import parse, value
from support.processes import SHIM_DIR, VENV_BIN, alive, own_output, wait_for_port
from support.server import drain_gate_graph, install_gate_plugin, open_gate, prompt_uuid, runs_of
from support.wait import until

START_TIMEOUT_S = 30.0
# The prompts' ids: canonical UUIDs, as ComfyUI requires, named for what each prompt is in the test.
ID = {name: prompt_uuid(name) for name in ("done", "running", "p1", "p2", "a", "b", "c", "d", "e")}


class Instance:
    """``comfyserve standard`` on one data dir and port, started and stopped as often as a test needs."""

    def __init__(self, tmp_path: Path, env: dict[str, str], *extra: str) -> None:
        self.data = init_data_dir(tmp_path / "d").root
        install_gate_plugin(self.data)
        self.port = free_port()
        self.env = env
        self.extra = extra
        self.log = tmp_path / "standard.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [str(VENV_BIN / "comfyserve"), "standard", "--port", str(self.port), "--data-dir", str(self.data),
                *self.extra]

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.command(), env=self.env, stdout=out, stderr=subprocess.STDOUT)
        await asyncio.to_thread(wait_for_port, self.port, START_TIMEOUT_S, self.proc)

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        await asyncio.to_thread(self.proc.wait, 20)

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.proc.wait, 30)

    @property
    def state_file(self) -> Path:
        return self.data / ".comfyserve" / f"standard-{self.port}.sqlite3"

    def stored(self) -> tuple[dict[str, bool], list[str]]:
        """What the state file holds now: {queued prompt: running}, history ids oldest first. A kill -9 test
        waits for it: ``POST /prompt`` answers before the writer thread commits (standard.state_store)."""
        with contextlib.closing(sqlite3.connect(f"file:{self.state_file}?mode=ro", uri=True)) as db:
            prompts = {row[0]: bool(row[1]) for row in db.execute("SELECT prompt_id, running FROM prompts")}
            history = [row[0] for row in db.execute("SELECT prompt_id FROM history ORDER BY seq")]
        return prompts, history

    async def until_stored(self, prompts: dict[str, bool], history: list[str]) -> None:
        await until(lambda: self.stored() == (prompts, history), what=f"{prompts} and {history} on disk")

    @asynccontextmanager
    async def http(self) -> AsyncIterator[httpx.AsyncClient]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", trust_env=False, timeout=30) as http:
            await until(lambda: ready(http), what="the instance ready")
            yield http


async def ready(http: httpx.AsyncClient) -> bool:
    return (await http.get("/readyz")).status_code == 200


async def queue_prompt(http: httpx.AsyncClient, prompt_id: str, gate: str) -> None:
    resp = await http.post("/prompt", json={"prompt": drain_gate_graph(gate, prompt_id), "prompt_id": prompt_id})
    assert resp.status_code == 200, resp.text


async def history_of(http: httpx.AsyncClient, prompt_id: str) -> dict[str, Any] | None:
    return (await http.get(f"/history/{prompt_id}")).json().get(prompt_id)


async def pending_ids(http: httpx.AsyncClient) -> list[str]:
    return [item[1] for item in (await http.get("/queue")).json()["queue_pending"]]


async def jobs_by_id(http: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    return {job["id"]: job for job in (await http.get("/api/jobs")).json()["jobs"]}


async def finished(http: httpx.AsyncClient, *prompt_ids: str) -> bool:
    return all([await history_of(http, prompt_id) for prompt_id in prompt_ids])


async def fill(instance: Instance, http: httpx.AsyncClient) -> dict[str, Any]:
    """One finished prompt, one running (gate g1), two pending (gates g2, g3); what the history said."""
    open_gate(instance.data, "g0")
    await queue_prompt(http, ID["done"], "g0")
    await until(lambda: finished(http, ID["done"]), what="the first prompt finished")
    await queue_prompt(http, ID["running"], "g1")
    await until(lambda: runs_of(instance.data, "g1") == 1, what="the second prompt running")
    await queue_prompt(http, ID["p1"], "g2")
    await queue_prompt(http, ID["p2"], "g3")
    assert await pending_ids(http) == [ID["p1"], ID["p2"]]
    await instance.until_stored({ID["running"]: True, ID["p1"]: False, ID["p2"]: False}, [ID["done"]])
    return {"history": (await http.get("/history")).json(),
            ID["done"]: (await http.get(f"/history/{ID['done']}")).json(),
            "job": (await jobs_by_id(http))[ID["done"]]}


async def run_rest_in_order(instance: Instance, http: httpx.AsyncClient) -> None:
    """p1 then p2, each once: p2's gate opens first, yet p2 waits for p1."""
    queue = (await http.get("/queue")).json()
    assert [item[1] for item in queue["queue_running"] + queue["queue_pending"]] == [ID["p1"], ID["p2"]]
    open_gate(instance.data, "g3")
    await until(lambda: runs_of(instance.data, "g2") == 1, what="p1 running")
    assert runs_of(instance.data, "g3") == 0
    open_gate(instance.data, "g2")
    await until(lambda: finished(http, ID["p1"], ID["p2"]), what="p1 and p2 finished")
    assert (runs_of(instance.data, "g2"), runs_of(instance.data, "g3")) == (1, 1)
    assert list((await http.get("/history")).json())[-2:] == [ID["p1"], ID["p2"]]


async def test_kill_9_keeps_the_queue_and_the_history(tmp_path: Path, cli_env: dict[str, str]) -> None:
    instance = Instance(tmp_path, cli_env)
    await instance.start()
    try:
        async with instance.http() as http:
            before = await fill(instance, http)
        await instance.kill()
        await instance.start()
        async with instance.http() as http:
            assert (await http.get(f"/history/{ID['done']}")).json() == before[ID["done"]]
            assert (await jobs_by_id(http))[ID["done"]] == before["job"]
            cut = await history_of(http, ID["running"])
            assert cut is not None and cut["status"]["status_str"] == "error"
            assert cut["status"]["messages"][-1][1]["exception_type"] == "ServerRestarted"
            assert (await jobs_by_id(http))[ID["running"]]["status"] == "failed"
            history = (await http.get("/history")).json()
            assert list(history)[:2] == [ID["done"], ID["running"]]
            assert history[ID["done"]] == before["history"][ID["done"]]
            await run_rest_in_order(instance, http)
            assert runs_of(instance.data, "g1") == 1  # the running one is reported, not run again
            new = await http.post("/prompt", json={"prompt": drain_gate_graph("g0", "new")})
            assert new.json()["number"] > history[ID["done"]]["prompt"][0]  # numbers count on
        assert await instance.stop() == 0
    finally:
        if instance.proc is not None and instance.proc.poll() is None:
            await instance.kill()
    assert "was running when the server stopped: reported failed" in instance.log.read_text()


async def test_sigterm_past_the_timeout_keeps_the_queued_prompts(tmp_path: Path, cli_env: dict[str, str]) -> None:
    instance = Instance(tmp_path, cli_env, "--shutdown-timeout", "0.5")
    await instance.start()
    try:
        async with instance.http() as http:
            before = await fill(instance, http)
        assert await instance.stop() == 0
        assert f"kept for the next start: {ID['p1']}, {ID['p2']}" in instance.log.read_text()
        await instance.start()
        async with instance.http() as http:
            assert (await http.get(f"/history/{ID['done']}")).json() == before[ID["done"]]
            cut = await history_of(http, ID["running"])
            assert cut is not None and cut["status"]["status_str"] == "error"  # interrupted, or reported failed
            await run_rest_in_order(instance, http)
            # The Restart button (the frontend extension POSTs /api/restart) keeps everything too.
            restarted = await http.post("/api/restart")
            assert restarted.status_code == 200, restarted.text
            assert list((await http.get("/history")).json()) == [ID["done"], ID["running"], ID["p1"], ID["p2"]]
        assert await instance.stop() == 0
        await instance.start()
        async with instance.http() as http:
            assert list((await http.get("/history")).json()) == [ID["done"], ID["running"], ID["p1"], ID["p2"]]
            assert set(await jobs_by_id(http)) == {ID["done"], ID["running"], ID["p1"], ID["p2"]}
    finally:
        if instance.proc is not None and instance.proc.poll() is None:
            await instance.kill()


async def test_history_bound_and_clear_hold_on_disk(tmp_path: Path, cli_env: dict[str, str]) -> None:
    instance = Instance(tmp_path, cli_env, "--history-max-items", "2")
    open_gate(instance.data, "g0")
    await instance.start()
    try:
        async with instance.http() as http:
            for prompt_id in (ID["a"], ID["b"], ID["c"]):
                await queue_prompt(http, prompt_id, "g0")
            await until(lambda: finished(http, ID["c"]), what="the prompts finished")
            assert list((await http.get("/history")).json()) == [ID["b"], ID["c"]]
            await instance.until_stored({}, [ID["b"], ID["c"]])
        await instance.kill()
        await instance.start()
        async with instance.http() as http:
            assert list((await http.get("/history")).json()) == [ID["b"], ID["c"]]
            assert (await http.post("/history", json={"delete": [ID["b"]]})).status_code == 200
        await instance.kill()
        await instance.start()
        async with instance.http() as http:
            assert list((await http.get("/history")).json()) == [ID["c"]]
            assert instance.stored() == ({}, [ID["c"]])
            assert (await http.post("/history", json={"clear": True})).status_code == 200
            await queue_prompt(http, ID["d"], "g1")
            await queue_prompt(http, ID["e"], "g1")
            await until(lambda: runs_of(instance.data, "g1") == 1, what="d running")
            assert (await http.post("/queue", json={"clear": True})).status_code == 200
            assert instance.stored() == ({ID["d"]: True}, [])  # the 200 came after the write
        await instance.kill()
        await instance.start()
        async with instance.http() as http:
            assert list((await http.get("/history")).json()) == [ID["d"]]  # cleared; then d was cut by the kill
            assert await pending_ids(http) == []
            assert [job["id"] for job in (await http.get("/api/jobs")).json()["jobs"]] == [ID["d"]]
    finally:
        if instance.proc is not None and instance.proc.poll() is None:
            await instance.kill()


def run_once(instance: Instance, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*instance.command(), *extra], env=instance.env, capture_output=True, text=True,
                          timeout=60)


async def test_a_state_file_that_is_not_ours_stops_the_start(tmp_path: Path, cli_env: dict[str, str]) -> None:
    instance = Instance(tmp_path, cli_env, "--state-dir", str(tmp_path / "state"))
    state_file = tmp_path / "state" / f"standard-{instance.port}.sqlite3"
    state_file.parent.mkdir()
    state_file.write_bytes(b"these are not the rows you are looking for\n" * 100)
    result = run_once(instance)
    assert result.returncode == 2, result.stderr
    said = own_output(result.stderr)
    assert said.startswith(f"comfyserve standard: state file {state_file} is not a comfyserve state file")
    assert state_file.read_bytes().startswith(b"these are not")  # left as it was

    state_file.unlink()
    with sqlite3.connect(state_file) as foreign:
        foreign.execute("CREATE TABLE notes (text TEXT)")
        foreign.execute("INSERT INTO notes VALUES ('mine')")
    foreign.close()
    result = run_once(instance)
    assert result.returncode == 2 and "a SQLite database of another program" in result.stderr, result.stderr


async def test_a_second_instance_on_one_state_file_refuses_to_start(tmp_path: Path, cli_env: dict[str, str]) -> None:
    instance = Instance(tmp_path, {**cli_env, "COMFYSERVE_STATE_DIR": str(tmp_path / "state")})
    await instance.start()
    try:
        async with instance.http():
            pass
        assert instance.proc is not None
        result = run_once(instance)
        assert result.returncode == 2, result.stderr
        assert "is in use by another instance" in result.stderr and f"pid {instance.proc.pid}" in result.stderr
        assert (tmp_path / "state" / f"standard-{instance.port}.sqlite3").is_file()
        assert instance.proc.poll() is None
    finally:
        await instance.stop()


class Gateway(Instance):
    """``comfyserve standard --comfyui-dir`` with the ComfyUI stand-in, which forgets everything when it stops."""

    def __init__(self, tmp_path: Path, env: dict[str, str], *extra: str) -> None:
        super().__init__(tmp_path, env, "--token", "T", "--comfyui-dir", str(SHIM_DIR), *extra)

    @asynccontextmanager
    async def http(self) -> AsyncIterator[httpx.AsyncClient]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", headers={"Authorization": "T"},
                                     trust_env=False, timeout=60) as http:
            await until(lambda: ready(http), what="the front and its ComfyUI ready")
            yield http


async def queue_ids(http: httpx.AsyncClient) -> list[str]:
    queue = (await http.get("/queue")).json()
    return [item[1] for item in queue["queue_running"] + queue["queue_pending"]]


async def check_after_restart(instance: Gateway, http: httpx.AsyncClient, before: dict[str, Any]) -> None:
    assert (await http.get(f"/history/{ID['done']}")).json() == before[ID["done"]]
    assert (await jobs_by_id(http))[ID["done"]] == before["job"]
    await until(lambda: history_of(http, ID["running"]), what="the cut prompt reported")
    cut = await history_of(http, ID["running"])
    assert cut is not None and cut["status"]["messages"][-1][1]["exception_type"] == "ServerRestarted"
    assert (await jobs_by_id(http))[ID["running"]]["status"] == "failed"
    await until(lambda: _equals(queue_ids(http), [ID["p1"], ID["p2"]]), what="p1 and p2 queued again in ComfyUI")
    await run_rest_in_order(instance, http)
    assert runs_of(instance.data, "g1") == 1
    assert list((await http.get("/history")).json())[:2] == [ID["done"], ID["running"]]


async def _equals(value: Any, expected: Any) -> bool:
    return await value == expected


async def journal_counts(http: httpx.AsyncClient) -> dict[str, float]:
    """The front's journal counters: epochs (times it lost sight of ComfyUI), requeued, trimmed."""
    metrics = parse((await http.get("/metrics")).text)
    return {name: value(metrics, f"comfyserve_backend_journal_{name}_total") for name in ("epochs", "requeued",
                                                                                          "trimmed")}


async def test_front_of_comfyui_keeps_queue_and_history_across_kill_9(tmp_path: Path, cli_env: dict[str, str]
                                                                      ) -> None:
    instance = Gateway(tmp_path, cli_env)
    await instance.start()
    try:
        async with instance.http() as http:
            before = await fill(instance, http)
            child = (await http.get("/readyz")).json()["pid"]
        await instance.kill()
        with contextlib.suppress(ProcessLookupError):  # (it would drain its running prompt for a while)
            os.kill(child, signal.SIGKILL)
        await until(lambda: not alive(child), what="ComfyUI gone with the front")
        await instance.start()
        async with instance.http() as http:
            await check_after_restart(instance, http, before)
        assert await instance.stop() == 0
    finally:
        if instance.proc is not None and instance.proc.poll() is None:
            await instance.kill()


async def test_front_keeps_what_a_crashed_comfyui_forgot(tmp_path: Path, cli_env: dict[str, str]) -> None:
    instance = Gateway(tmp_path, cli_env)
    await instance.start()
    try:
        async with instance.http() as http:
            before = await fill(instance, http)
            assert await journal_counts(http) == {"epochs": 0, "requeued": 0, "trimmed": 0}  # (its first start)
            child = (await http.get("/readyz")).json()["pid"]
            os.kill(child, signal.SIGKILL)  # the supervisor starts a new ComfyUI, which knows nothing
            await until(lambda: not alive(child), what="ComfyUI gone")
            await check_after_restart(instance, http, before)
            counts = await journal_counts(http)
            assert counts["epochs"] >= 1 and (counts["requeued"], counts["trimmed"]) == (2, 0)
        assert await instance.stop() == 0
    finally:
        if instance.proc is not None and instance.proc.poll() is None:
            await instance.kill()
    assert "ComfyUI forgot it (it restarted); queued it again" in instance.log.read_text()


async def test_front_history_survives_the_restart_button_and_clears_on_disk(tmp_path: Path, cli_env: dict[str, str]
                                                                            ) -> None:
    instance = Gateway(tmp_path, cli_env)
    open_gate(instance.data, "g0")
    await instance.start()
    try:
        async with instance.http() as http:
            await queue_prompt(http, ID["a"], "g0")  # relayed on the fast path, recorded from the bytes it relayed
            resp = await http.post("/prompt", json={"prompt": drain_gate_graph("g0", ID["b"]), "prompt_id": ID["b"]},
                                   headers={"Cookie": "theme=dark"})  # a cookie takes the slow path (aiohttp's)
            assert resp.status_code == 200, resp.text
            await until(lambda: finished(http, ID["a"], ID["b"]), what="a and b finished")
            before = (await http.get("/history")).json()
            child = (await http.get("/readyz")).json()["pid"]
            restarted = await http.post("/api/restart")  # what the Restart button of the frontend sends
            assert restarted.status_code == 200, restarted.text
            assert restarted.json()["pid"] != child
            assert (await http.get("/history")).json() == before
            assert (await http.get("/history", params={"max_items": 1})).json() == {ID["b"]: before[ID["b"]]}
            assert set(await jobs_by_id(http)) == {ID["a"], ID["b"]}
            assert (await http.post("/history", json={"delete": [ID["a"]]})).status_code == 200
            assert list((await http.get("/history")).json()) == [ID["b"]]
            assert instance.stored() == ({}, [ID["b"]])
        await instance.kill()
        await instance.start()
        async with instance.http() as http:
            assert (await http.get("/history")).json() == {ID["b"]: before[ID["b"]]}
            assert (await http.post("/history", json={"clear": True})).status_code == 200
        assert await instance.stop() == 0
        await instance.start()
        async with instance.http() as http:
            assert (await http.get("/history")).json() == {}
            assert (await http.get("/api/jobs")).json()["jobs"] == []
    finally:
        if instance.proc is not None and instance.proc.poll() is None:
            await instance.kill()


async def test_no_state_file_keeps_memory_only_as_api_and_cluster_children_do(tmp_path: Path,
                                                                             cli_env: dict[str, str]) -> None:
    instance = Instance(tmp_path, cli_env, "--no-state-file")
    open_gate(instance.data, "g0")
    await instance.start()
    try:
        async with instance.http() as http:
            await queue_prompt(http, ID["a"], "g0")
            await until(lambda: finished(http, ID["a"]), what="a finished")
        assert await instance.stop() == 0
        await instance.start()
        async with instance.http() as http:
            assert (await http.get("/history")).json() == {}
    finally:
        if instance.proc is not None and instance.proc.poll() is None:
            await instance.kill()
    assert not instance.state_file.exists()


async def test_rows_that_cannot_be_read_stop_the_start(tmp_path: Path, cli_env: dict[str, str]) -> None:
    from standard.state_store import StateStore

    instance = Instance(tmp_path, cli_env)
    store = StateStore.open(instance.state_file, history_max_items=10)
    store.add_prompt("queued", 1, {"prompt": {}, "extra_data": {}, "outputs_to_execute": [], "sensitive": {}})
    store.close()
    front = run_once(instance, "--comfyui-dir", str(SHIM_DIR))  # an engine's queued prompt is no front's
    assert front.returncode == 2, front.stderr
    assert "prompt queued was not stored by a front of ComfyUI" in front.stderr

    with contextlib.closing(sqlite3.connect(instance.state_file)) as db, db:
        db.execute("INSERT INTO history (prompt_id, entry) VALUES ('torn', '{\"prompt\": [1, ')")
    result = run_once(instance)
    assert result.returncode == 2, result.stderr
    assert own_output(result.stderr).startswith(f"comfyserve standard: state file {instance.state_file} is damaged")
