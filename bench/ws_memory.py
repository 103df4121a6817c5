"""Memory of the standard edition under WebSocket churn: does RSS level off?

    .venv/bin/python -m bench.ws_memory [--rounds 20] [--connections 200] [--no-deflate]

Starts ``comfyserve standard`` (the embedded engine) on loopback, then runs
``--rounds`` rounds of ``--connections`` concurrent ``/ws`` connect, read the
``status`` event, close, with the ``websockets`` library, which offers
permessage-deflate as browsers do. Prints the server's RSS after each round,
the extension the server answered with, and the growth from round 5 to the
last (goal < 10%).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from standard.ports import free_port  # noqa: E402

TOKEN = "bench-ws-token-0123456789abcdef"


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def one(url: str, deflate: bool) -> str:
    compression = "deflate" if deflate else None
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {TOKEN}"},
                                  compression=compression, open_timeout=30) as ws:
        await asyncio.wait_for(ws.recv(), 30)  # the status event
        return ws.response.headers.get("Sec-WebSocket-Extensions", "") if ws.response else ""


async def churn(port: int, rounds: int, connections: int, deflate: bool, pid: int) -> list[float]:
    url = f"ws://127.0.0.1:{port}/ws"
    sizes = []
    for index in range(rounds):
        extensions = await asyncio.gather(*(one(f"{url}?clientId=c{index}-{n}", deflate)
                                            for n in range(connections)))
        sizes.append(rss_mb(pid))
        print(f"round {index + 1:2}: RSS {sizes[-1]:7.1f} MB  (server extension: {extensions[0] or 'none'})",
              flush=True)
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--no-deflate", action="store_true", help="the client does not offer permessage-deflate")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        token_file = Path(tmp) / "token"
        token_file.write_text(TOKEN)
        env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYSERVE_")}
        log = open(Path(tmp) / "server.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "standard", "--data-dir", str(Path(tmp) / "data"),
                                 "--port", str(port), "--token-file", str(token_file)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 60
            headers, ready = {"Authorization": f"Bearer {TOKEN}"}, f"http://127.0.0.1:{port}/readyz"
            while True:
                try:
                    if httpx.get(ready, headers=headers, trust_env=False).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("the server did not come up: " + (Path(tmp) / "server.log").read_text())
                time.sleep(0.2)
            print(f"start: RSS {rss_mb(proc.pid):.1f} MB")
            sizes = asyncio.run(churn(port, args.rounds, args.connections, not args.no_deflate, proc.pid))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
    base = sizes[min(4, len(sizes) - 1)]
    growth = (sizes[-1] - base) / base * 100
    print(f"growth after round 5: {base:.1f} -> {sizes[-1]:.1f} MB = {growth:+.1f}% (goal < 10%)")


if __name__ == "__main__":
    main()
