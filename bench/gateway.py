"""What the ``--backend-url`` front costs: /prompt + /history round trips, direct vs through it.

Starts two real processes on loopback — an instance (``python -m standard``,
the backend) and a front (``python -m standard --backend-url ... --token T``)
— then, in one run:

* latency: sequential round trips, direct and proxied interleaved, p50/p90 of
  each and the p50 the front adds (goal < 1 ms);
* throughput: round trips/s with ``--concurrency`` clients for
  ``--duration-s`` each, direct and proxied in alternating rounds, and the
  ratio proxied/direct (goal >= 0.90).

A round trip is ``POST /prompt`` (EmptyImage 64x64 -> SaveImage; cached
after the first, as ComfyUI caches) + ``GET /history/{id}``. Every round
starts on an empty queue. On a machine shared with other work, compare the
load averages printed at the end: the front is one more process wanting a
core, so a saturated machine charges it for the CPU it takes.

    .venv/bin/python -m bench.gateway [--requests 600] [--concurrency 8] [--duration-s 1.5] [--rounds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.support import pct
from standard.ports import free_port

TOKEN = "bench-token"
GRAPH = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bench"}},
}


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYSERVE_")}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "standard", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env)


class Conn:
    """One keep-alive HTTP/1.1 connection with hand-rolled framing.

    The load generator must cost little CPU: on a small machine it shares the
    cores with the instance and the front, and a heavy client would measure
    itself instead of the gateway.
    """

    def __init__(self, port: int, token: str | None) -> None:
        self.port = port
        self.auth = f"Authorization: {token}\r\n".encode() if token else b""
        self.prompt_body = json.dumps({"prompt": GRAPH}).encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> Conn:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Content-Length: {len(body)}\r\n").encode()
        extra = b"Content-Type: application/json\r\n" if body else b""
        self.writer.write(head + extra + self.auth + b"\r\n" + body)
        status_and_headers = await self.reader.readuntil(b"\r\n\r\n")
        lines = status_and_headers.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    async def round_trip(self) -> float:
        """POST /prompt, then GET /history/{id} (``{}`` or the entry, whichever it is by then)."""
        started = time.perf_counter()
        status, body = await self.request("POST", "/prompt", self.prompt_body)
        if status != 200:
            raise SystemExit(f"POST /prompt: {status} {body[:300]!r}")
        prompt_id = json.loads(body)["prompt_id"]
        status, body = await self.request("GET", f"/history/{prompt_id}")
        if status != 200:
            raise SystemExit(f"GET /history: {status}")
        return time.perf_counter() - started


async def drain(port: int) -> None:
    """Wait until the instance's queue is empty, so no round inherits another's backlog."""
    conn = await Conn(port, None).open()
    try:
        while json.loads((await conn.request("GET", "/prompt"))[1])["exec_info"]["queue_remaining"]:
            await asyncio.sleep(0.02)
    finally:
        conn.close()


async def wait_ready(port: int, token: str | None, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            conn = await Conn(port, token).open()
            try:
                if (await conn.request("GET", "/readyz"))[0] == 200:
                    return
            finally:
                conn.close()
        except OSError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"127.0.0.1:{port} not ready after {timeout_s}s")


async def throughput(port: int, token: str | None, concurrency: int, duration_s: float) -> float:
    done = 0
    stop_at = time.perf_counter() + duration_s
    conns = [await Conn(port, token).open() for _ in range(concurrency)]

    async def worker(conn: Conn) -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await conn.round_trip()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(conn) for conn in conns))
    elapsed = time.perf_counter() - started
    for conn in conns:
        conn.close()
    return done / elapsed


async def bench(direct_port: int, front_port: int, requests: int, concurrency: int,
                duration_s: float, rounds: int) -> dict[str, float]:
    await wait_ready(direct_port, None)
    await wait_ready(front_port, TOKEN)
    direct, front = await Conn(direct_port, None).open(), await Conn(front_port, TOKEN).open()
    for _ in range(20):  # warm up both paths (the first prompt executes, the rest hit the cache)
        await direct.round_trip()
        await front.round_trip()
    lat_direct: list[float] = []
    lat_front: list[float] = []
    for i in range(requests):  # interleaved, so drift hits both paths alike
        if i % 50 == 0:
            await drain(direct_port)
        pair = (front, direct) if i % 2 else (direct, front)
        for conn in pair:
            (lat_front if conn is front else lat_direct).append(await conn.round_trip())
    direct.close()
    front.close()
    rates_direct: list[float] = []
    rates_front: list[float] = []
    for i in range(rounds):  # short alternating rounds: a noisy neighbour hits both paths alike
        order = ((front_port, TOKEN), (direct_port, None)) if i % 2 else ((direct_port, None), (front_port, TOKEN))
        for port, token in order:
            await drain(direct_port)
            rate = await throughput(port, token, concurrency, duration_s)
            (rates_front if token else rates_direct).append(rate)
    p50_direct, p50_front = statistics.median(lat_direct), statistics.median(lat_front)
    rate_direct, rate_front = statistics.median(rates_direct), statistics.median(rates_front)
    return {
        "latency_p50_direct_ms": p50_direct * 1000, "latency_p50_front_ms": p50_front * 1000,
        "latency_p90_direct_ms": pct(lat_direct, 0.9) * 1000, "latency_p90_front_ms": pct(lat_front, 0.9) * 1000,
        "added_p50_ms": (p50_front - p50_direct) * 1000,
        "throughput_direct_rps": rate_direct, "throughput_front_rps": rate_front,
        "throughput_ratio": rate_front / rate_direct,
        "throughput_ratio_of_sums": sum(rates_front) / sum(rates_direct),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600, help="sequential round trips per path")
    parser.add_argument("--concurrency", type=int, default=8, help="clients in the throughput rounds")
    parser.add_argument("--duration-s", type=float, default=1.5, help="length of one throughput round")
    parser.add_argument("--rounds", type=int, default=8, help="throughput rounds per path (alternating)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="comfyserve-bench-") as tmp:
        root = Path(tmp)
        backend_port, front_port = free_port(), free_port()
        backend = start(["--port", str(backend_port), "--data-dir", str(root / "backend"),
                         "--history-max-items", "1000"], root / "backend.log")
        front = start(["--port", str(front_port), "--data-dir", str(root / "front"), "--token", TOKEN,
                       "--backend-url", f"http://127.0.0.1:{backend_port}"], root / "front.log")
        try:
            result = asyncio.run(bench(backend_port, front_port, args.requests, args.concurrency,
                                       args.duration_s, args.rounds))
        finally:
            for proc in (front, backend):
                proc.send_signal(signal.SIGINT)
            for proc in (front, backend):
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
    load_after = os.getloadavg()[0]
    print(json.dumps({k: round(v, 3) for k, v in result.items()}, indent=2))
    added_ok = result["added_p50_ms"] < 1.0
    ratio_ok = result["throughput_ratio"] >= 0.90
    print(f"gateway: added latency p50 {result['added_p50_ms']:.3f} ms "
          f"(goal < 1 ms: {'ok' if added_ok else 'MISSED'}); "
          f"throughput {result['throughput_front_rps']:.0f}/{result['throughput_direct_rps']:.0f} rps = "
          f"{result['throughput_ratio']:.1%} of direct (goal >= 90%: {'ok' if ratio_ok else 'MISSED'}); "
          f"{os.cpu_count()} CPUs, load average {load_before:.1f} before / {load_after:.1f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
