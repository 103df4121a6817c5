#!/usr/bin/env bash
# Installs comfyserve into ./.venv on a fresh Debian machine (Python >= 3.11).
# With --test it also installs what the test suite needs: redis-server and
# Chromium from Debian's packages, and the test extras from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

apt_install() {
    local missing=()
    for pair in "$@"; do
        local bin=${pair%%:*} pkg=${pair#*:}
        command -v "$bin" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

if [ $want_test -eq 1 ]; then
    apt_install redis-server:redis-server chromium:chromium
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if [ $want_test -eq 1 ]; then
    .venv/bin/python -m pip install -q -e '.[test]'
    bash scripts/setup-sdk-env.sh
else
    .venv/bin/python -m pip install -q -e .
fi
