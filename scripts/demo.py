"""Show a running instance working: wait until it is ready, run a small workflow, print the result.

    .venv/bin/python scripts/demo.py http://127.0.0.1:8000 [--token T]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from standard.client import InstanceClient  # noqa: E402

DEMO_GRAPH = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 256, "height": 128, "batch_size": 1, "color": 0x3D6FD8}},
    "2": {"class_type": "ImagePadForOutpaint",
          "inputs": {"image": ["1", 0], "left": 32, "top": 32, "right": 32, "bottom": 32, "feathering": 0}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "demo/comfyserve"}},
}


async def main(url: str, token: str | None, wait_s: float) -> int:
    async with InstanceClient(url, token) as client:
        deadline = time.monotonic() + wait_s
        while not await client.ready():
            if time.monotonic() > deadline:
                print(f"demo: {url} not ready after {wait_s:.0f} s", file=sys.stderr)
                return 1
            await asyncio.sleep(0.2)
        result = await client.run(DEMO_GRAPH)
        if not result.ok:
            print(f"demo: the workflow ended with {result.status}: {result.error}", file=sys.stderr)
            return 1
        for image in result.outputs["3"]["images"]:
            query = f"filename={image['filename']}&subfolder={image['subfolder']}&type={image['type']}"
            print(f"demo workflow {result.prompt_id} saved output/{image['subfolder']}/{image['filename']}")
            print(f"  view it: {url}/view?{query}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--token", default=None)
    parser.add_argument("--wait", type=float, default=60.0)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.url, args.token, args.wait)))
