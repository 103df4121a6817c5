"""Model sync from a bucket, and what the model cache saves on the first task.

Starts the OSS-compatible test server (``python -m tests.oss_server``, objects
also on disk so it answers GETs with sendfile) as its own process on loopback
and fills a bucket with ``--models`` files of
``--model-mb`` MB each (random bytes) through the real ``oss2`` SDK. Then:

1. sync: the same files downloaded (a) by a plain sequential loop of
   ``oss2.Bucket.get_object_to_file`` and (b) by ``standard.storage`` as
   ``--prefetch-models`` does it (ranged parts in parallel, two files at a
   time, CRC64 checked), alternating, ``--rounds`` times each;
   prints MB/s and the ratio ours/plain (goal >= 2x);
2. first task: an instance (``python -m standard --data-dir oss://...``) whose
   plugin node (``tests/oss_server/plugins/read_model.py``) reads one model
   the way ComfyUI nodes do; time from start of the process to the first
   prompt's history with a cold cache, then with the warm cache of the first
   run, and the latency of that first ``POST /prompt`` -> history alone.

    .venv/bin/python -m bench.oss [--models 6] [--model-mb 64] [--rounds 2] [--task-model-mb 256]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Run as a script, bench/ is sys.path[0]; its modules (e.g. bench/queue.py) must not shadow the stdlib.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))

import oss2  # noqa: E402

from standard.ports import free_port  # noqa: E402
from standard.storage import OssLocation, StorageSettings  # noqa: E402
from standard.storage.client import OssClient  # noqa: E402
from standard.storage.storage import ObjectStorage  # noqa: E402

KEY_ID, SECRET, BUCKET = "bench-id", "bench-secret", "bench"
MB = 1024 * 1024


def wait_port(port: int, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(port)


def start_server(store_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    store_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "tests.oss_server", "--port", str(port), "--bucket", BUCKET,
                             "--key-id", KEY_ID, "--secret", SECRET, "--store-dir", str(store_dir)], cwd=REPO)
    wait_port(port, proc)
    return proc, f"http://127.0.0.1:{port}"


def settings_for(endpoint: str, cache_dir: Path) -> StorageSettings:
    return StorageSettings(location=OssLocation.parse(f"oss://{BUCKET}/data"), endpoint=endpoint,
                           access_key_id=KEY_ID, access_key_secret=SECRET, cache_dir=cache_dir,
                           cache_max_gb=100)


def seed(client: OssClient, tmp: Path, name: str, size: int) -> str:
    path = tmp / "seed.bin"
    with path.open("wb") as handle:
        remaining = size
        while remaining:
            chunk = os.urandom(min(remaining, 16 * MB))
            handle.write(chunk)
            remaining -= len(chunk)
    key = f"data/models/checkpoints/{name}"
    client.put_file(key, path, workers=4)
    path.unlink()
    return key


def plain_loop(endpoint: str, keys: list[str], dest: Path) -> float:
    bucket = oss2.Bucket(oss2.Auth(KEY_ID, SECRET), endpoint, BUCKET)
    started = time.perf_counter()
    for key in keys:
        bucket.get_object_to_file(key, str(dest / Path(key).name))
    return time.perf_counter() - started


def ours(endpoint: str, keys: list[str], dest: Path, **overrides: int) -> float:
    """What ``--prefetch-models`` does at start: list models/, fetch them all into the cache."""
    settings = replace(settings_for(endpoint, dest), prefetch_models=True, **overrides)
    storage = ObjectStorage(settings, settings.local_root)
    started = time.perf_counter()
    storage.prepare()
    elapsed_s = time.perf_counter() - started
    assert sorted(storage.cache.cached()) == sorted(k[len("data/models/"):] for k in keys)
    return elapsed_s


def first_task(endpoint: str, cache_dir: Path, model_name: str) -> tuple[float, float]:
    """(process start -> first history entry, POST /prompt -> history) in seconds."""
    port = free_port()
    env = {**os.environ, "OSS_ACCESS_KEY_ID": KEY_ID, "OSS_ACCESS_KEY_SECRET": SECRET}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "standard", "--data-dir", f"oss://{BUCKET}/data", "--oss-endpoint", endpoint,
         "--cache-dir", str(cache_dir), "--port", str(port)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        base = f"http://127.0.0.1:{port}"
        while True:
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.02)
        graph = {"1": {"class_type": "ReadModel", "inputs": {"ckpt_name": model_name}}}
        posted = time.perf_counter()
        request = urllib.request.Request(f"{base}/prompt", data=json.dumps({"prompt": graph}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            prompt_id = json.loads(resp.read())["prompt_id"]
        while True:
            with urllib.request.urlopen(f"{base}/history/{prompt_id}", timeout=30) as resp:
                entry = json.loads(resp.read()).get(prompt_id)
            if entry:
                assert entry["status"]["status_str"] == "success", entry["status"]
                break
            time.sleep(0.01)
        done = time.perf_counter()
        return done - started, done - posted
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=6)
    parser.add_argument("--model-mb", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--task-model-mb", type=int, default=256)
    parser.add_argument("--part-mb", type=int, default=None, help="override the download part size")
    parser.add_argument("--workers", type=int, default=None, help="override the parallel ranges per file")
    args = parser.parse_args()
    overrides = {}
    if args.part_mb:
        overrides["part_size_bytes"] = args.part_mb * MB
    if args.workers:
        overrides["download_workers"] = args.workers
    tmp = Path(tempfile.mkdtemp(prefix="bench-oss-"))
    server, endpoint = start_server(tmp / "bucket")
    try:
        client = OssClient(settings_for(endpoint, tmp), OssLocation.parse(f"oss://{BUCKET}/data"))
        keys = [seed(client, tmp, f"m{i}.safetensors", args.model_mb * MB) for i in range(args.models)]
        total_mb = args.models * args.model_mb
        print(f"sync of {args.models} x {args.model_mb} MB = {total_mb} MB from the test server on loopback")
        plain_s, ours_s = [], []
        for round_no in range(args.rounds):
            for name, times in (("plain", plain_s), ("ours", ours_s)):
                dest = tmp / f"{name}-{round_no}"
                dest.mkdir()
                times.append(plain_loop(endpoint, keys, dest) if name == "plain" else
                             ours(endpoint, keys, dest, **overrides))
                shutil.rmtree(dest)
        best_plain, best_ours = min(plain_s), min(ours_s)
        print(f"  plain oss2 get_object_to_file loop: {total_mb / best_plain:7.1f} MB/s  (best of {args.rounds}: "
              f"{best_plain:.2f}s)")
        print(f"  standard.storage prefetch (ranged): {total_mb / best_ours:7.1f} MB/s  (best of {args.rounds}: "
              f"{best_ours:.2f}s)")
        print(f"  ratio ours/plain: {best_plain / best_ours:.2f}x (goal >= 2x)")

        for key in keys:
            client.bucket.delete_object(key)
        big = seed(client, tmp, "task.safetensors", args.task_model_mb * MB)
        client.put_bytes("data/custom_nodes/read_model.py",
                         (REPO / "tests" / "oss_server" / "plugins" / "read_model.py").read_bytes())
        cache_dir = tmp / "instance-cache"
        cold_total, cold_task = first_task(endpoint, cache_dir, Path(big).name)
        warm_total, warm_task = first_task(endpoint, cache_dir, Path(big).name)
        print(f"first task reading a {args.task_model_mb} MB model (start -> history / POST /prompt -> history):")
        print(f"  cold cache: {cold_total:6.2f}s / {cold_task:6.2f}s")
        print(f"  warm cache: {warm_total:6.2f}s / {warm_task:6.2f}s")
        print(f"  ratio cold/warm of the first task: {cold_task / warm_task:.1f}x")
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
