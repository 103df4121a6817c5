"""Reads API-edition results with the official eas-prediction SDK (run with .venv-sdk/bin/python).

    sdk_api_watch.py ENDPOINT QUEUE TOKEN JSON-ARGS    (args: {"count": n})

As the platform documents it: ``QueueClient(endpoint, 'svc/sink').watch(0, 5, auto_commit=False)``
then ``commit`` each. Prints one JSON object on its last stdout line.
"""

from __future__ import annotations

import json
import sys

from eas_prediction import QueueClient

if __name__ == "__main__":
    endpoint, queue, token = sys.argv[1:4]
    args = json.loads(sys.argv[4])
    sink = QueueClient(endpoint, queue)
    sink.set_token(token)
    sink.init()
    watcher = sink.watch(0, 5, auto_commit=False)
    got = []
    for x in watcher.run():
        got.append({"index": int(x.index), "tags": dict(x.tags), "data": json.loads(x.data.decode())})
        sink.commit(x.index)
        if len(got) == args["count"]:
            break
    watcher.close()
    print(json.dumps({"results": got, "attrs": sink.attributes()}), flush=True)
