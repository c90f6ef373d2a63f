"""Throughput of the codir-ds training step, pre-training (--task pretrain) or finetuning (--task finetune): N optimizer
steps of mlm / kd / codir through the recipes' own code.

    python bench/throughput.py --teacher_layers 12 --teacher_hidden 768 --teacher_heads 12 \
        --student_layers 6 --student_hidden 768 --student_heads 12 --seq_len 128 \
        --micro_batch 32 --precision bf16 --steps 20 [--output bench/results/x.json]
    deepspeed --num_gpus 8 bench/throughput.py ...      (rank 0 reports)

What is timed is the code users run: one optimizer step is ``recipe.train_step(batches)`` of
``codir_ds.recipes.pretrain.PretrainRecipe`` (``--task pretrain``) or
``codir_ds.recipes.finetune.FinetuneRecipe`` (``--task finetune``), with the micro-batches drawn
from the recipe's own sampler as ``Recipe.train`` draws them, and the loop's ``progress.step``
and ``check_skipped`` after it (not ``after_step``: logging, evaluation, checkpoints). The
bench subclasses the recipes (``bench_recipe_class``) only where they read files: ``check_inputs``
gives a synthetic corpus / task instead of loading one, and ``setup_models`` runs the recipe's own
``setup_models`` with its two model loaders replaced by random-weight BERT models of the requested
sizes (``build_student`` and ``load_mlm_teacher`` / ``load_teacher``); the trained module, the
DeepSpeed engine, optimizer and schedule, sampler, collator, teacher runner, memory bank and
negatives are the recipe's. Pre-training: blocks of random ordinary tokens between [CLS] and
[SEP]; finetuning: texts of ``seq_len - 2`` random whole-word vocabulary entries (the recipe's
``ClassificationCollator`` tokenizes them to exactly ``seq_len`` tokens) with random labels.

The per-section breakdown is the wall time of the recipe's named step sections
(``codir_ds.engine.sections``: ``teacher_forward``, ``student_forward_backward``, ``optimizer_step``
and the components' own, e.g. the bank's ``crd_and_bank``), timed by installing a timer for the
step, never by a copy of the step. ``--no_breakdown`` installs no timer; only pass-through wrappers
that add no device work remain (token count, last loss, bank rows gathered; ``--global_negatives``
also wraps the bank component's ``negative_ids`` to fill the candidates).

The plain references ``ref_kd`` / ``ref_codir`` (Hugging Face models, a plain PyTorch loop, no
codir-ds code in the step) run side by side for ratios. With tiny models their difference is the
framework's per-micro-step overhead (``overhead_ms_per_micro_step`` in the report: codir-ds's
median micro-step time minus the reference's), measurable on a CPU:

    python bench/throughput.py --task finetune --teacher_layers 1 --teacher_hidden 16 --teacher_heads 2 \
        --student_layers 1 --student_hidden 16 --student_heads 2 --seq_len 16 --micro_batch 2 \
        --grad_accum 4 --num_examples 256 --num_negatives 15 --precision fp32 --steps 20 --warmup 3 \
        --objectives kd,ref_kd,codir,ref_codir --no_breakdown

(finetuning: in pre-training the reference computes full-vocabulary logits at every position, so
the difference there is not framework overhead alone; drop ``--no_breakdown`` to see where it goes).

The paper's global batch on one GPU is reached by accumulation: ``--global_batch 8192`` sets
``grad_accum`` = 8192 / (micro x world) for each micro-batch. ``--micro_batch``, ``--zero_stage``
and ``--bucket_size`` take comma-separated lists: every combination is a point, run one after
another in one process (``run_sweep``); a point that runs out of memory is recorded (``status:
oom``) and the larger micro-batches of its group skipped. ``--peak_json`` takes MFU's peak from
``bench/matmul_peak.py``'s measurement:

    python bench/throughput.py --seq_len 128 --precision fp16 --global_batch 8192 \
        --micro_batch 128,256,512,1024 --zero_stage 2 --objectives kd,codir --no_breakdown \
        --peak_json peak.json

Prints one JSON object on stdout (see bench/README.md).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import gc
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.cli import int_list  # noqa: E402

OBJECTIVE_NAMES = ("mlm", "kd", "codir")
# The plain reference of kd / codir (bench_reference): Hugging Face models, a straightforward loop.
REFERENCE_NAMES = ("ref_kd", "ref_codir")
PROJECTION_DIM = 128   # m: bank row / projection size (CoDIR)
BANK_MOMENTUM = 0.5    # beta of Eq. 5
BREAKDOWN_KEYS = ("teacher_forward", "student_forward_backward", "crd_and_bank", "optimizer_step", "other")
# What each section times: the recipes' named step sections (codir_ds.engine.sections), timed by Sections.
BREAKDOWN_HOOKS = {
    "teacher_forward": "section teacher_forward: the teacher step (TeacherStep: the frozen teacher's forward)",
    "student_forward_backward": "section student_forward_backward: the engine's forward, the method's loss and "
                                "the engine's backward",
    "crd_and_bank": "section crd_and_bank (codir: the memory bank component): the step's negatives (pretrain: "
                    "the global batch's ids and bank.gather; finetune: per-class or per-anchor rows), each "
                    "micro-batch's negatives, and the momentum updates after the optimizer step",
    "optimizer_step": "section optimizer_step: engine.step() calls",
    "other": "the rest of the step: sampler, synthetic data, collation (finetune: tokenization) and masking, "
             "host-to-device copies, loss inputs, monitor, check_skipped",
}
PRETRAIN_SEQ_RANGE = (8, 512)  # corpus.block_size's range

# Dense bf16/fp16 tensor-core peak (TFLOP/s) by device name, most specific first; fp32 runs use
# the plain FP32 (non-TF32) peak, as PyTorch does not use TF32 for fp32 matmuls by default.
CUDA_PEAK_TFLOPS = (
    ("H200", {"half": 989.0, "fp32": 67.0}),
    ("H100 PCIe", {"half": 756.0, "fp32": 51.0}),
    ("H100", {"half": 989.0, "fp32": 67.0}),
    ("A100", {"half": 312.0, "fp32": 19.5}),
)


class BenchError(Exception):
    """Bad arguments: printed as one ``error: ...`` line, exit status 2."""


def _add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """The teacher's and student's sizes, the vocabulary and the sequence length."""
    ap.add_argument("--teacher_layers", type=int, default=12)
    ap.add_argument("--teacher_hidden", type=int, default=768)
    ap.add_argument("--teacher_heads", type=int, default=12)
    ap.add_argument("--student_layers", type=int, default=6)
    ap.add_argument("--student_hidden", type=int, default=768)
    ap.add_argument("--student_heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=30522, help="vocabulary size of both models (>= the tokenizer's)")
    ap.add_argument("--seq_len", type=int, default=128, help="tokens per block, [CLS] and [SEP] included")


def _add_training_arguments(ap: argparse.ArgumentParser) -> None:
    """Batch, precision, DeepSpeed JSON, the objectives and the task."""
    ap.add_argument("--micro_batch", type=int_list, default=[32],
                    help="sequences per micro-batch per rank; comma-separated values (64,128,...) are a sweep in "
                         "one process, an out-of-memory point recorded and the larger ones skipped")
    ap.add_argument("--grad_accum", type=int, default=None,
                    help="micro-batches per optimizer step (default: 1, or global_batch / (micro_batch x world))")
    ap.add_argument("--global_batch", type=int, default=None,
                    help="sequences per optimizer step, all ranks: sets grad_accum for each micro-batch (e.g. the "
                         "paper's 8192; default: micro_batch x grad_accum x world)")
    ap.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="bf16")
    ap.add_argument("--deepspeed_config", default=os.path.join(REPO, "ds_configs", "zero2.json"),
                    help="DeepSpeed JSON (batch sizes and precision are overridden)")
    ap.add_argument("--zero_stage", type=int_list, default=None,
                    help="ZeRO stage(s) 0-3 set in the DeepSpeed JSON; comma-separated values are swept in one "
                         "process (default: the JSON's stage)")
    ap.add_argument("--bucket_size", type=int_list, default=None,
                    help="ZeRO reduce_bucket_size and allgather_bucket_size (elements); comma-separated values are "
                         "swept in one process (default: the JSON's)")
    ap.add_argument("--compile", action="store_true",
                    help="training.compile=true for the codir-ds objectives (the plain references stay eager)")
    ap.add_argument("--objectives", default=",".join(OBJECTIVE_NAMES),
                    help="comma-separated subset of mlm,kd,codir and the plain references ref_kd,ref_codir "
                         "(1 process; the report then has their throughput ratios)")
    ap.add_argument("--task", choices=("pretrain", "finetune"), default="pretrain",
                    help="pretrain: masked-LM blocks, in-batch negatives; finetune: sequence classification, "
                         "K negatives per class from the bank")
    ap.add_argument("--num_classes", type=int, default=2, help="classes of the synthetic finetuning task")


def _add_measurement_arguments(ap: argparse.ArgumentParser) -> None:
    """How the steps are scheduled, counted and timed, and where the report goes."""
    ap.add_argument("--schedule", choices=("interleaved", "sequential"), default="interleaved",
                    help="interleaved: every objective lives in the process and their steps alternate (a slow "
                         "spell of the machine costs all alike, but at base size on a CPU it slowed codir-ds's "
                         "ZeRO-2 step against the plain reference: 0.86-0.88, level when run alone); sequential: "
                         "one objective after another. For codir-ds vs the reference, run each objective alone "
                         "(--objectives kd, then ref_kd)")
    ap.add_argument("--global_negatives", type=int, default=0,
                    help="pretrain codir: fill each step's candidates up to this many ids (capped at "
                         "num_negatives + 1), as if the global batch were this large (e.g. the paper's 8192)")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per objective")
    ap.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before the timed ones")
    ap.add_argument("--num_examples", type=int, default=100000, help="memory bank rows / sampler ids")
    ap.add_argument("--num_negatives", type=int, default=None,
                    help="method.num_negatives (codir): default 8191 (pretrain), 1000 (finetune)")
    ap.add_argument("--peak_tflops", type=float, default=None, help="peak TFLOP/s per device for MFU (else detected)")
    ap.add_argument("--peak_json", default=None,
                    help="bench/matmul_peak.py's report: MFU against its measured peak for --precision "
                         "(default: --peak_tflops, else the device table or a measured matmul)")
    ap.add_argument("--no_breakdown", action="store_true",
                    help="no per-section timing (no CUDA syncs inside a step); breakdown fields are null")
    ap.add_argument("--sync_debug", action="store_true",
                    help="CUDA: count synchronizing calls in the timed steps (cuda_syncs_per_step); use with "
                         "--no_breakdown, whose section timing syncs on purpose")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--output", default=None, help="also write the JSON here (rank 0)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher


def _check_objectives(args: argparse.Namespace) -> None:
    """``--objectives`` as a list (duplicates dropped), the task's default K; refuses a bad subset."""
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    bad = [o for o in objectives if o not in OBJECTIVE_NAMES + REFERENCE_NAMES]
    if bad or not objectives:
        raise BenchError(f"--objectives {args.objectives!r}: use a comma-separated subset of "
                         f"{','.join(OBJECTIVE_NAMES + REFERENCE_NAMES)}")
    args.objectives = list(dict.fromkeys(objectives))
    if args.num_negatives is None:
        args.num_negatives = 1000 if args.task == "finetune" else 8191
    if args.task == "finetune" and "mlm" in args.objectives:
        raise BenchError("--objectives mlm is a pre-training objective: with --task finetune use kd,codir "
                         "(and ref_kd,ref_codir)")


