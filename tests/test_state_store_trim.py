"""The state file's history bound: the newest ``history_max_items`` entries are kept, at a cost per finished
prompt that does not grow with the history (the worker waits for the writer before each prompt)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from standard.state_store import StateStore

ENTRY = {"outputs": {}, "status": {"status_str": "success"}}


@contextmanager
def opened(path: Path, max_items: int) -> Iterator[StateStore]:
    store = StateStore.open(path, history_max_items=max_items)
    try:
        store.load()
        yield store
    finally:
        store.close()


def history_ids(path: Path, max_items: int = 1_000_000) -> list[str]:
    with opened(path, max_items) as store:
        return [entry.prompt_id for entry in store.load().history]


async def test_history_keeps_the_newest_through_finishes_deletes_and_restarts(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    with opened(path, 3) as store:
        for prompt_id in "abcde":
            store.finish(prompt_id, ENTRY, (1, 2))
        await store.flush()
        assert [e.prompt_id for e in store.load().history] == ["c", "d", "e"]
        store.delete_history(["d"])  # a gap: c and e stay, two more fit before c goes
        store.finish("f", ENTRY, None)
        await store.flush()
        assert [e.prompt_id for e in store.load().history] == ["c", "e", "f"]
        store.finish("c", ENTRY, None)  # finished again: the newest now, not one more
        store.finish("g", ENTRY, None)
        await store.flush()
        assert [e.prompt_id for e in store.load().history] == ["f", "c", "g"]
        store.delete_history()
        store.finish("h", ENTRY, None)
        await store.flush()
    assert history_ids(path) == ["h"]
    with opened(path, 10) as store:
        for prompt_id in "ijklm":
            store.finish(prompt_id, ENTRY, None)
    with opened(path, 2) as store:  # a smaller bound cuts what an earlier start wrote
        store.finish("n", ENTRY, None)
        await store.flush()
        assert [e.prompt_id for e in store.load().history] == ["m", "n"]
    assert history_ids(path) == ["m", "n"]


async def steps_of_one_finish(path: Path, history_rows: int) -> int:
    """SQLite VM steps (in tens) the writer spends on one finished prompt with a full history."""
    with opened(path, history_rows) as store:
        for index in range(history_rows):
            store.finish(f"old-{index}", ENTRY, None)
        await store.flush()
        steps = 0

        def count() -> int:
            nonlocal steps
            steps += 1
            return 0

        store._conn.set_progress_handler(count, 10)  # the writer is idle between flushes
        store.finish("new", ENTRY, (1, 2))
        await store.flush()
        store._conn.set_progress_handler(None, 10)
        assert len(store.load().history) == history_rows
        return steps


async def test_a_finish_costs_the_same_with_a_long_history(tmp_path: Path) -> None:
    short = await steps_of_one_finish(tmp_path / "short.sqlite3", 20)
    long = await steps_of_one_finish(tmp_path / "long.sqlite3", 3000)
    assert long <= 2 * short, (short, long)  # a scan of the table made it ~100x
