"""Time per save as the output folder fills: an empty folder vs 20,000 files already under the prefix.

    .venv/bin/python -m bench.saves [--files 20000] [--saves 300]

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


if __name__ == "__main__":
    main()
