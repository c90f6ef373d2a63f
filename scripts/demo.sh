#!/usr/bin/env bash
# The main job on the offline default: sets up .venv if needed, then runs CoDIR-Pre vs MLM-Pre
# (teacher MLM head -> stage-1 MLM -> stage-2 mlm / codir / codir with bank negatives -> CE finetuning
# on movie_snippets).
# Extra args go to launchers/demo_pretrain.py (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. scripts/env.sh
python launchers/demo_pretrain.py "$@"
