#!/usr/bin/env bash
# Installs comfyserve and starts the standard edition on embedded defaults:
# a local data dir (./data), the embedded CPU engine, loopback only. Once it is
# ready, a small workflow runs through it to show it working; the server then
# keeps serving (web UI at http://127.0.0.1:8000/) until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
port="${COMFYSERVE_PORT:-8000}"
.venv/bin/comfyserve standard --data-dir "${COMFYSERVE_DATA_DIR:-./data}" --port "$port" "$@" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' INT TERM EXIT
token_args=()
[ -n "${COMFYSERVE_TOKEN:-}" ] && token_args=(--token "$COMFYSERVE_TOKEN")
.venv/bin/python scripts/demo.py "http://127.0.0.1:$port" "${token_args[@]}" || true
echo "comfyserve standard edition serving on http://127.0.0.1:$port/ (Ctrl-C stops it)"
wait $server
