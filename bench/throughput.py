"""Pre-training throughput: N optimizer steps of mlm / kd / codir on the real training components.

    python bench/throughput.py --teacher_layers 12 --teacher_hidden 768 --teacher_heads 12 \
        --student_layers 6 --student_hidden 768 --student_heads 12 --seq_len 128 \
        --micro_batch 32 --precision bf16 --steps 20 [--output bench/results/x.json]
    deepspeed --num_gpus 8 bench/throughput.py ...      (rank 0 reports)

One optimizer step is the step of ``codir_ds.engine.pretrain.run_pretrain``: the rank's
``grad_accum`` micro-batches from ``OwnedShardSampler``; for codir ``batch_negatives`` +
``ShardedMemoryBank.gather`` once per step; per micro step ``MLMCollator`` masking,
``MLMTeacherRunner`` (kd/codir), the DeepSpeed engine's forward of ``PretrainModule``,
``self_mask``, the ``build_pretrain_objective`` loss, ``engine.backward`` and
``engine.step``; after an applied step the positives' ``bank.update``. Teacher and student
are random-weight BERT masked-LM models; the blocks are random ordinary tokens between
[CLS] and [SEP] (no corpus is read). Prints one JSON object on stdout (see bench/README.md).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

OBJECTIVE_NAMES = ("mlm", "kd", "codir")
# The plain reference of kd / codir (bench_reference): Hugging Face models, a straightforward loop.
REFERENCE_NAMES = ("ref_kd", "ref_codir")
PROJECTION_DIM = 128   # m: bank row / projection size (CoDIR)
BANK_MOMENTUM = 0.5    # beta of Eq. 5
BREAKDOWN_KEYS = ("teacher_forward", "student_forward_backward", "crd_and_bank", "optimizer_step", "other")

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


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher_layers", type=int, default=12)
    ap.add_argument("--teacher_hidden", type=int, default=768)
    ap.add_argument("--teacher_heads", type=int, default=12)
    ap.add_argument("--student_layers", type=int, default=6)
    ap.add_argument("--student_hidden", type=int, default=768)
    ap.add_argument("--student_heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=30522, help="vocabulary size of both models (>= the tokenizer's)")
    ap.add_argument("--seq_len", type=int, default=128, help="tokens per block, [CLS] and [SEP] included")
    ap.add_argument("--micro_batch", type=int, default=32, help="sequences per micro-batch per rank")
    ap.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="bf16")
    ap.add_argument("--deepspeed_config", default=os.path.join(REPO, "ds_configs", "zero2.json"),
                    help="DeepSpeed JSON (batch sizes and precision are overridden)")
    ap.add_argument("--objectives", default=",".join(OBJECTIVE_NAMES),
                    help="comma-separated subset of mlm,kd,codir and the plain references ref_kd,ref_codir "
                         "(1 process; the report then has their throughput ratios)")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per objective")
    ap.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before the timed ones")
    ap.add_argument("--num_examples", type=int, default=100000, help="memory bank rows / sampler ids")
    ap.add_argument("--num_negatives", type=int, default=8191, help="method.num_negatives (codir)")
    ap.add_argument("--peak_tflops", type=float, default=None, help="peak TFLOP/s per device for MFU (else detected)")
    ap.add_argument("--no_breakdown", action="store_true",
                    help="no per-section timing (no CUDA syncs inside a step); breakdown fields are null")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--output", default=None, help="also write the JSON here (rank 0)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = ap.parse_args(argv)
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    bad = [o for o in objectives if o not in OBJECTIVE_NAMES + REFERENCE_NAMES]
    if bad or not objectives:
        raise BenchError(f"--objectives {args.objectives!r}: use a comma-separated subset of "
                         f"{','.join(OBJECTIVE_NAMES + REFERENCE_NAMES)}")
    args.objectives = list(dict.fromkeys(objectives))
    for name in ("teacher_layers", "teacher_hidden", "teacher_heads", "student_layers", "student_hidden",
                 "student_heads", "vocab", "micro_batch", "grad_accum", "steps", "num_examples", "num_negatives"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise BenchError(f"--warmup must be >= 0, got {args.warmup}")
    if args.seq_len < 3:
        raise BenchError(f"--seq_len must be >= 3 ([CLS], one token, [SEP]), got {args.seq_len}")
    for who in ("teacher", "student"):
        h, n = getattr(args, f"{who}_hidden"), getattr(args, f"{who}_heads")
        if h % n:
            raise BenchError(f"--{who}_hidden {h} is not a multiple of --{who}_heads {n}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise BenchError(f"--peak_tflops must be > 0, got {args.peak_tflops}")
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
    """``(peak TFLOP/s per device, source)``: given, the CUDA table, or a measured matmul."""
    if args.peak_tflops is not None:
        return args.peak_tflops, "given"
    import torch
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peaks in CUDA_PEAK_TFLOPS:
            if key.lower() in name.lower():
                return peaks["fp32" if dtype == torch.float32 else "half"], f"table:{name}"
    return measure_matmul_tflops(dtype, device), "measured_matmul"


def non_embedding_params(model) -> int:
    """Parameters outside the embedding tables (the tied MLM decoder weight is one of them)."""
    return sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name)


def build_mlm_model(layers: int, hidden: int, heads: int, args, tokenizer):
    from transformers import BertConfig, BertForMaskedLM
    config = BertConfig(vocab_size=args.vocab, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden,
                        max_position_embeddings=max(512, args.seq_len), pad_token_id=tokenizer.pad_token_id)
    return BertForMaskedLM(config)


def ds_config_for(args, world: int):
    """The DeepSpeed JSON with this run's batch and precision, through the repo's own checks."""
    from codir_ds.config import TrainingConfig
    from codir_ds.engine.ds_config import prepare_ds_config, read_ds_config
    ds = read_ds_config(args.deepspeed_config)
    if args.precision == "fp16":
        fp16 = dict(ds.get("fp16") or {})
        fp16["enabled"] = True
        for k, v in (("loss_scale", 0), ("initial_scale_power", 16), ("loss_scale_window", 1000),
                     ("hysteresis", 2), ("min_loss_scale", 1)):
            fp16.setdefault(k, v)
        ds["fp16"], ds["bf16"] = fp16, {"enabled": False}
    elif args.precision == "bf16":
        ds["fp16"], ds["bf16"] = {"enabled": False}, {"enabled": True}
    else:
        ds["fp16"], ds["bf16"] = {"enabled": False}, {"enabled": False}
    tcfg = TrainingConfig(seed=args.seed, max_steps=args.warmup + args.steps,
                          train_batch_size=args.micro_batch * args.grad_accum * world,
                          micro_batch_size=args.micro_batch, fp16_fallback="fp32")
    ds, dtype, warning = prepare_ds_config(ds, world, tcfg)
    if warning:  # fp16 is refused on CPU before this point, so this does not happen
        raise BenchError(warning)
    return ds, dtype, tcfg


class Sections:
    """Per-section wall time; syncs the device around each section (CUDA, breakdown mode)."""

    def __init__(self, sync, enabled: bool):
        self.sync, self.enabled = sync, enabled
        self.acc = dict.fromkeys(BREAKDOWN_KEYS[:-1], 0.0)

    @contextlib.contextmanager
    def __call__(self, key: str):
        if not self.enabled:
            yield
            return
        self.sync()
        t = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.acc[key] += time.perf_counter() - t

    def reset(self) -> None:
        self.acc = dict.fromkeys(self.acc, 0.0)


# ----------------------------------------------------------------------------- one objective

def bench_objective(name: str, args, ctx: dict) -> dict:
    import deepspeed
    import torch
    import torch.distributed as dist

    from codir_ds.config import MethodConfig
    from codir_ds.distill.losses import crd_loss_shared
    from codir_ds.distill.memory_bank import ShardedMemoryBank
    from codir_ds.distill.objectives import build_pretrain_objective
    from codir_ds.engine.pretrain import batch_negatives, build_pretrain_module, micro_batches, self_mask
    from codir_ds.engine.session import apply_bank_updates, optimizer_and_schedule, set_seed
    from codir_ds.engine.teacher import MLMTeacherRunner
    from codir_ds.data.sampler import OwnedShardSampler
    from codir_ds.models.mlm import masked_rows

    rank, world, device = ctx["rank"], ctx["world"], ctx["device"]
    ds, tcfg, collator = ctx["ds"], ctx["tcfg"], ctx["collator"]
    mcfg = MethodConfig(name=name, num_negatives=args.num_negatives, projection_dim=PROJECTION_DIM,
                        bank_momentum=BANK_MOMENTUM)
    objective = build_pretrain_objective(mcfg)
    total_steps = args.warmup + args.steps
    is_cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if is_cuda else (lambda: None)

    teacher = ctx["teacher"] if objective.uses_teacher else None
    set_seed(tcfg.seed)  # identical student / head initialisation on every rank (and for every objective)
    student = build_mlm_model(args.student_layers, args.student_hidden, args.student_heads, args, ctx["tokenizer"])
    module, t_layers = build_pretrain_module(student, teacher, mcfg, objective)
    n_student = non_embedding_params(student)
    n_teacher = ctx["teacher_params"] if objective.uses_teacher else 0
    opt, sched = optimizer_and_schedule(module, tcfg, total_steps)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=ds)
    runner = (MLMTeacherRunner(teacher, t_layers, mcfg.pooling, logits=objective.uses_teacher_logits)
              if teacher is not None else None)
    bank = (ShardedMemoryBank(args.num_examples, mcfg.projection_dim, mcfg.bank_momentum, seed=tcfg.seed).to(device)
            if objective.uses_crd else None)
    sampler = OwnedShardSampler(args.num_examples, ds["train_micro_batch_size_per_gpu"], rank, world, tcfg.seed)
    batches = micro_batches(sampler)
    accum = ds["gradient_accumulation_steps"]
    set_seed(tcfg.seed * 1000 + rank)  # dropout differs across ranks, as in run_pretrain

    # Synthetic blocks: [CLS] + random ordinary tokens + [SEP], drawn per example id.
    tok = ctx["tokenizer"]
    ordinary = collator.replacements
    gen = torch.Generator().manual_seed(tcfg.seed + rank)

    def block(_example_id: int) -> torch.Tensor:
        body = ordinary[torch.randint(len(ordinary), (args.seq_len - 2,), generator=gen)]
        return torch.cat([torch.tensor([tok.cls_token_id]), body, torch.tensor([tok.sep_token_id])])

    sections = Sections(sync, not args.no_breakdown)
    step_times, crd_times, gather_bytes, neg_bytes = [], [], [], []
    tokens = 0
    applied = 0
    last_loss = float("nan")
    if is_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    engine.train()
    for step in range(total_steps):
        timed = step >= args.warmup
        if step == args.warmup:
            sections.reset()
            tokens = 0
        sync()
        t_step = time.perf_counter()
        group = [next(batches) for _ in range(accum)]  # this rank's micro-batches of one optimizer step
        cand_ids = candidates = None
        if bank is not None:  # collective: the global mini-batch's bank rows, shared by its micro steps
            with sections("crd_and_bank"):
                local_ids = torch.cat([ids for _, ids in group])
                cand_ids = batch_negatives(local_ids, mcfg.num_negatives, tcfg.seed, step, world, device)
                candidates = bank.gather(cand_ids)
                cpu_cand_ids = cand_ids
                cand_ids = cand_ids.to(device)
        pending = []
        crd_inputs = None
        for epoch, ids in group:
            host = collator([block(i) for i in ids.tolist()], ids, epoch)
            rows = masked_rows(host["labels"])  # on the host, as in the training loop
            labels = host["labels"].reshape(-1)[rows].to(device)
            tokens += int(host["attention_mask"].sum())
            rows = rows.to(device)
            batch = {k: v.to(device) for k, v in host.items()}
            t_out = None
            if runner is not None:
                with sections("teacher_forward"):
                    t_out = runner(batch["input_ids"], batch["attention_mask"], rows)
            with sections("student_forward_backward"):
                out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], rows=rows,
                             teacher_features=t_out.features if t_out is not None else None)
            exclude = None
            if bank is not None:
                with sections("crd_and_bank"):
                    exclude = self_mask(batch["ids"], cand_ids)
            with sections("student_forward_backward"):
                total, terms = objective(out["logits"], labels,
                                         teacher_logits=t_out.logits if t_out is not None else None,
                                         h_t=out.get("h_t"), h_s=out.get("h_s"), candidates=candidates,
                                         exclude=exclude)
                engine.backward(total)
            with sections("optimizer_step"):
                engine.step()
            if bank is not None:
                pending.append((ids, out["h_s"].detach()))
                crd_inputs = (out["h_t"].detach(), out["h_s"].detach(), exclude)
        if bank is not None:
            with sections("crd_and_bank"):
                apply_bank_updates(bank, engine, pending, device)
        sync()
        dt = time.perf_counter() - t_step
        last_loss = float(terms["loss/total"])
        if timed:
            step_times.append(dt)
            if bank is not None:  # traffic of this step's collectives, counted outside its time
                uniq = torch.unique(cpu_cand_ids)
                max_count = int(torch.bincount(uniq % world, minlength=world).max())
                # ShardedMemoryBank.gather: no collective on 1 rank; else one all-gather into a
                # [world * max_count, m] fp32 buffer (each rank's rows padded to the largest count).
                gather_bytes.append(world * max_count * bank.dim * 4 if world > 1 else 0)
                # batch_negatives: all-gather of every rank's int64 ids of this step (none on 1 rank).
                neg_bytes.append(world * local_ids.numel() * local_ids.element_size() if world > 1 else 0)
            applied += int(engine.was_step_applied())
            if crd_inputs is not None and not args.no_breakdown:
                crd_times.append(accum * time_crd_loss(crd_loss_shared, crd_inputs, candidates,
                                                       mcfg.crd_temperature, sync))

    if world > 1:
        total_tokens = torch.tensor(tokens, dtype=torch.long, device=device)
        dist.all_reduce(total_tokens)
        tokens = int(total_tokens)
    elapsed = sum(step_times)
    steps = len(step_times)
    tokens_per_s = tokens / elapsed
    flops_per_token = 2 * n_teacher + 6 * n_student
    achieved = flops_per_token * tokens_per_s
    if is_cuda:
        peak_mem, mem_source = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        mem_source = "getrusage_maxrss_process"
    result = {
        "samples_per_second": steps * ds["train_batch_size"] / elapsed,
        "tokens_per_second": tokens_per_s,
        "step_time_mean_s": statistics.fmean(step_times),
        "step_time_median_s": statistics.median(step_times),
        "timed_steps": steps,
        "steps_applied": applied,
        "final_loss": last_loss,
        "flops_per_token": flops_per_token,
        "teacher_params": n_teacher,
        "student_params": n_student,
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / (ctx["peak_tflops"] * 1e12 * world),
        "peak_memory_bytes": int(peak_mem),
        "peak_memory_source": mem_source,
        "breakdown_s": None,
        "crd_loss_fwd_bwd_s": None,
        "bank_allgather_bytes_per_step": round(statistics.fmean(gather_bytes)) if gather_bytes else 0,
        "batch_negatives_allgather_bytes_per_step": round(statistics.fmean(neg_bytes)) if neg_bytes else 0,
    }
    if not args.no_breakdown:
        per_step = {k: v / steps for k, v in sections.acc.items()}
        per_step["other"] = max(0.0, result["step_time_mean_s"] - sum(per_step.values()))
        result["breakdown_s"] = {k: per_step[k] for k in BREAKDOWN_KEYS}
        result["crd_loss_fwd_bwd_s"] = statistics.fmean(crd_times) if crd_times else 0.0

    # Free this engine before the next objective builds its own.
    if hasattr(engine, "destroy"):
        engine.destroy()
    del engine, module, student, opt, sched, bank, runner, pending, out, total, crd_inputs
    gc.collect()
    if is_cuda:
        torch.cuda.empty_cache()
    return result


def bench_reference(name: str, args, ctx: dict) -> dict:
    """A plain reference of ``kd`` / ``codir`` pre-training steps, for side-by-side ratios.

    What a straightforward implementation does, with no DeepSpeed: Hugging Face masked-LM models;
    the teacher under ``torch.no_grad()`` computing logits at every position (``[B, T, V]``), its
    masked rows selected afterwards; the student with every hidden state; ``torch.optim.AdamW``
    and ``torch.autocast`` (a GradScaler for fp16); for CRD, a full replica of the bank on the
    device and, as in the original CRD code, each anchor's ``K`` negatives drawn from the whole
    dataset and gathered per anchor as a ``[B, K+1, m]`` copy, scored with ``bmm``; the positives'
    rows updated after the step. Same models, sizes, data, masking and loss weights as
    :func:`bench_objective`; one process.
    """
    import torch
    import torch.nn.functional as F

    from codir_ds.config import MethodConfig
    from codir_ds.engine.session import set_seed
    from codir_ds.data.sampler import OwnedShardSampler
    from codir_ds.engine.pretrain import micro_batches

    if ctx["world"] != 1:
        raise BenchError(f"--objectives {name} runs in one process: launch the bench without deepspeed ranks")
    device, dtype, tcfg, collator = ctx["device"], ctx["dtype"], ctx["tcfg"], ctx["collator"]
    codir = name == "ref_codir"
    mcfg = MethodConfig(name="codir" if codir else "kd", num_negatives=args.num_negatives,
                        projection_dim=PROJECTION_DIM, bank_momentum=BANK_MOMENTUM)
    is_cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if is_cuda else (lambda: None)
    teacher = ctx["teacher"]
    set_seed(tcfg.seed)
    student = build_mlm_model(args.student_layers, args.student_hidden, args.student_heads, args,
                              ctx["tokenizer"]).to(device)
    params = list(student.parameters())
    if codir:
        proj_s = torch.nn.Linear(args.student_layers * args.student_hidden, mcfg.projection_dim).to(device)
        proj_t = torch.nn.Linear(args.teacher_layers * args.teacher_hidden, mcfg.projection_dim).to(device)
        params += list(proj_s.parameters()) + list(proj_t.parameters())
        bank = F.normalize(torch.randn(args.num_examples, mcfg.projection_dim,
                                       generator=torch.Generator().manual_seed(tcfg.seed)), dim=1).to(device)
    opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    half = dtype in (torch.float16, torch.bfloat16)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    accum = ctx["ds"]["gradient_accumulation_steps"]
    sampler = OwnedShardSampler(args.num_examples, args.micro_batch, 0, 1, tcfg.seed)
    batches = micro_batches(sampler)
    tok, ordinary = ctx["tokenizer"], collator.replacements
    gen = torch.Generator().manual_seed(tcfg.seed)
    neg_gen = torch.Generator().manual_seed(tcfg.seed + 7)
    rho, tau = mcfg.kd_temperature, mcfg.crd_temperature

    def block() -> torch.Tensor:
        body = ordinary[torch.randint(len(ordinary), (args.seq_len - 2,), generator=gen)]
        return torch.cat([torch.tensor([tok.cls_token_id]), body, torch.tensor([tok.sep_token_id])])

    def pooled(hidden_states, mask):
        m = mask.unsqueeze(-1).float()
        return torch.cat([(h.float() * m).sum(1) / m.sum(1) for h in hidden_states[1:]], dim=-1)

    step_times, tokens, last_loss = [], 0, float("nan")
    if is_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    student.train()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            tokens = 0
        sync()
        t_step = time.perf_counter()
        for _ in range(accum):
            epoch, ids = next(batches)
            host = collator([block() for _ in ids.tolist()], ids, epoch)
            batch = {k: v.to(device) for k, v in host.items()}
            tokens += int(host["attention_mask"].sum())
            masked = batch["labels"] != -100
            with torch.autocast(device.type, dtype=dtype, enabled=half):
                with torch.no_grad():
                    t_out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    output_hidden_states=codir)
                s_out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                output_hidden_states=codir)
            s_logits, t_logits = s_out.logits[masked].float(), t_out.logits[masked].float()
            loss = F.cross_entropy(s_logits, batch["labels"][masked])
            kd = F.kl_div(F.log_softmax(s_logits / rho, -1), F.softmax(t_logits / rho, -1), reduction="batchmean")
            loss = loss + mcfg.alpha_kd * kd * rho ** 2
            if codir:
                h_s = F.normalize(proj_s(pooled(s_out.hidden_states, batch["attention_mask"])), dim=1)
                h_t = F.normalize(proj_t(pooled(t_out.hidden_states, batch["attention_mask"])), dim=1)
                idx = torch.cat([batch["ids"].unsqueeze(1),
                                 torch.randint(args.num_examples, (len(ids), args.num_negatives),
                                               generator=neg_gen).to(device)], dim=1)
                weights = bank[idx].clone()                       # [B, K+1, m] per-anchor copy
                weights[:, 0] = h_s                               # the positive: the student's own feature
                scores = torch.bmm(weights, h_t.unsqueeze(2)).squeeze(2) / tau
                crd = F.cross_entropy(scores, torch.zeros(len(ids), dtype=torch.long, device=device))
                loss = loss + mcfg.alpha_crd * crd
            scaler.scale(loss / accum).backward()
            if codir:
                with torch.no_grad():
                    rows = batch["ids"]
                    bank[rows] = F.normalize(mcfg.bank_momentum * bank[rows] + (1 - mcfg.bank_momentum) * h_s, dim=1)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sync()
        if step >= args.warmup:
            step_times.append(time.perf_counter() - t_step)
        last_loss = float(loss)
    elapsed = sum(step_times)
    n_student = non_embedding_params(student)
    flops_per_token = 2 * ctx["teacher_params"] + 6 * n_student
    tokens_per_s = tokens / elapsed
    peak_mem = (torch.cuda.max_memory_allocated(device) if is_cuda
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result = {
        "samples_per_second": len(step_times) * ctx["ds"]["train_batch_size"] / elapsed,
        "tokens_per_second": tokens_per_s,
        "step_time_mean_s": statistics.fmean(step_times),
        "step_time_median_s": statistics.median(step_times),
        "timed_steps": len(step_times),
        "final_loss": last_loss,
        "flops_per_token": flops_per_token,
        "achieved_tflops": flops_per_token * tokens_per_s / 1e12,
        "mfu": flops_per_token * tokens_per_s / (ctx["peak_tflops"] * 1e12),
        "peak_memory_bytes": int(peak_mem),
        "negatives_copy_bytes_per_micro_step": (args.micro_batch * (args.num_negatives + 1) * PROJECTION_DIM * 4
                                                if codir else 0),
    }
    del student, opt, params
    gc.collect()
    if is_cuda:
        torch.cuda.empty_cache()
    return result


def time_crd_loss(crd_loss_shared, crd_inputs, candidates, tau: float, sync) -> float:
    """Forward + backward of the CRD term alone on one micro step's (detached) inputs, in seconds.

    It is part of ``student_forward_backward`` in the step; measured again here, outside the
    step's time, because autograd runs it interleaved with the rest of the loss.
    """
    h_t, h_s, exclude = crd_inputs
    h_t = h_t.clone().requires_grad_(True)
    h_s = h_s.clone().requires_grad_(True)
    sync()
    t = time.perf_counter()
    loss, _, _ = crd_loss_shared(h_t, h_s, candidates, exclude, tau)
    loss.backward()
    sync()
    return time.perf_counter() - t


# ----------------------------------------------------------------------------- main

def run(args) -> Optional[dict]:
    import torch
    if args.precision == "fp16" and not torch.cuda.is_available():
        raise BenchError("--precision fp16 is not supported on CPU (no CUDA device): use --precision bf16 or fp32")
    from codir_ds.cli import quiet_environment
    quiet_environment()
    _set_process_defaults()

    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from codir_ds.assets import minilm_dir
    from codir_ds.config import MethodConfig
    from codir_ds.data.mlm import MLMCollator
    from codir_ds.engine.session import dist_env, init_distributed
    from codir_ds.models.loading import load_tokenizer

    rank, local_rank, world = dist_env()
    ds, dtype, tcfg = ds_config_for(args, world)
    tokenizer = load_tokenizer(minilm_dir())
    if args.vocab < len(tokenizer):
        raise BenchError(f"--vocab {args.vocab} is smaller than the tokenizer's {len(tokenizer)} tokens: "
                         f"use --vocab {len(tokenizer)} or more")
    if args.num_examples // world < args.micro_batch:
        raise BenchError(f"--num_examples {args.num_examples} gives each of {world} ranks fewer ids than "
                         f"--micro_batch {args.micro_batch}: raise --num_examples")
    init_distributed()
    if torch.cuda.is_available():
        get_accelerator().set_device(local_rank)
    device = torch.device(get_accelerator().current_device_name())

    peak, peak_source = peak_tflops(args, dtype, device) if rank == 0 else (0.0, "")
    if world > 1:  # every rank computes MFU with rank 0's peak
        box = [peak, peak_source]
        dist.broadcast_object_list(box, src=0)
        peak, peak_source = box

    teacher, n_teacher = None, 0
    if any(o != "mlm" for o in args.objectives):
        torch.manual_seed(tcfg.seed + 1)
        teacher = build_mlm_model(args.teacher_layers, args.teacher_hidden, args.teacher_heads, args, tokenizer)
        teacher.requires_grad_(False)
        teacher.eval()
        teacher.to(device=device, dtype=dtype)
        n_teacher = non_embedding_params(teacher)

    ctx = {"rank": rank, "world": world, "device": device, "dtype": dtype, "ds": ds, "tcfg": tcfg,
           "tokenizer": tokenizer, "collator": MLMCollator(tokenizer, MethodConfig().mlm_probability, seed=tcfg.seed),
           "teacher": teacher, "teacher_params": n_teacher, "peak_tflops": peak}
    results = {}
    for name in args.objectives:
        if rank == 0:
            print(f"bench: {name} ({args.warmup} warm-up + {args.steps} timed steps)", file=sys.stderr, flush=True)
        results[name] = (bench_reference if name in REFERENCE_NAMES else bench_objective)(name, args, ctx)
    # Side by side: codir-ds over the plain reference (>1: codir-ds is faster), and codir's cost over kd.
    ratios = {}
    for ours in ("kd", "codir"):
        if ours in results and f"ref_{ours}" in results:
            ratios[f"{ours}_over_ref_{ours}"] = (results[ours]["samples_per_second"]
                                                 / results[f"ref_{ours}"]["samples_per_second"])
    if "kd" in results and "codir" in results:
        ratios["codir_step_time_over_kd"] = results["codir"]["step_time_mean_s"] / results["kd"]["step_time_mean_s"]

    import transformers
    report = {
        "benchmark": "codir-ds pre-training throughput (bench/throughput.py)",
        "config": {
            "teacher": {"layers": args.teacher_layers, "hidden": args.teacher_hidden, "heads": args.teacher_heads,
                        "intermediate": 4 * args.teacher_hidden, "non_embedding_params": n_teacher},
            "student": {"layers": args.student_layers, "hidden": args.student_hidden, "heads": args.student_heads,
                        "intermediate": 4 * args.student_hidden},
            "vocab": args.vocab, "seq_len": args.seq_len, "precision": args.precision,
            "micro_batch": ds["train_micro_batch_size_per_gpu"], "grad_accum": ds["gradient_accumulation_steps"],
            "world_size": world, "train_batch_size": ds["train_batch_size"],
            "steps": args.steps, "warmup": args.warmup, "objectives": args.objectives,
            "num_examples": args.num_examples, "num_negatives": args.num_negatives,
            "projection_dim": PROJECTION_DIM, "bank_momentum": BANK_MOMENTUM,
            "deepspeed_config": os.path.relpath(os.path.abspath(args.deepspeed_config), REPO),
            "zero_stage": ds.get("zero_optimization", {}).get("stage", 0),
            "breakdown_timing": not args.no_breakdown,
            "device": device_name(), "device_type": device.type,
            "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__, "deepspeed_version": deepspeed.__version__,
            "transformers_version": transformers.__version__, "python_version": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([os.path.relpath(sys.argv[0], REPO) if sys.argv[0] else ""] + sys.argv[1:]),
        },
        "peak_tflops": peak,
        "peak_source": peak_source,
        "results": results,
        "ratios": ratios,
    }
    return report if rank == 0 else None


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
        text = json.dumps(report, indent=2)
        if args.output:
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "w") as f:
                f.write(text + "\n")
        os.write(json_fd, (text + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