def _check_numbers(args: argparse.Namespace) -> None:
    """The numeric arguments' ranges and the models' shapes."""
    if args.num_classes < 2:
        raise BenchError(f"--num_classes must be >= 2 (CRD negatives come from other classes), got {args.num_classes}")
    if args.global_negatives < 0:
        raise BenchError(f"--global_negatives must be >= 0, got {args.global_negatives}")
    if args.global_negatives > args.num_examples:
        raise BenchError(f"--global_negatives {args.global_negatives} exceeds --num_examples {args.num_examples}: "
                         f"raise --num_examples")
    for name in ("teacher_layers", "teacher_hidden", "teacher_heads", "student_layers", "student_hidden",
                 "student_heads", "vocab", "steps", "num_examples", "num_negatives"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise BenchError(f"--warmup must be >= 0, got {args.warmup}")
    if args.seq_len < 3:
        raise BenchError(f"--seq_len must be >= 3 ([CLS], one token, [SEP]), got {args.seq_len}")
    lo, hi = PRETRAIN_SEQ_RANGE
    if args.task == "pretrain" and not lo <= args.seq_len <= hi:
        raise BenchError(f"--seq_len {args.seq_len}: pre-training blocks are {lo}..{hi} tokens (corpus.block_size)")
    for who in ("teacher", "student"):
        h, n = getattr(args, f"{who}_hidden"), getattr(args, f"{who}_heads")
        if h % n:
            raise BenchError(f"--{who}_hidden {h} is not a multiple of --{who}_heads {n}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise BenchError(f"--peak_tflops must be > 0, got {args.peak_tflops}")
    if args.peak_tflops is not None and args.peak_json is not None:
        raise BenchError("--peak_tflops and --peak_json both give the peak: pass one")
    if args.peak_json is not None:
        if not os.path.isfile(args.peak_json):
            raise BenchError(f"--peak_json {args.peak_json}: no such file (write it with bench/matmul_peak.py "
                             f"--output)")
        peak_from_json(args.peak_json, args.precision)


def _check_batches(args: argparse.Namespace) -> None:
    """``--micro_batch`` / ``--zero_stage`` / ``--bucket_size`` lists, ``--grad_accum`` against ``--global_batch``.

    Sets ``args.micro_batches`` (the sweep) and ``args.micro_batch`` (its first value, for the one-point checks).
    """
    args.micro_batches = list(dict.fromkeys(args.micro_batch))
    args.micro_batch = args.micro_batches[0]
    args.sweep_zero_stage, args.sweep_bucket_size = args.zero_stage, args.bucket_size
    if min(args.micro_batches) < 1:
        raise BenchError(f"--micro_batch values must be >= 1, got {args.micro_batches}")
    if args.zero_stage is not None and not set(args.zero_stage) <= {0, 1, 2, 3}:
        raise BenchError(f"--zero_stage values are ZeRO stages 0, 1, 2, 3, got {args.zero_stage}")
    if args.bucket_size is not None and min(args.bucket_size) < 1:
        raise BenchError(f"--bucket_size values must be >= 1 (elements), got {args.bucket_size}")
    if args.global_batch is None:
        args.grad_accum = 1 if args.grad_accum is None else args.grad_accum
        if args.grad_accum < 1:
            raise BenchError(f"--grad_accum must be >= 1, got {args.grad_accum}")
        return
    if args.grad_accum is not None:
        raise BenchError("--grad_accum and --global_batch both set the accumulation: pass one")
    bad = [m for m in args.micro_batches if args.global_batch < m or args.global_batch % m]
    if bad:
        raise BenchError(f"--global_batch {args.global_batch} is not a multiple of --micro_batch {bad[0]}: "
                         f"use micro-batches that divide it")


def parse_args(argv=None) -> argparse.Namespace:
    from codir_ds.cli import DefaultsHelpFormatter
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    _add_model_arguments(ap)
    _add_training_arguments(ap)
    _add_measurement_arguments(ap)
    args = ap.parse_args(argv)
    _check_objectives(args)
    _check_batches(args)
    _check_numbers(args)
    return args


# ----------------------------------------------------------------------------- environment

def _set_process_defaults() -> None:
    """One process by default: the torch.distributed variables, with a free port."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        from codir_ds.pipeline import free_port
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name() -> str:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{_cpu_name()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def measure_matmul_tflops(dtype, device, seconds: float = 0.5) -> float:
    """Best-of TFLOP/s of a square matrix product in ``dtype`` (the achievable dense peak of this device).

    Both layouts are timed, ``a @ b`` and ``a @ b.T`` (``F.linear``, what ``nn.Linear`` runs): on
    some CPUs bf16 ``a @ b`` takes a path ~20x slower than ``F.linear``, which would make MFU > 1.
    """
    import torch
    import torch.nn.functional as F
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n_max = 8192 if device.type == "cuda" else 2048
    best_tflops = 0.0
    for product in (torch.matmul, F.linear):
        n = 256
        while True:  # grow the matrices until one product takes >= 20 ms
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            product(a, b)
            sync()
            t = time.perf_counter()
            product(a, b)
            sync()
            if time.perf_counter() - t >= 0.02 or n >= n_max:
                break
            n *= 2
        best, spent, reps = math.inf, 0.0, 0
        while reps < 2 or (spent < seconds / 2 and reps < 50):
            t = time.perf_counter()
            product(a, b)
            sync()
            dt = time.perf_counter() - t
            best, spent, reps = min(best, dt), spent + dt, reps + 1
        best_tflops = max(best_tflops, 2 * n ** 3 / best / 1e12)
    return best_tflops


def peak_tflops(args, dtype, device) -> tuple[float, str]:
    """``(peak TFLOP/s per device, source)``: given, from ``--peak_json``, the CUDA table, or a measured matmul."""
    if args.peak_tflops is not None:
        return args.peak_tflops, "given"
    if args.peak_json is not None:
        return peak_from_json(args.peak_json, args.precision), f"peak_json:{os.path.basename(args.peak_json)}"
    table = table_peak_tflops(dtype, device)
    if table is not None:
        import torch
        return table, f"table:{torch.cuda.get_device_name(device)}"
    return measure_matmul_tflops(dtype, device), "measured_matmul"


def peak_from_json(path: str, precision: str) -> float:
    """The measured peak (TFLOP/s) for ``precision`` in a ``bench/matmul_peak.py`` report."""
    try:
        with open(path) as f:
            peaks = json.load(f)["tflops"]
        value = float(peaks[precision])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BenchError(f"--peak_json {path}: no measured {precision} peak in it ({type(e).__name__}: {e}); "
                         f"measure it with bench/matmul_peak.py --dtypes {precision}") from None
    if not value > 0:
        raise BenchError(f"--peak_json {path}: the {precision} peak is {value}, not > 0")
    return value


def table_peak_tflops(dtype, device) -> Optional[float]:
    """The CUDA table's dense peak for ``dtype`` on ``device`` (None off the table or on CPU)."""
    import torch
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in CUDA_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peaks["fp32" if dtype == torch.float32 else "half"]
    return None


def non_embedding_params(model) -> int:
    """Parameters outside the embedding tables (the tied MLM decoder weight is one of them)."""
    return sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name)


def build_mlm_model(layers: int, hidden: int, heads: int, args, tokenizer):
    from transformers import BertConfig, BertForMaskedLM
    config = BertConfig(vocab_size=args.vocab, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden,
                        max_position_embeddings=max(512, args.seq_len), pad_token_id=tokenizer.pad_token_id)
    return BertForMaskedLM(config)


def build_cls_model(layers: int, hidden: int, heads: int, args, tokenizer):
    from transformers import BertConfig, BertForSequenceClassification
    config = BertConfig(vocab_size=args.vocab, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden, num_labels=args.num_classes,
                        max_position_embeddings=max(512, args.seq_len), pad_token_id=tokenizer.pad_token_id)
    return BertForSequenceClassification(config)


def ds_config_for(args, world: int):
    """``(raw JSON with this run's precision, prepared config, dtype, TrainingConfig)``.

    ``args`` holds one point's scalar ``micro_batch``, ``grad_accum``, ``zero_stage`` and
    ``bucket_size`` (``sweep_points``). The raw JSON is what the recipes read (``--deepspeed_config``
    with the ``fp16`` / ``bf16`` blocks set by ``--precision``, ZeRO's ``stage`` and bucket sizes
    by ``--zero_stage`` / ``--bucket_size``, checked by ``read_ds_config``'s own ``check_deepspeed_keys``
    before torch.distributed starts); the prepared one is what ``prepare_ds_config`` makes of it
    with this run's batch (the recipes call it themselves, in ``Recipe.check_inputs``).
    """
    from codir_ds.config import TrainingConfig
    from codir_ds.engine.ds_config import check_deepspeed_keys, prepare_ds_config, read_ds_config
    raw = read_ds_config(args.deepspeed_config)
    if args.precision == "fp16":
        fp16 = dict(raw.get("fp16") or {})
        fp16["enabled"] = True
        for k, v in (("loss_scale", 0), ("initial_scale_power", 16), ("loss_scale_window", 1000),
                     ("hysteresis", 2), ("min_loss_scale", 1)):
            fp16.setdefault(k, v)
        raw["fp16"], raw["bf16"] = fp16, {"enabled": False}
    elif args.precision == "bf16":
        raw["fp16"], raw["bf16"] = {"enabled": False}, {"enabled": True}
    else:
        raw["fp16"], raw["bf16"] = {"enabled": False}, {"enabled": False}
    zero = dict(raw.get("zero_optimization") or {})
    if args.zero_stage is not None:
        zero["stage"] = args.zero_stage
    if args.bucket_size is not None:
        zero["reduce_bucket_size"] = zero["allgather_bucket_size"] = args.bucket_size
    if zero:
        raw["zero_optimization"] = zero
    check_deepspeed_keys(raw, args.deepspeed_config)
    tcfg = TrainingConfig(seed=args.seed, max_steps=args.warmup + args.steps,
                          train_batch_size=args.micro_batch * args.grad_accum * world,
                          micro_batch_size=args.micro_batch, fp16_fallback="fp32")
    ds, dtype, warning = prepare_ds_config(raw, world, tcfg)
    if warning:  # fp16 is refused on CPU before this point, so this does not happen
        raise BenchError(warning)
    return raw, ds, dtype, tcfg


def experiment_config(name: str, args, ctx: dict):
    """The objective's ``ExperimentConfig``, through the repo's own loading and validation.

    Default method weights (alpha_kd 0.7, alpha_crd 0.1, rho 2, tau 0.07, mean pooling over all
    layers) with the bench's K, m and bank momentum; the run's batch, seed and step count; no
    progress bar, no TensorBoard. ``model.teacher`` only names the random teacher: nothing is
    loaded from it (see ``bench_recipe_class``).
    """
    from codir_ds.config import load_config
    sets = [f"name=bench_{name}", f"method.name={name}", f"method.num_negatives={args.num_negatives}",
            f"method.projection_dim={PROJECTION_DIM}", f"method.bank_momentum={BANK_MOMENTUM}",
            f"model.tokenizer={ctx['tokenizer_dir']}", f"model.student_layers={args.student_layers}",
            f"model.student_hidden={args.student_hidden}", f"model.student_heads={args.student_heads}",
            f"data.max_length={args.seq_len}", f"training.seed={args.seed}",
            f"training.max_steps={args.warmup + args.steps}",
            f"training.train_batch_size={ctx['ds']['train_batch_size']}",
            f"training.micro_batch_size={args.micro_batch}", "training.fp16_fallback=fp32",
            "logging.progress_bar=false", "logging.tensorboard=false", f"training.compile={str(args.compile).lower()}"]
    if args.task == "pretrain":
        sets.append(f"corpus.block_size={args.seq_len}")
    if reads_teacher(name, args.task):
        sets.append("model.teacher=bench-random-teacher")
    from codir_ds.distill.methods import read_by
    return load_config(None, read_by(name, sets))


def reads_teacher(method: str, task: str) -> bool:
    """Whether the codir-ds objective ``method`` runs a teacher (the registry's declaration)."""
    from codir_ds.config import MethodConfig
    from codir_ds.distill.methods import build_method
    return build_method(MethodConfig(name=method), task).teacher is not None


class Sections:
    """Per-section wall time of a step, from the recipes' named step sections (``codir_ds.engine.sections``):
    installed as their timer while a step runs (:meth:`timing`); syncs the device around each section (CUDA).

    A section entered while another one runs (``bank.gather`` inside the bank's ``start_step``) counts in the
    outer one only; sections outside ``BREAKDOWN_KEYS`` (``ema_update``, ``teacher_cache``) count in ``other``.
    """

    def __init__(self, sync, enabled: bool):
        self.sync, self.enabled = sync, enabled
        self.acc = dict.fromkeys(BREAKDOWN_KEYS[:-1], 0.0)
        self.active = False

    @contextlib.contextmanager
    def __call__(self, key: str):
        if not self.enabled or self.active or key not in self.acc:
            yield
            return
        self.sync()
        self.active = True
        t = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.acc[key] += time.perf_counter() - t
            self.active = False

    @contextlib.contextmanager
    def timing(self):
        """The recipe's step sections are timed into this breakdown inside the block (when it is enabled)."""
        from codir_ds.engine.sections import install_timer
        install_timer(self if self.enabled else None)
        try:
            yield
        finally:
            install_timer(None)

    def reset(self) -> None:
        self.acc = dict.fromkeys(self.acc, 0.0)


# ----------------------------------------------------------------------------- synthetic inputs

def synthetic_block(tokenizer, ordinary, seq_len: int, gen):
    """[CLS] + random ordinary tokens + [SEP], exactly ``seq_len`` long."""
    import torch
    body = ordinary[torch.randint(len(ordinary), (seq_len - 2,), generator=gen)]
    return torch.cat([torch.tensor([tokenizer.cls_token_id]), body, torch.tensor([tokenizer.sep_token_id])])


def whole_words(tokenizer) -> list[tuple[int, str]]:
    """``(id, token)`` of the vocabulary's lower-case ASCII whole words: each one tokenizes to itself, one token."""
    special = set(tokenizer.all_special_ids)
    return sorted((i, t) for t, i in tokenizer.get_vocab().items()
                  if t.isascii() and t.isalpha() and t.islower() and i not in special)


class SyntheticCorpus:
    """Stands in for ``PackedCorpus``: ``num_examples`` training blocks, drawn afresh at each read."""

    def __init__(self, num_blocks: int, seq_len: int, tokenizer, ordinary, seed: int):
        import torch
        self.train_ids = range(num_blocks)
        self.validation_ids = range(num_blocks, num_blocks)
        self.block_size = seq_len
        self.path = "synthetic blocks (bench/throughput.py)"
        self.tokenizer, self.ordinary = tokenizer, ordinary
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.train_ids)

    def __getitem__(self, i: int):
        return synthetic_block(self.tokenizer, self.ordinary, self.block_size, self.gen)


