"""``python -m tests.oss_server --port P --bucket B [--key-id ID --secret S]``: the test server as a process."""

from __future__ import annotations

import argparse
from pathlib import Path

from aiohttp import web

from .server import OssTestServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bucket", action="append", default=[])
    parser.add_argument("--key-id", default="test-key-id")
    parser.add_argument("--secret", default="test-key-secret")
    parser.add_argument("--store-dir", type=Path, default=None, help="keep objects on disk too; GETs use sendfile")
    args = parser.parse_args()
    server = OssTestServer({args.key_id: args.secret}, store_dir=args.store_dir)
    for bucket in args.bucket:
        server.create_bucket(bucket)
    web.run_app(server.app(), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
