"""``python -m api_edition ...`` = ``comfyserve api ...``."""

import sys

from standard.cli import main

sys.exit(main(["api", *sys.argv[1:]]))
