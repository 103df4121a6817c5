"""The execution thread commits the state writes between two prompts itself (``StateStore.committing_here``
and ``commit_here``): no hand-over to the writer thread and back while the instance's GPU waits."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from standard.state_store import StateStore


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
