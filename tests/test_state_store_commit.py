"""The execution thread commits the state writes between two prompts itself (``StateStore.committing_here``
and ``commit_here``): no hand-over to the writer thread and back while the instance's GPU waits."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from standard import state_store
from standard.state_store import StateStore
from support.wait import until


async def test_commit_here_runs_on_the_caller_in_the_order_queued(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path / "state.sqlite3", history_max_items=10)
    try:
        store.load()
        await store.flush()
        threads: list[str] = []
        store._conn.set_trace_callback(lambda _sql: threads.append(threading.current_thread().name))
        with store.committing_here():
            store.add_prompt("a", 1, {"prompt": {}, "extra_data": {}, "outputs_to_execute": []})
            store.mark_running("a")  # after the insert, or it would mark nothing
            flushed = store.flush_future()  # a flush queued meanwhile (POST /prompt) is answered by the commit
            store.commit_here()
            assert flushed.done() and flushed.exception() is None
        store._conn.set_trace_callback(None)
        assert threads and set(threads) == {threading.current_thread().name}, threads
        state = store.load()
        assert [(p.prompt_id, p.running) for p in state.prompts] == [("a", True)]

        # what is queued when the block ends goes to the writer as usual; a close is the writer's to take
        with store.committing_here():
            store.finish("a", {"outputs": {}}, (1, 2))
        await asyncio.wait_for(store.flush(), 10)
        assert [h.prompt_id for h in store.load().history] == ["a"] and store.load().prompts == []
        with store.committing_here():
            store.mark_running("b")
            closing = threading.Thread(target=store.close)
            closing.start()
            store.commit_here()
        await asyncio.to_thread(closing.join, 10)
        assert not closing.is_alive()
    finally:
        store.close()


async def test_commits_between_prompts_never_checkpoint_the_wal(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite's automatic checkpoint (copying the WAL into the file, two fsyncs) ran inside whichever commit
    crossed 1000 WAL pages, often the execution thread's between two prompts: the writer thread does it."""
    checkpointing = threading.Event()
    go_on = threading.Event()
    checkpoint = getattr(StateStore, "_checkpoint", None)

    def held_checkpoint(store: StateStore) -> None:
        checkpointing.set()
        go_on.wait()
        if checkpoint is not None:
            checkpoint(store)

    monkeypatch.setattr(StateStore, "_checkpoint", held_checkpoint, raising=False)
    path = tmp_path / "state.sqlite3"
    store = StateStore.open(path, history_max_items=10_000)
    try:
        store.load()
        await store.flush()
        size = path.stat().st_size
        payload = {"prompt": {str(n): {"class_type": "X", "inputs": {"n": n}} for n in range(20)}, "extra_data": {}}
        entry = {"outputs": {}, "status": {"status_str": "success"}, "prompt": payload}
        for n in range(500):  # ~6 WAL pages each: well over SQLite's automatic checkpoint at 1000
            with store.committing_here():
                store.add_prompt(f"p{n}", n, payload)
                if n:
                    store.finish(f"p{n - 1}", entry, (1, 2))
                store.mark_running(f"p{n}")
                store.commit_here()
        assert path.stat().st_size == size  # nothing was copied into the file by the commits themselves
        await until(checkpointing.is_set)  # due, and held on the writer thread
        go_on.set()
        await until(lambda: path.stat().st_size > size)
    finally:
        go_on.set()
        store.close()
    reopened = StateStore.open(path, history_max_items=10_000)
    try:
        state = reopened.load()
        assert [p.prompt_id for p in state.prompts] == ["p499"] and len(state.history) == 499
    finally:
        reopened.close()


async def test_an_entry_that_is_not_json_fails_its_commit_not_the_writer(tmp_path: Path) -> None:
    """Entries are encoded without json's cycle check (a third of its time between two prompts): a cycle
    fails that batch (flush raises; nothing of it recorded), and the store goes on writing."""
    store = StateStore.open(tmp_path / "state.sqlite3", history_max_items=10)
    try:
        store.load()
        cyclic: dict[str, object] = {"outputs": {}}
        cyclic["self"] = cyclic
        await store.flush()
        with store.committing_here():
            store.finish("b", {"outputs": {}}, (1, 2))
            store.finish("c", cyclic, (1, 2))
            flushed = store.flush_future()  # a flush waiting on that batch (POST /history delete) hears of it
            with pytest.raises(RecursionError):
                store.commit_here()
        assert isinstance(flushed.exception(0), RecursionError)
        store.finish("d", {"outputs": {}}, (1, 2))
        await asyncio.wait_for(store.flush(), 10)
        assert [h.prompt_id for h in store.load().history] == ["d"]
    finally:
        store.close()


async def test_commits_that_never_pause_still_start_the_wal_over(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite starts the WAL over only at a commit that finds it all copied: a checkpoint on another thread
    while trivial prompts commit back to back never gets there alone, and the WAL file would grow for as long
    as they come. Past WAL_RESTART_FRAMES the writer copies the last frames with commits held."""
    monkeypatch.setattr(state_store, "CHECKPOINT_EVERY_COMMITS", 5)
    monkeypatch.setattr(state_store, "WAL_RESTART_FRAMES", 60)
    path = tmp_path / "state.sqlite3"
    wal = path.with_name(path.name + "-wal")

    def restarts() -> int:  # the WAL header's checkpoint sequence number: one more at each start over
        with wal.open("rb") as f:
            return int.from_bytes(f.read(16)[12:16], "big")

    store = StateStore.open(path, history_max_items=10_000)
    try:
        store.load()
        await store.flush()
        first = restarts()
        payload = {"prompt": {}, "extra_data": {}}
        n = 0
        while restarts() == first:  # back to back, as trivial prompts do
            assert n < 20_000, f"the WAL never started over: {wal.stat().st_size} bytes"
            with store.committing_here():
                store.add_prompt(f"p{n}", n, payload)
                if n:
                    store.finish(f"p{n - 1}", {"outputs": {}}, (1, 2))
                store.mark_running(f"p{n}")
                store.commit_here()
            n += 1
    finally:
        store.close()