class SyntheticExample:
    """A finetuning example whose text (``seq_len - 2`` random whole words) is drawn when it is read."""
    __slots__ = ("id", "label", "source")
    text_pair = None

    def __init__(self, example_id: int, label: int, source: "SyntheticExamples"):
        self.id, self.label, self.source = example_id, label, source

    @property
    def text(self) -> str:
        return self.source.random_text()


class SyntheticExamples:
    """The synthetic task's training split: ``len(labels)`` examples, made when indexed."""

    def __init__(self, labels: list[int], words: list[str], seq_len: int, seed: int):
        import numpy as np
        self.labels, self.words, self.length = labels, words, seq_len - 2
        self.rng = np.random.default_rng(seed)

    def random_text(self) -> str:
        words = self.words
        return " ".join([words[j] for j in self.rng.integers(len(words), size=self.length).tolist()])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> SyntheticExample:
        if not 0 <= i < len(self.labels):
            raise IndexError(i)
        return SyntheticExample(i, self.labels[i], self)


class SyntheticInputs:
    """The bench recipes' shared part (mixed in before the stage's recipe class, see ``bench_recipe_class``).

    ``check_inputs`` runs the checks every run shares, then gives the synthetic corpus / task (the
    subclass's ``synthetic_data``) instead of reading files; the recipe's model hooks
    (``load_teacher_model``, ``build_student_model``) give random-weight models of the bench's sizes.
    """

    def __init__(self, cfg, ds_config_path: str, output_dir: str, inputs: dict):
        super().__init__(cfg, ds_config_path, output_dir)
        self.inputs = inputs

    def check_inputs(self) -> None:
        from codir_ds.recipes.base import Recipe
        # The checks every run shares (run directory, the DeepSpeed JSON with the bench's precision, optimizer,
        # compile and method checks); the stage's own checks read the corpus / task files: replaced.
        Recipe.check_inputs(self)
        self.teacher_dir = None
        self.tokenizer = self.inputs["tokenizer"]
        self.synthetic_data()

    def synthetic_data(self) -> None:
        raise NotImplementedError

    def setup_models(self) -> None:
        super().setup_models()
        self.n_student = non_embedding_params(self.module.student)

    def load_teacher_model(self):
        teacher = self.inputs["teacher"]  # frozen, in the run's dtype, on the device (built once per process)
        return teacher if self.stage == "finetune" or self.method.teacher.logits else teacher.base_model

    def build_student_model(self):
        args = self.inputs["args"]
        build = build_cls_model if self.stage == "finetune" else build_mlm_model
        return build(args.student_layers, args.student_hidden, args.student_heads, args, self.tokenizer)


