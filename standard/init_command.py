"""``comfyserve init --data-dir DIR``: create the data dir layout, keep what exists."""

from __future__ import annotations

import argparse

from .datadir import usable_data_dir
from .errors import ConfigError
from .options import add_option
from .serving import Role


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--data-dir", default=None, help="the data dir to create or complete")


def start(args: argparse.Namespace) -> int:
    if not args.data_dir:
        raise ConfigError("--data-dir is required (or COMFYSERVE_DATA_DIR)")
    data_dir = usable_data_dir(args.data_dir)
    print(f"data dir ready: {data_dir.root}")
    return 0


ROLE = Role("init", "create a data dir's layout from the template", add_arguments, start)
