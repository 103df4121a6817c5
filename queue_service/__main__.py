"""``python -m queue_service ...`` = ``comfyserve queue ...``."""

import sys

from standard.cli import main

sys.exit(main(["queue", *sys.argv[1:]]))