@functools.lru_cache(maxsize=None)
def bench_recipe_class(task: str):
    """The stage's own recipe, reading no files: synthetic data and random models of the bench's sizes.

    Only ``check_inputs`` (the corpus / task) and the recipe's model hooks are replaced
    (``SyntheticInputs``); every other phase and ``train_step`` are the recipe's.
    """
    from codir_ds.recipes import finetune as finetune_recipes
    from codir_ds.recipes import pretrain as pretrain_recipes

    class BenchPretrainRecipe(SyntheticInputs, pretrain_recipes.PretrainRecipe):

        def synthetic_data(self) -> None:
            c = self.inputs
            self.corpus = SyntheticCorpus(c["args"].num_examples, c["args"].seq_len, self.tokenizer, c["ordinary"],
                                          c["args"].seed + self.rank)
            self.num_train = len(self.corpus.train_ids)

    class BenchFinetuneRecipe(SyntheticInputs, finetune_recipes.FinetuneRecipe):

        def synthetic_data(self) -> None:
            from codir_ds.data.tasks import TaskData
            c = self.inputs
            args = c["args"]
            train = SyntheticExamples(c["labels"].tolist(), c["words"], args.seq_len, args.seed + self.rank)
            self.task = TaskData(name="synthetic", is_regression=False,
                                 label_names=[f"class_{i}" for i in range(args.num_classes)], train=train,
                                 validation=[], metric_names=["accuracy"])
            self.supplementary = []
            self.num_train = len(train)

    return BenchFinetuneRecipe if task == "finetune" else BenchPretrainRecipe


# ----------------------------------------------------------------------------- one objective

