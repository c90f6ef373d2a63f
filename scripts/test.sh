#!/usr/bin/env bash
# The test suite: sets up .venv if needed, then runs pytest (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. scripts/env.sh
python -m pytest -q "$@"   # no arguments: pytest.ini's testpaths, i.e. tests/
