# Sourced by the scripts: activate .venv and set the environment for CPU DeepSpeed runs.
# shellcheck disable=SC1091
. "$(dirname "${BASH_SOURCE[0]}")/../.venv/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# DeepSpeed compiles its shared-memory op once per CPU type; keep it in the repo's cache.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.cache/torch_extensions}"
if ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=cpu
fi