class Run:
    """One objective's models, engine and data; :meth:`step` runs one optimizer step.

    Several runs live side by side in one process, so that their steps can be interleaved
    (``--schedule interleaved``): a slow spell of the machine then costs every objective alike.
    """

    uses_crd = False

    def __init__(self, name: str, args, ctx: dict):
        import torch
        self.name, self.args, self.ctx = name, args, ctx
        self.device = ctx["device"]
        self.is_cuda = self.device.type == "cuda"
        self.sync = torch.cuda.synchronize if self.is_cuda else (lambda: None)
        self.sections = Sections(self.sync, not args.no_breakdown)
        self.step_times: list[float] = []
        self.sync_events = 0
        self.tokens = 0
        self.last_loss = float("nan")
        self.gen = torch.Generator().manual_seed(ctx["tcfg"].seed + ctx["rank"])

    def block(self):
        return synthetic_block(self.ctx["tokenizer"], self.ctx["ordinary"], self.args.seq_len, self.gen)

    def method_config(self, name: str):
        """The run's ``MethodConfig``: default weights, the bench's K, m and bank momentum."""
        from codir_ds.config import MethodConfig
        return MethodConfig(name=name, num_negatives=self.args.num_negatives, projection_dim=PROJECTION_DIM,
                            bank_momentum=BANK_MOMENTUM)

    def start_batches(self) -> None:
        """``self.batches`` (this rank's micro-batches of ids, epoch after epoch) and ``self.accum``."""
        from codir_ds.data.sampler import OwnedShardSampler
        from codir_ds.recipes.base import micro_batches
        ds, ctx = self.ctx["ds"], self.ctx
        self.batches = micro_batches(OwnedShardSampler(self.args.num_examples, ds["train_micro_batch_size_per_gpu"],
                                                       ctx["rank"], ctx["world"], ctx["tcfg"].seed))
        self.accum = ds["gradient_accumulation_steps"]

    def timed_step(self, step: int) -> None:
        if step == self.args.warmup:
            self.sections.reset()
            self.tokens = 0
        self.sync()
        t = time.perf_counter()
        if self.args.sync_debug and self.is_cuda and step >= self.args.warmup:
            self.sync_events += count_cuda_syncs(lambda: self.step(step, timed=True))
        else:
            self.step(step, timed=step >= self.args.warmup)
        self.sync()
        if step >= self.args.warmup:
            self.step_times.append(time.perf_counter() - t)

    def step(self, step: int, timed: bool) -> None:
        raise NotImplementedError

    def base_result(self, n_teacher: int, n_student: int, train_batch_size: int) -> dict:
        import torch
        import torch.distributed as dist
        tokens, world = self.tokens, self.ctx["world"]
        if world > 1:
            total_tokens = torch.tensor(tokens, dtype=torch.long, device=self.device)
            dist.all_reduce(total_tokens)
            tokens = int(total_tokens)
        elapsed = sum(self.step_times)
        tokens_per_s = tokens / elapsed
        flops_per_token = 2 * n_teacher + 6 * n_student
        achieved = flops_per_token * tokens_per_s
        if self.is_cuda:
            peak_mem, mem_source = torch.cuda.max_memory_allocated(self.device), "torch.cuda.max_memory_allocated"
        else:
            peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            mem_source = "getrusage_maxrss_process"
        median = statistics.median(self.step_times)
        result = {
            "samples_per_second": len(self.step_times) * train_batch_size / elapsed,
            "tokens_per_second": tokens_per_s,
            "step_time_mean_s": statistics.fmean(self.step_times),
            "step_time_median_s": median,
            # median step time over the micro steps of a step (this rank's grad_accum), in milliseconds
            "micro_step_time_ms": median / self.accum * 1e3,
            "timed_steps": len(self.step_times),
            "final_loss": self.last_loss,
            "flops_per_token": flops_per_token,
            "teacher_params": n_teacher,
            "student_params": n_student,
            "achieved_tflops": achieved / 1e12,
            "mfu": achieved / (self.ctx["peak_tflops"] * 1e12 * world),
            "peak_memory_bytes": int(peak_mem),
            "peak_memory_source": mem_source,
            # --sync_debug on CUDA: synchronizing CUDA calls per timed step (PyTorch's sync debug mode);
            # they include DeepSpeed's own (e.g. its fp16 overflow check); null when not measured
            "cuda_syncs_per_step": (self.sync_events / len(self.step_times)
                                    if self.args.sync_debug and self.is_cuda else None),
        }
        return result

    def breakdown(self, step_time_mean_s: float) -> dict:
        """Mean seconds per timed step in each section (``BREAKDOWN_KEYS``; ``other``: the rest of the step)."""
        steps = len(self.step_times)
        per_step = {k: v / steps for k, v in self.sections.acc.items()}
        per_step["other"] = max(0.0, step_time_mean_s - sum(per_step.values()))
        return {k: per_step[k] for k in BREAKDOWN_KEYS}

    def close(self) -> None:
        import torch
        self.__dict__.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class RecipeRun(Run):
    """A codir-ds objective: the bench recipe (``bench_recipe_class``), set up by its own ``setup()``.

    :meth:`step` is one iteration of ``Recipe.train``'s loop without ``after_step``: this rank's
    ``accumulation`` micro-batches from the recipe's sampler, ``recipe.train_step(batches)``,
    ``progress.step += 1`` and ``check_skipped()``. What the report counts (tokens, the last loss,
    bank rows gathered) is read by pass-through wrappers that add no device work (``install_hooks``); the
    breakdown times the recipe's named step sections unless ``--no_breakdown``.
    """

    def __init__(self, name: str, args, ctx: dict):
        super().__init__(name, args, ctx)
        from codir_ds.recipes.base import micro_batches
        cls = bench_recipe_class(args.task)
        self.recipe = r = cls(experiment_config(name, args, ctx), ctx["ds_config_path"],
                              os.path.join(ctx["run_root"], name), inputs=ctx)
        if ctx["world"] > 1:  # every rank checks this objective's (new) run directory before rank 0 creates it
            import torch.distributed as dist
            dist.barrier()
        r.setup()
        self.finetune = args.task == "finetune"
        self.n_student = r.n_student
        self.n_teacher = ctx["teacher_params"] if r.teacher is not None else 0
        self.uses_crd = r.bank is not None
        self.accum = r.accum
        self.applied = 0
        self.crd_times: list[float] = []
        self.gather_bytes: list[int] = []
        self.neg_bytes: list[int] = []
        self.rows_gathered: list[int] = []
        self.step_gathers: list = []   # ids of this step's bank.gather calls
        self.crd_inputs = None         # (h_t, h_s, negatives) of the last micro step with CRD negatives
        self.last_terms = None
        self.install_hooks()
        self.batches = micro_batches(r.sampler)
        r.train_mode(True)

    def install_hooks(self) -> None:
        """Pass-through wrappers that count what the report shows (tokens, the last terms, the bank rows gathered,
        the CRD loss's inputs) and add no device work; ``--global_negatives`` fills the step's candidates. The
        time breakdown comes from the recipe's named step sections (``Sections.timing``), not from wrappers."""
        r = self.recipe
        collator = r.collator

        def counting_collator(*a, **k):  # real tokens of the host batch (no device work)
            batch = collator(*a, **k)
            self.tokens += int(batch["attention_mask"].sum())
            return batch
        r.collator = counting_collator
        accumulate = r.monitor.accumulate

        def keep_terms(terms, samples):
            self.last_terms = terms
            return accumulate(terms, samples)
        r.monitor.accumulate = keep_terms
        if r.bank is None:
            return
        gather = r.bank.gather

        def recorded_gather(ids):
            self.step_gathers.append(ids)
            return gather(ids)
        r.bank.gather = recorded_gather
        if not self.finetune and self.args.global_negatives:
            r.bank_component.negative_ids = self.filled_negatives(r.bank_component.negative_ids)
        loss = r.method.loss

        def keep_crd_inputs(student, teacher, inputs):
            if inputs.negatives is not None:
                self.crd_inputs = (student.h_t.detach(), student.h_s.detach(), inputs.negatives)
            return loss(student, teacher, inputs)
        r.method.loss = keep_crd_inputs

    def filled_negatives(self, negative_ids):
        """The recipe's ``negative_ids``, filled up to ``--global_negatives`` as if the global batch were that large:
        the extra ids are drawn by the recipe's own ``negatives.other_ids`` (seeded by seed and step, so every rank
        draws the same)."""
        import torch
        from codir_ds.distill.negatives import other_ids
        args, r = self.args, self.recipe

        def filled(local_ids, step):
            cand_ids = negative_ids(local_ids, step)
            want = min(args.global_negatives, r.method.bank.num_negatives + 1)
            extra = other_ids(cand_ids, want - cand_ids.numel(), args.num_examples, r.cfg.training.seed,
                              r.progress.step)
            return torch.cat([cand_ids, extra]) if extra.numel() else cand_ids
        return filled

    def step(self, step: int, timed: bool) -> None:
        r = self.recipe
        self.step_gathers = []
        batches = [next(self.batches) for _ in range(r.accum)]
        with self.sections.timing():
            r.train_step(batches)
        r.progress.step += 1
        r.check_skipped()
        if not timed:
            return
        # counted after the step, outside its time
        self.applied += int(r.engine.was_step_applied())
        world = self.ctx["world"]
        if r.bank is not None:
            self.record_gather(self.step_gathers, r.bank)
            if not self.finetune or r.method.bank.finetune_negatives == "anchor":  # all-gather of the step's int64 ids
                local = sum(len(ids) for _, ids in batches)
                self.neg_bytes.append(world * local * 8 if world > 1 else 0)
        if self.crd_inputs is not None and self.sections.enabled:
            h_t, h_s, negatives = self.crd_inputs
            tau = r.cfg.method.crd_temperature
            self.crd_times.append(self.accum * time_loss(lambda a, b: negatives.loss(a, b, tau)[0], h_t, h_s,
                                                         self.sync))

    def record_gather(self, gathered: list, bank) -> None:
        """Rows of this step's ``bank.gather`` calls and their all-gather buffer: ``[world * max_count, m]`` fp32."""
        import torch
        world = self.ctx["world"]
        ids = torch.cat([torch.as_tensor(i).reshape(-1).cpu() for i in gathered]) if gathered \
            else torch.zeros(0, dtype=torch.long)
        self.rows_gathered.append(ids.numel())
        if world > 1 and ids.numel():
            uniq = torch.unique(ids)
            max_count = int(torch.bincount(uniq % world, minlength=world).max())
            self.gather_bytes.append(world * max_count * bank.dim * 4)
        else:
            self.gather_bytes.append(0)

    def result(self) -> dict:
        r = self.recipe
        self.last_loss = float(self.last_terms["loss/total"])
        result = self.base_result(self.n_teacher, self.n_student, self.recipe.ds["train_batch_size"])
        result.update({
            "steps_applied": self.applied,
            "breakdown_s": None,
            "crd_loss_fwd_bwd_s": None,
            "bank_allgather_bytes_per_step": round(statistics.fmean(self.gather_bytes)) if self.gather_bytes else 0,
            "batch_negatives_allgather_bytes_per_step": round(statistics.fmean(self.neg_bytes)) if self.neg_bytes
            else 0,
            # bank rows fetched per step: the step's candidates (pretrain) or C x K (finetune)
            "bank_rows_gathered_per_step": round(statistics.fmean(self.rows_gathered)) if self.rows_gathered else 0,
            "overhead_ms_per_micro_step": None,  # set in run() when the plain reference ran alongside
            # the engine's own counts over the whole run (warm-up included): one optimizer step per
            # grad_accum micro steps; and what reached DeepSpeed from --zero_stage / --bucket_size
            "optimizer_steps": r.engine.global_steps,
            "micro_steps": r.engine.micro_steps,
            "engine_zero_stage": r.engine.zero_optimization_stage(),
            "engine_reduce_bucket_size": (r.engine.zero_reduce_bucket_size() if r.engine.zero_optimization_stage()
                                          else None),
        })
        if self.sections.enabled:
            result["breakdown_s"] = self.breakdown(result["step_time_mean_s"])
            result["crd_loss_fwd_bwd_s"] = statistics.fmean(self.crd_times) if self.crd_times else 0.0
        return result

    def close(self) -> None:
        r = self.recipe
        r.monitor.close()
        if hasattr(r.engine, "destroy"):
            r.engine.destroy()
        super().close()


