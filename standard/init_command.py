"""``comfyserve init --data-dir DIR``: create the data dir layout, keep what exists."""

from __future__ import annotations

import argparse

from .datadir import init_data_dir
from .options import add_option


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--data-dir", required=False, default=None, help="the data dir to create or complete")


def run(args: argparse.Namespace) -> int:
    if not args.data_dir:
        print("comfyserve init: --data-dir is required", flush=True)
        return 2
    data_dir = init_data_dir(args.data_dir)
    print(f"data dir ready: {data_dir.root}")
    return 0
