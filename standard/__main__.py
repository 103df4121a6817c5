"""``python -m standard ...`` = ``comfyserve standard ...``."""

import sys

from .cli import main

sys.exit(main(["standard", *sys.argv[1:]]))