class ReferenceRun(Run):
    """A plain reference of ``kd`` / ``codir`` steps, for side-by-side ratios.

    What a straightforward implementation does, with no DeepSpeed: Hugging Face models; the
    teacher under ``torch.no_grad()`` (pre-training: logits at every position, ``[B, T, V]``,
    its masked rows selected afterwards); the student with every hidden state;
    ``torch.optim.AdamW`` and ``torch.autocast`` (a GradScaler for fp16); for CRD, a full
    replica of the bank on the device and, as in the original CRD code, each anchor's ``K``
    negatives drawn on its own (pre-training: from the whole dataset; finetuning: from the
    examples of other classes) and gathered per anchor as a ``[B, K+1, m]`` copy, scored with
    ``bmm``; the positives' rows updated after the step. Same models, sizes, data, masking
    and loss weights as the codir-ds run; one process.
    """

    def __init__(self, name: str, args, ctx: dict):
        super().__init__(name, args, ctx)
        import torch
        import torch.nn.functional as F
        from codir_ds.engine.distributed import set_seed

        if ctx["world"] != 1:
            raise BenchError(f"--objectives {name} runs in one process: launch the bench without deepspeed ranks")
        device, tcfg = self.device, ctx["tcfg"]
        self.finetune = args.task == "finetune"
        self.codir = name == "ref_codir"
        self.uses_crd = self.codir
        self.mcfg = self.method_config("codir" if self.codir else "kd")
        set_seed(tcfg.seed)
        build = build_cls_model if self.finetune else build_mlm_model
        self.student = build(args.student_layers, args.student_hidden, args.student_heads, args,
                             ctx["tokenizer"]).to(device)
        params = list(self.student.parameters())
        if self.codir:
            self.proj_s = torch.nn.Linear(args.student_layers * args.student_hidden, PROJECTION_DIM).to(device)
            self.proj_t = torch.nn.Linear(args.teacher_layers * args.teacher_hidden, PROJECTION_DIM).to(device)
            params += list(self.proj_s.parameters()) + list(self.proj_t.parameters())
            self.bank = F.normalize(torch.randn(args.num_examples, PROJECTION_DIM,
                                                generator=torch.Generator().manual_seed(tcfg.seed)), dim=1).to(device)
        self.opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
        self.dtype = ctx["dtype"]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.start_batches()  # one process: rank 0 of 1
        self.neg_gen = torch.Generator().manual_seed(tcfg.seed + 7)
        if self.finetune:
            labels = ctx["labels"]
            self.labels = labels
            self.by_label = torch.argsort(labels, stable=True)
            counts = torch.bincount(labels, minlength=args.num_classes)
            self.class_start, self.class_count = torch.cumsum(counts, 0) - counts, counts
        self.n_student = non_embedding_params(self.student)
        self.student.train()
        self.optimizer_steps = self.micro_steps = 0

    def negative_ids(self, ids):
        """``[B, K]`` negative ids drawn for each anchor on its own."""
        import torch
        b, k = len(ids), self.args.num_negatives
        if not self.finetune:
            return torch.randint(self.args.num_examples, (b, k), generator=self.neg_gen)
        c = self.labels[ids].unsqueeze(1)                                    # other-class ids, per anchor
        n = self.labels.numel() - self.class_count[c]
        idx = torch.minimum((torch.rand(b, k, generator=self.neg_gen, dtype=torch.float64) * n).long(), n - 1)
        idx = torch.where(idx >= self.class_start[c], idx + self.class_count[c], idx)
        return self.by_label[idx]

    def step(self, step: int, timed: bool) -> None:
        import torch
        device, teacher = self.device, self.ctx["teacher"]
        half = self.dtype in (torch.float16, torch.bfloat16)
        for _ in range(self.accum):
            epoch, ids = next(self.batches)
            if self.finetune:
                input_ids = torch.stack([self.block() for _ in ids.tolist()])
                host = {"ids": ids, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                        "labels": self.labels[ids]}
            else:
                host = self.ctx["collator"]([self.block() for _ in ids.tolist()], ids, epoch)
            batch = {k: v.to(device) for k, v in host.items()}
            self.tokens += int(host["attention_mask"].sum())
            with torch.autocast(device.type, dtype=self.dtype, enabled=half):
                with torch.no_grad(), self.sections("teacher_forward"):
                    t_out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    output_hidden_states=self.codir)
            self.student_step(batch, ids, t_out, half)
        with self.sections("optimizer_step"):
            self.scaler.step(self.opt)
            self.scaler.update()
            self.opt.zero_grad(set_to_none=True)
        self.optimizer_steps += 1

    def student_step(self, batch: dict, ids, t_out, half: bool) -> None:
        """One micro step's student forward, loss and backward (section ``student_forward_backward``) and, for
        codir, the positives' bank rows (``crd_and_bank``)."""
        import torch
        import torch.nn.functional as F
        device, mcfg = self.device, self.mcfg
        rho, tau = mcfg.kd_temperature, mcfg.crd_temperature
        with self.sections("student_forward_backward"):
            with torch.autocast(device.type, dtype=self.dtype, enabled=half):
                s_out = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     output_hidden_states=self.codir)
            if self.finetune:
                s_logits, t_logits = s_out.logits.float(), t_out.logits.float()
                loss = F.cross_entropy(s_logits, batch["labels"])
            else:
                masked = batch["labels"] != -100
                s_logits, t_logits = s_out.logits[masked].float(), t_out.logits[masked].float()
                loss = F.cross_entropy(s_logits, batch["labels"][masked])
            kd = F.kl_div(F.log_softmax(s_logits / rho, -1), F.softmax(t_logits / rho, -1), reduction="batchmean")
            loss = loss + mcfg.alpha_kd * kd * rho ** 2
            if self.codir:
                h_s = F.normalize(self.proj_s(pooled_mean(s_out.hidden_states, batch["attention_mask"])), dim=1)
                h_t = F.normalize(self.proj_t(pooled_mean(t_out.hidden_states, batch["attention_mask"])), dim=1)
                idx = torch.cat([batch["ids"].unsqueeze(1), self.negative_ids(ids).to(device)], dim=1)
                weights = self.bank[idx].clone()                  # [B, K+1, m] per-anchor copy
                weights[:, 0] = h_s                               # the positive: the student's own feature
                scores = torch.bmm(weights, h_t.unsqueeze(2)).squeeze(2) / tau
                crd = F.cross_entropy(scores, torch.zeros(len(ids), dtype=torch.long, device=device))
                loss = loss + mcfg.alpha_crd * crd
            self.scaler.scale(loss / self.accum).backward()
        self.micro_steps += 1
        if self.codir:
            with torch.no_grad(), self.sections("crd_and_bank"):
                rows = batch["ids"]
                self.bank[rows] = F.normalize(mcfg.bank_momentum * self.bank[rows]
                                              + (1 - mcfg.bank_momentum) * h_s, dim=1)
        self.last_loss = loss.detach()

    def result(self) -> dict:
        self.last_loss = float(self.last_loss)
        result = self.base_result(self.ctx["teacher_params"], self.n_student, self.ctx["ds"]["train_batch_size"])
        result["negatives_copy_bytes_per_micro_step"] = (
            self.args.micro_batch * (self.args.num_negatives + 1) * PROJECTION_DIM * 4 if self.codir else 0)
        result.update(optimizer_steps=self.optimizer_steps, micro_steps=self.micro_steps, engine_zero_stage=None,
                      engine_reduce_bucket_size=None)
        result["breakdown_s"] = self.breakdown(result["step_time_mean_s"]) if self.sections.enabled else None
        return result


def count_cuda_syncs(fn) -> int:
    """Run ``fn`` with ``torch.cuda.set_sync_debug_mode("warn")``; the number of synchronizing calls."""
    import warnings
    import torch
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught)


def pooled_mean(hidden_states, mask):
    """Masked mean of every layer's states (embeddings excluded), concatenated: ``[B, L*d]`` fp32."""
    m = mask.unsqueeze(-1).float()
    import torch
    return torch.cat([(h.float() * m).sum(1) / m.sum(1) for h in hidden_states[1:]], dim=-1)


def time_loss(loss_fn, h_t, h_s, sync) -> float:
    """Forward + backward of the CRD term alone on one micro step's (detached) inputs, in seconds.

    It is part of ``student_forward_backward`` in the step; measured again here, outside the
    step's time, because autograd runs it interleaved with the rest of the loss.
    """
    h_t = h_t.clone().requires_grad_(True)
    h_s = h_s.clone().requires_grad_(True)
    sync()
    t = time.perf_counter()
    loss_fn(h_t, h_s).backward()
    sync()
    return time.perf_counter() - t


def run_class(name: str, args):
    return ReferenceRun if name in REFERENCE_NAMES else RecipeRun


def run_objectives(args, ctx: dict) -> dict:
    """Every objective's timed steps, one after another or interleaved step by step.

    The runs still open when a step raises (out of memory in a sweep) are closed before the error goes on.
    """
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if ctx["rank"] == 0 else (lambda msg: None)
    runs: dict = {}
    try:
        if args.schedule == "sequential":
            return _run_sequential(args, ctx, runs, say)
        return _run_interleaved(args, ctx, runs, say)
    finally:
        for run in runs.values():
            with contextlib.suppress(Exception):
                run.close()


def _run_sequential(args, ctx: dict, runs: dict, say) -> dict:
    import torch
    total, results = args.warmup + args.steps, {}
    for name in args.objectives:
        say(f"bench: {args.task} {name} ({args.warmup} warm-up + {args.steps} timed steps)")
        if torch.cuda.is_available():  # peak memory per objective (plus the shared teacher)
            torch.cuda.reset_peak_memory_stats()
        run = runs[name] = run_class(name, args)(name, args, ctx)
        for step in range(total):
            run.timed_step(step)
            if (step + 1) % 10 == 0 or step + 1 == total:
                say(f"bench: {name} step {step + 1}/{total}")
        results[name] = run.result()
        runs.pop(name).close()
    return results


