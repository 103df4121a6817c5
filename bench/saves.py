"""Time per save as the output folder fills: an empty folder vs 20,000 files already under the prefix.

    .venv/bin/python -m bench.saves [--files 20000] [--saves 300]

Cluster edition too: the proxy moving each task's staged image into the user's
folder (``OutputCollector``), which must find the next free counter there.

Runs the embedded engine in process (validate + execute a tiny EmptyImage ->
SaveImage graph, no HTTP) into a fresh data dir, first with nothing under the
prefix, then with ``--files`` files ``bench_NNNNN_.png`` already there (made
before the engine starts, so its first save lists them once). Prints the
median time per prompt of each and their ratio (goal: within 20%), and, for
comparison, what one ComfyUI-style listing of the full folder costs (what
every save paid before the counter was remembered).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.engine import tiny_graph  # noqa: E402


def per_prompt_ms(prefilled: int, saves: int) -> tuple[float, float]:
    """(median ms per prompt, ms of one full listing of the folder) with ``prefilled`` files under the prefix."""
    from standard.datadir import init_data_dir
    from standard.engine import NodeRegistry, PromptExecutor, validate_prompt
    from standard.engine.compat import folder_paths

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = init_data_dir(tmp)
        workdirs = data_dir.workdirs()
        for index in range(1, prefilled + 1):
            (workdirs.output / f"bench_{index:05}_.png").touch()
        registry = NodeRegistry(data_dir, workdirs)
        registry.load()
        executor = PromptExecutor(registry, lambda *a: None)
        times = []
        for index in range(saves):
            graph = tiny_graph(index)
            started = time.perf_counter()
            valid, _, outputs, _ = validate_prompt(registry, str(index), graph, None)
            assert valid
            executor.execute(graph, str(index), {}, outputs)
            times.append(time.perf_counter() - started)
            assert executor.success
        assert (workdirs.output / f"bench_{prefilled + saves:05}_.png").is_file()
        started = time.perf_counter()
        folder_paths.get_save_image_path("bench", str(workdirs.output))
        listing = time.perf_counter() - started
        return statistics.median(times[1:]) * 1000, listing * 1000


def cluster_move_ms(prefilled: int, moves: int) -> float:
    """Median ms for the proxy to bring one task's ``bench_00001_.png`` into a user folder of ``prefilled``."""
    from cluster_proxy.graph import STAGE
    from cluster_proxy.outputs import OutputCollector
    from standard.datadir import init_data_dir

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = init_data_dir(tmp)
        workdirs = data_dir.user_workdirs("ann")
        workdirs.create()
        for index in range(1, prefilled + 1):
            (workdirs.output / f"bench_{index:05}_.png").touch()
        times = []
        for index in range(moves):
            key = f"task{index}-1"
            stage = data_dir.root / "output" / STAGE / key
            stage.mkdir(parents=True)
            (stage / "bench_00001_.png").write_bytes(b"png")
            item = {"filename": "bench_00001_.png", "subfolder": f"{STAGE}/{key}", "type": "output"}
            started = time.perf_counter()
            moved = OutputCollector(key, data_dir, workdirs).collect({"9": {"images": [item]}})
            times.append(time.perf_counter() - started)
            assert moved["9"]["images"][0]["filename"] == f"bench_{prefilled + index + 1:05}_.png"
        return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--saves", type=int, default=300)
    args = parser.parse_args()
    per_prompt_ms(0, 30)  # warm-up: imports, first PNG encode
    empty, _ = per_prompt_ms(0, args.saves)
    full, listing = per_prompt_ms(args.files, args.saves)
    print(f"empty folder:            {empty:.2f} ms per prompt (median of {args.saves})")
    print(f"{args.files} files under prefix: {full:.2f} ms per prompt")
    print(f"ratio full/empty:        {full / empty:.2f} (goal <= 1.20)")
    print(f"one full listing (ComfyUI's way, paid on every save before): {listing:.2f} ms")
    moves = min(args.saves, 200)
    empty_move, full_move = cluster_move_ms(0, moves), cluster_move_ms(args.files, moves)
    print(f"cluster, output into the user's folder: empty {empty_move:.3f} ms, {args.files} files "
          f"{full_move:.3f} ms (median of {moves}; ratio {full_move / empty_move:.2f})")


if __name__ == "__main__":
    main()
