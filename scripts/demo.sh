#!/usr/bin/env bash
# The main job on the offline default: sets up .venv if needed, then finetunes the MiniLM
# teacher on movie_snippets and distils three students (ce, kd, codir). Extra args go to
# launchers/demo_finetune.py (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. scripts/env.sh
python launchers/demo_finetune.py "$@"