def _run_interleaved(args, ctx: dict, runs: dict, say) -> dict:
    total, results = args.warmup + args.steps, {}
    for name in args.objectives:
        say(f"bench: {args.task} {name}: building")
        runs[name] = run_class(name, args)(name, args, ctx)
    say(f"bench: {args.warmup} warm-up + {args.steps} timed steps of {','.join(args.objectives)}, interleaved")
    order = list(args.objectives)
    for step in range(total):
        t = time.perf_counter()
        for name in order:
            runs[name].timed_step(step)
        order = order[1:] + order[:1]  # rotate, so no objective always runs right after another
        say(f"bench: step {step + 1}/{total} ({'timed' if step >= args.warmup else 'warm-up'}) of every objective "
            f"in {time.perf_counter() - t:.1f} s")
    for name in args.objectives:
        results[name] = runs[name].result()
    for name in args.objectives:
        runs.pop(name).close()
    return results


def is_oom(error: BaseException) -> bool:
    """Whether ``error`` is the device (or host) running out of memory."""
    import torch
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def run_sweep(points: list[dict], run_point, on_point=None, catch_oom: bool = True) -> list[dict]:
    """Each point's record: its public fields (keys without ``_``), ``status`` and what ``run_point(point)`` returned.

    ``status`` is ``ok``, ``oom`` (``run_point`` ran out of memory: the error's first line is kept, memory
    is freed, and the sweep goes on) or ``skipped_after_oom`` (a micro-batch at least as large as one
    that ran out of memory with the same ZeRO stage and bucket size). ``on_point(records)`` after each
    point. Other errors propagate; so does an out-of-memory error with ``catch_oom=False`` (several ranks:
    one rank alone failing would leave the others waiting in a collective).
    """
    records: list[dict] = []
    oom_at: dict = {}
    for point in points:
        record = {k: v for k, v in point.items() if not k.startswith("_")}
        group = (point.get("zero_stage"), point.get("bucket_size"))
        if group in oom_at and point["micro_batch"] >= oom_at[group]:
            record.update(status="skipped_after_oom", error=f"micro_batch {oom_at[group]} ran out of memory")
        else:
            try:
                record.update(status="ok", **run_point(point))
            except Exception as e:  # noqa: BLE001 - only out of memory is recorded, see is_oom
                if not catch_oom or not is_oom(e):
                    raise
                first = (str(e).strip().splitlines() or [""])[0]
                record.update(status="oom", error=f"{type(e).__name__}: {first[:300]}")
                oom_at[group] = point["micro_batch"]
        if record["status"] == "oom":
            free_device_memory()
        records.append(record)
        if on_point is not None:
            on_point(records)
    return records


def free_device_memory() -> None:
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def run_root(rank: int, world: int):
    """A temporary directory shared by the ranks (rank 0 makes it) for the recipes' run directories."""
    import torch.distributed as dist
    box = [tempfile.mkdtemp(prefix="codir_bench_") if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    try:
        yield box[0]
        if world > 1 and dist.is_initialized():
            dist.barrier()  # on success only: a rank failing alone must not wait for the others
    finally:
        if rank == 0:
            shutil.rmtree(box[0], ignore_errors=True)


def write_ds_config(raw_ds: dict, root: str, rank: int) -> str:
    """The DeepSpeed JSON with the bench's precision, as the file the recipes read (one copy per rank)."""
    path = os.path.join(root, f"deepspeed_rank{rank}.json")
    with open(path, "w") as f:
        json.dump(raw_ds, f, indent=2)
    return path


# ----------------------------------------------------------------------------- main

def _check_against_tokenizer(args, tokenizer, world: int) -> None:
    """The vocabulary holds the tokenizer's ids; every rank's sampler shard fills a micro-batch."""
    if args.vocab < len(tokenizer):
        raise BenchError(f"--vocab {args.vocab} is smaller than the tokenizer's {len(tokenizer)} tokens: "
                         f"use --vocab {len(tokenizer)} or more")
    if args.num_examples // world < max(args.micro_batches):
        raise BenchError(f"--num_examples {args.num_examples} gives each of {world} ranks fewer ids than "
                         f"--micro_batch {max(args.micro_batches)}: raise --num_examples")


def _shared_peak(args, dtype, device, rank: int, world: int) -> tuple[float, str]:
    """Rank 0's ``peak_tflops``, broadcast: every rank computes MFU with it."""
    import torch.distributed as dist
    peak, peak_source = peak_tflops(args, dtype, device) if rank == 0 else (0.0, "")
    if world > 1:
        box = [peak, peak_source]
        dist.broadcast_object_list(box, src=0)
        peak, peak_source = box
    return peak, peak_source


def _shared_teacher(args, tcfg, tokenizer, device, dtype):
    """``(teacher, non-embedding params)``: the random teacher every distilling objective shares, or ``(None, 0)``."""
    import torch
    if not any(reads_teacher(o.removeprefix("ref_"), args.task) for o in args.objectives):  # ref_X: X's plain loop
        return None, 0
    torch.manual_seed(tcfg.seed + 1)
    build = build_cls_model if args.task == "finetune" else build_mlm_model
    teacher = build(args.teacher_layers, args.teacher_hidden, args.teacher_heads, args, tokenizer)
    teacher.requires_grad_(False)  # frozen, in the run's precision, as load_teacher / load_mlm_teacher do
    teacher.eval()
    teacher.to(device=device, dtype=dtype)
    return teacher, non_embedding_params(teacher)


def _synthetic_sources(args, tcfg, tokenizer) -> dict:
    """The collator and what the synthetic inputs draw from (``ordinary`` tokens, ``words``, ``labels``)."""
    import torch
    from codir_ds.config import MethodConfig
    from codir_ds.data.mlm import MLMCollator
    collator = MLMCollator(tokenizer, MethodConfig().mlm_probability, seed=tcfg.seed)
    words = whole_words(tokenizer)
    # The tokens of the synthetic inputs: pre-training blocks draw ordinary tokens; finetuning texts draw
    # whole words (one token each), and the plain reference draws the same token ids.
    ordinary = collator.replacements if args.task == "pretrain" else torch.tensor([i for i, _ in words])
    labels = torch.randint(args.num_classes, (args.num_examples,), generator=torch.Generator().manual_seed(tcfg.seed))
    return {"collator": collator, "ordinary": ordinary, "words": [w for _, w in words], "labels": labels}


def _ratios(results: dict) -> tuple[dict, dict]:
    """``(ratios, overhead)``; sets ``overhead_ms_per_micro_step`` in the kd / codir results that have a reference.

    Side by side: codir-ds over the plain reference (>1: codir-ds is faster), and codir's cost over kd.
    """
    ratios, overhead = {}, {}
    for ours in ("kd", "codir"):
        if ours in results and f"ref_{ours}" in results:
            ref = results[f"ref_{ours}"]
            ratios[f"{ours}_over_ref_{ours}"] = results[ours]["samples_per_second"] / ref["samples_per_second"]
            # framework overhead per micro step: the difference of the median micro-step times (tiny models:
            # compute negligible, see the module docstring)
            overhead[ours] = results[ours]["micro_step_time_ms"] - ref["micro_step_time_ms"]
            results[ours]["overhead_ms_per_micro_step"] = overhead[ours]
    if "kd" in results and "codir" in results:
        kd, codir = results["kd"], results["codir"]
        ratios["codir_step_time_over_kd"] = codir["step_time_mean_s"] / kd["step_time_mean_s"]
        ratios["codir_median_step_time_over_kd"] = codir["step_time_median_s"] / kd["step_time_median_s"]
        if codir.get("breakdown_s"):  # the contrastive parts' own time (bank traffic + CRD loss) over a kd step
            ratios["crd_sections_over_kd_step"] = ((codir["breakdown_s"]["crd_and_bank"] + codir["crd_loss_fwd_bwd_s"])
                                                   / kd["step_time_mean_s"])
    return ratios, overhead


def _report_setup(args, ds: dict, world: int, teacher, n_teacher: int) -> dict:
    """The report's config fields about the models, the batch and the run's arguments."""
    return {
        "teacher": {"layers": args.teacher_layers, "hidden": args.teacher_hidden, "heads": args.teacher_heads,
                    "intermediate": 4 * args.teacher_hidden, "non_embedding_params": n_teacher},
        "student": {"layers": args.student_layers, "hidden": args.student_hidden, "heads": args.student_heads,
                    "intermediate": 4 * args.student_hidden},
        "vocab": args.vocab, "seq_len": args.seq_len, "precision": args.precision,
        "micro_batch": ds["train_micro_batch_size_per_gpu"], "grad_accum": ds["gradient_accumulation_steps"],
        "world_size": world, "train_batch_size": ds["train_batch_size"],
        "steps": args.steps, "warmup": args.warmup, "objectives": args.objectives,
        "num_examples": args.num_examples, "num_negatives": args.num_negatives,
        "task": args.task, "num_classes": args.num_classes if args.task == "finetune" else None,
        "schedule": args.schedule, "global_negatives": args.global_negatives,
        "teacher_dtype": str(teacher.dtype).replace("torch.", "") if teacher is not None else None,
        "teacher_attention": getattr(teacher.config, "_attn_implementation", None) if teacher is not None
        else None,
        "projection_dim": PROJECTION_DIM, "bank_momentum": BANK_MOMENTUM,
        "deepspeed_config": os.path.relpath(os.path.abspath(args.deepspeed_config), REPO),
        "zero_stage": ds.get("zero_optimization", {}).get("stage", 0),
        "reduce_bucket_size": ds.get("zero_optimization", {}).get("reduce_bucket_size"),
        "global_batch": args.global_batch, "compile": args.compile,
        # what was swept (the lists as given; this config is the chosen point's)
        "sweep": {"micro_batch": args.micro_batches, "zero_stage": args.sweep_zero_stage,
                  "bucket_size": args.sweep_bucket_size},
    }


def _report_environment(args, device) -> dict:
    """The report's config fields about what a step is, the timing mode, the machine and the versions."""
    import deepspeed
    import torch
    import transformers
    stage = "FinetuneRecipe (codir_ds/recipes/finetune.py)" if args.task == "finetune" else \
        "PretrainRecipe (codir_ds/recipes/pretrain.py)"
    return {
        # what a timed step is (mlm / kd / codir; the ref_* objectives are the plain loop)
        "timed_step": f"{stage}.train_step, its micro-batches from the recipe's sampler, then progress.step "
                      f"and check_skipped (after_step's logging / evaluation / checkpoints not run)",
        "breakdown_timing": not args.no_breakdown,
        "breakdown_hooks": BREAKDOWN_HOOKS if not args.no_breakdown else None,
        "device": device_name(), "device_type": device.type,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__, "deepspeed_version": deepspeed.__version__,
        "transformers_version": transformers.__version__, "python_version": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.argv[0], REPO) if sys.argv[0] else ""] + sys.argv[1:]),
    }


