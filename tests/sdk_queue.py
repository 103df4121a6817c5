"""Drives the official eas-prediction SDK (run with .venv-sdk/bin/python, never imported by pytest).

    sdk_queue.py ENDPOINT QUEUE TOKEN SCENARIO [JSON-ARGS]

Prints one JSON object on its last stdout line; the conformance tests assert on it.
"""

from __future__ import annotations

import json
import sys
import threading
import time

from eas_prediction import QueueClient
from eas_prediction.exception import PredictException


def client(endpoint: str, queue: str, token: str, uid: str | None = None) -> QueueClient:
    q = QueueClient(endpoint, queue)
    q.set_token(token)
    q.init(uid=uid)
    return q


def frame(x) -> dict:
    return {"index": int(x.index), "tags": dict(x.tags), "data": x.data.decode("utf-8", "replace")}


def basic(q: QueueClient, args: dict) -> dict:
    out: dict = {"attrs_before": q.attributes()}
    index, rid = q.put("abc", tags={"task_id": "t1"})
    out["put"] = [index, rid]
    out["by_rid"] = [frame(x) for x in q.get(request_id=rid, auto_delete=False)]
    out["by_index"] = [frame(x) for x in q.get(index=index, auto_delete=False)]
    out["search"] = q.search(index)
    out["commit"] = q.commit(int(index)).decode()
    out["after_commit"] = [frame(x) for x in q.get(index=index, timeout="0s", auto_delete=False)]
    i2, _ = q.put(b"\x00\xffbinary")
    out["binary"] = [x.data.hex() for x in q.get(index=i2, timeout="0s")]  # auto_delete=True by default
    out["after_auto_delete"] = q.attributes()["stream.length"]
    for n in range(3):
        q.put(str(n))
    last = int(q.attributes()["stream.lastEntry"])
    out["truncate"] = q.truncate(last + 1).decode()
    out["attrs_after"] = q.attributes()
    return out


def put(q: QueueClient, args: dict) -> dict:
    results = [q.put(item, tags=args.get("tags", {})) for item in args["items"]]
    return {"put": [[int(i), r] for i, r in results]}


def put_error(q: QueueClient, args: dict) -> dict:
    """A put that should be refused; reports how long the SDK's six attempts took."""
    started = time.monotonic()
    try:
        q.put(args.get("data", "x"))
    except PredictException as exc:
        return {"code": exc.code, "message": str(exc.message), "elapsed_s": time.monotonic() - started}
    return {"code": 200}


def report_pings() -> None:
    """Print ``PING`` each time the SDK's keep-alive thread pings the watch socket."""
    import websocket

    ping = websocket.WebSocket.ping

    def reporting(self: websocket.WebSocket, payload: str | bytes = "") -> None:
        ping(self, payload)
        print("PING", flush=True)

    websocket.WebSocket.ping = reporting


def watch(q: QueueClient, args: dict) -> dict:
    """Watch until ``count`` frames arrived; commits each unless auto_commit."""
    got = []
    auto = args.get("auto_commit", False)
    watcher = q.watch(args.get("index", 0), args.get("window", 5), auto_commit=auto, tags=args.get("tags"))
    signal_after = args.get("signal_after")  # print a line after N frames so the test can act
    if args.get("report_pings"):  # print a line per ping the SDK sends, so the test waits for them
        report_pings()
    for x in watcher.run():
        got.append(frame(x))
        if not auto and not args.get("no_commit"):
            q.commit(x.index)
        if signal_after is not None and len(got) == signal_after:
            print("SIGNAL", flush=True)
        if len(got) == args["count"]:
            break
    watcher.close()
    return {"frames": got, "attrs": q.attributes()}


def produce_consume(q: QueueClient, args: dict) -> dict:
    """The SDK suite's async test: one thread puts, one watches with auto_commit."""
    count = args["count"]
    sent, received = set(), set()

    def send() -> None:
        for _ in range(count):
            sent.add(q.put("[{}]")[1])

    def recv() -> None:
        watcher = q.watch(0, 5, auto_commit=True)
        for x in watcher.run():
            received.add(x.tags["requestId"])
            if len(received) == count:
                break
        watcher.close()

    threads = [threading.Thread(target=recv), threading.Thread(target=send)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"sent": len(sent), "same": sent == received}


SCENARIOS = {"basic": basic, "put": put, "put_error": put_error, "watch": watch, "produce_consume": produce_consume}

if __name__ == "__main__":
    endpoint, queue, token, scenario = sys.argv[1:5]
    args = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    q = client(endpoint, queue, token, args.get("uid"))
    print(json.dumps(SCENARIOS[scenario](q, args)), flush=True)
