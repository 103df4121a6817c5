#!/usr/bin/env bash
# The official eas-prediction SDK pins protobuf<=3.20.3; it lives in its own
# environment (.venv-sdk) so the project's own protobuf stays current. Tests
# drive the SDK through that interpreter as a real, separate client process.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv-sdk/bin/python ]; then
    "$PY" -m venv .venv-sdk
fi
.venv-sdk/bin/python -m pip install -q --upgrade pip >/dev/null
.venv-sdk/bin/python -m pip install -q 'eas-prediction==0.36' httpx
