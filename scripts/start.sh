#!/usr/bin/env bash
# Installs comfyserve and starts the standard edition on embedded defaults:
# a local data dir (./data), the embedded CPU engine, loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/comfyserve standard --data-dir "${COMFYSERVE_DATA_DIR:-./data}" --port "${COMFYSERVE_PORT:-8000}" "$@"
