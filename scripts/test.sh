#!/usr/bin/env bash
# Install (if needed) and run the test suite. Extra arguments go to pytest (after ours: `-n 0` runs serially).
# pytest-xdist runs the modules on QFM_TEST_WORKERS processes (default 2, one per core of a small CI runner);
# tests/conftest.py keeps each module on one worker and hands out the slowest first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest -n "${QFM_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
