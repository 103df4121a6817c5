"""``python -m cluster_proxy``: same as ``comfyserve cluster``."""

import sys

from standard.cli import main

if __name__ == "__main__":
    sys.exit(main(["cluster", *sys.argv[1:]]))
