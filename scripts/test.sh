#!/usr/bin/env bash
# The test command: installs everything the suite needs, then runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# Imports run one way (the contracts are in pyproject.toml): checked before any test runs.
.venv/bin/lint-imports --no-logo
# Lint and import order ([tool.ruff] in pyproject.toml).
.venv/bin/ruff check --no-cache .
# Types ([tool.mypy] in pyproject.toml: the four packages, strict on the core modules); ~7 s cold.
.venv/bin/mypy
set +e
# Python dev mode (asyncio debug checks, unclosed resources, aiohttp debug): the roles the suite starts
# run in it too (standard/private.py child_environment, the tests' cli_env).
# Two workers (pytest-xdist), each taking whole test files (a file's module fixtures start once); the
# workers are started without -X dev, so PYTHONDEVMODE puts them (and what they start) in it too.
PYTHONDEVMODE=1 .venv/bin/python -X dev -m pytest -q -p no:cacheprovider -n "${COMFYSERVE_TEST_WORKERS:-2}" \
    --dist loadfile "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    exit 1
fi
exit $rc