def _accumulation(args, micro: int, world: int) -> int:
    """Micro-batches per optimizer step at ``micro``: ``--grad_accum``, or ``--global_batch`` / (micro x world)."""
    if args.global_batch is None:
        return args.grad_accum
    if args.global_batch % (micro * world):
        raise BenchError(f"--global_batch {args.global_batch} is not a multiple of --micro_batch {micro} x "
                         f"{world} ranks: use micro-batches that divide global_batch / world")
    return args.global_batch // (micro * world)


def sweep_points(args, world: int) -> list[dict]:
    """Every (ZeRO stage, bucket size, micro-batch) point, nested in that order, micro-batches as given.

    Each point holds its public fields and, under ``_args`` / ``_ds``, its own arguments (scalar
    micro_batch, grad_accum, zero_stage, bucket_size) and ``ds_config_for``'s result: every point's
    DeepSpeed JSON is checked before anything is built.
    """
    points = []
    for stage in args.zero_stage or [None]:
        for bucket in args.bucket_size or [None]:
            for micro in args.micro_batches:
                pargs = copy.copy(args)
                pargs.micro_batch, pargs.zero_stage, pargs.bucket_size = micro, stage, bucket
                pargs.grad_accum = _accumulation(args, micro, world)
                raw, ds, dtype, tcfg = ds_config_for(pargs, world)
                points.append({"micro_batch": micro, "grad_accum": ds["gradient_accumulation_steps"],
                               "train_batch_size": ds["train_batch_size"],
                               "zero_stage": (raw.get("zero_optimization") or {}).get("stage", 0),
                               "bucket_size": bucket, "_args": pargs, "_ds": (raw, ds, dtype, tcfg)})
    return points


def measure_point(point: dict, shared: dict) -> dict:
    """One point's objectives (``run_objectives``): results, ratios and overhead; peak memory counted afresh."""
    import torch
    pargs, (raw_ds, ds, _, tcfg) = point["_args"], point["_ds"]
    rank, world = shared["rank"], shared["world"]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with run_root(rank, world) as root:
        ctx = {**shared, "args": pargs, "ds": ds, "tcfg": tcfg, "raw_ds": raw_ds, "run_root": root,
               "ds_config_path": write_ds_config(raw_ds, root, rank)}
        results = run_objectives(pargs, ctx)
    ratios, overhead = _ratios(results)
    return {"results": results, "ratios": ratios, "overhead_ms_per_micro_step": overhead}


def best_point(records: list[dict]) -> Optional[int]:
    """Index of the ``ok`` point whose slowest objective has the most samples/s (None when none is ok)."""
    ok = [(min(r["samples_per_second"] for r in rec["results"].values()), i)
          for i, rec in enumerate(records) if rec["status"] == "ok" and rec["results"]]
    return max(ok)[1] if ok else None


def build_report(args, points: list[dict], records: list[dict], shared: dict, complete: bool) -> dict:
    """The JSON report: the best point's config, results and ratios at the top, every point under ``points``."""
    best = best_point(records)
    point = points[best if best is not None else 0]
    chosen = records[best] if best is not None else {}
    ds = point["_ds"][1]
    return {
        "benchmark": f"codir-ds {args.task} throughput (bench/throughput.py)",
        "config": {**_report_setup(point["_args"], ds, shared["world"], shared["teacher"], shared["teacher_params"]),
                   **_report_environment(args, shared["device"])},
        "peak_tflops": shared["peak_tflops"],
        "peak_source": shared["peak_source"],
        "table_peak_tflops": table_peak_tflops(shared["dtype"], shared["device"]),
        "results": chosen.get("results", {}),
        "ratios": chosen.get("ratios", {}),
        # codir-ds's micro-step time minus the plain reference's (median step / grad_accum), ms; only the
        # objectives whose reference ran alongside. Framework overhead when the models are tiny.
        "overhead_ms_per_micro_step": chosen.get("overhead_ms_per_micro_step", {}),
        # the sweep: every point's status and results (one point without --micro_batch/--zero_stage/--bucket_size
        # lists); the top-level results are those of points[best_point]
        "best_point": best,
        "points": records,
        "complete": complete,
    }


def _start(args) -> tuple[list[dict], dict]:
    """Distributed start, every point's DeepSpeed config, the tokenizer, the peak, the shared teacher and inputs."""
    import torch
    from deepspeed.accelerator import get_accelerator

    from codir_ds.assets import minilm_dir
    from codir_ds.engine.distributed import dist_env, init_distributed
    from codir_ds.models.loading import load_tokenizer

    rank, local_rank, world = dist_env()
    points = sweep_points(args, world)
    _, _, dtype, tcfg = points[0]["_ds"]
    tokenizer_dir = minilm_dir()
    tokenizer = load_tokenizer(tokenizer_dir)
    _check_against_tokenizer(args, tokenizer, world)
    init_distributed()
    if torch.cuda.is_available():
        get_accelerator().set_device(local_rank)
    device = torch.device(get_accelerator().current_device_name())
    peak, peak_source = _shared_peak(args, dtype, device, rank, world)
    teacher, n_teacher = _shared_teacher(args, tcfg, tokenizer, device, dtype)
    shared = {"rank": rank, "world": world, "device": device, "dtype": dtype, "tokenizer": tokenizer,
              "tokenizer_dir": str(tokenizer_dir), **_synthetic_sources(args, tcfg, tokenizer), "teacher": teacher,
              "teacher_params": n_teacher, "peak_tflops": peak, "peak_source": peak_source}
    return points, shared


def run(args) -> Optional[dict]:
    import torch
    if args.precision == "fp16" and not torch.cuda.is_available():
        raise BenchError("--precision fp16 is not supported on CPU (no CUDA device): use --precision bf16 or fp32")
    from codir_ds.cli import quiet_environment
    quiet_environment()
    _set_process_defaults()
    points, shared = _start(args)
    rank = shared["rank"]

    def partial(records: list[dict]) -> None:  # after each point of a sweep: the report so far
        if rank == 0 and args.output and len(records) < len(points):
            write_report(build_report(args, points, records, shared, complete=False), args.output)

    records = run_sweep(points, lambda p: measure_point(p, shared), partial, catch_oom=shared["world"] == 1)
    return build_report(args, points, records, shared, complete=True) if rank == 0 else None


def write_report(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps(report, indent=2) + "\n")


def main(argv=None) -> int:
    # Everything the libraries print goes to stderr; stdout carries the JSON object only.
    sys.stdout.flush()
    json_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        args = parse_args(argv)
        report = run(args)
    except BenchError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:  # CodirError from the repo's checks: same one-line form
        from codir_ds.errors import CodirError
        if not isinstance(e, CodirError):
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        sys.stdout.flush()
    if report is not None:
        if args.output:
            write_report(report, args.output)
        os.write(json_fd, (json.dumps(report, indent=2) + "\n").encode())
        if report["best_point"] is None:  # every point ran out of memory: recorded, but nothing was measured
            print("error: every point ran out of memory (the report's points say where)", file=sys.stderr, flush=True)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
