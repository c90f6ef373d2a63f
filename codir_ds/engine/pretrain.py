"""Pre-training distillation (MLM-Pre, KD-Pre, CoDIR-Pre) on a DeepSpeed engine.

``run_pretrain`` is the recipe; one optimizer step of the loop in it reads:

1. take this rank's ``accumulation`` micro-batches of block ids from the sampler;
2. CoDIR only: all-gather every rank's ids -> the global mini-batch, and read its
   bank rows with one collective ``bank.gather`` (the in-batch negatives, shared by
   every micro step of this optimizer step);
3. per micro step: dynamic masking, teacher forward under inference mode (MLM logits
   at masked positions, pooled layers), student forward, loss terms, backward, step;
4. after the optimizer step (and only if it was applied): the positives' bank rows
   get the momentum update, locally on their owner rank;
5. log, evaluate held-out MLM loss/accuracy, checkpoint.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from codir_ds.config import PRETRAIN_OBJECTIVES, ExperimentConfig
from codir_ds.data.corpus import PackedCorpus, load_corpus
from codir_ds.data.collate import to_device
from codir_ds.data.mlm import MLMCollator
from codir_ds.distill.heads import PretrainModule, build_ild_spec
from codir_ds.distill.memory_bank import ShardedMemoryBank, derive_seed
from codir_ds.distill.objectives import build_pretrain_objective
from codir_ds.engine.ds_config import prepare_ds_config, read_ds_config
from codir_ds.engine.faults import check_fault_spec
from codir_ds.engine.monitor import Monitor
from codir_ds.engine.rundir import check_run_dir
from codir_ds.engine.session import (after_step, apply_bank_updates, check_skipped, check_student_options,
                                     compile_engine, dist_env, engine_config, export_engine_student, host_group,
                                     init_distributed, open_run_dir, optimizer_and_schedule, resume_latest,
                                     resume_plan, sampler_and_steps, save_run_checkpoint, set_seed, stop_early)
from codir_ds.engine.teacher import MLMTeacherRunner
from codir_ds.errors import CodirError
from codir_ds.models.loading import (build_student, check_same_vocab, hidden_size, load_tokenizer, model_dir,
                                     resolve_layers, tokenizer_dir, verify_weights)
from codir_ds.models.mlm import load_mlm_teacher, masked_rows


@dataclass
class PreparedPretrain:
    """Everything checked and loaded before DeepSpeed starts."""
    ds: dict
    dtype: torch.dtype
    warning: Optional[str]
    corpus: PackedCorpus
    tokenizer: object
    teacher_dir: Optional[Path]
    run_dir: Path
    mode: str
    universal: bool  # resuming a ZeRO checkpoint written by another number of ranks


def position_limit(config) -> int:
    """Longest sequence a model's position embeddings allow (RoBERTa-style models reserve 2)."""
    offset = 2 if config.model_type in ("roberta", "xlm-roberta", "camembert", "longformer") else 0
    return int(getattr(config, "max_position_embeddings", 512)) - offset


def prepare_pretrain(cfg: ExperimentConfig, ds_config_path: str, output_dir: str, resume: bool,
                     overwrite: bool) -> PreparedPretrain:
    """Every check that can fail on bad input, cheap ones first. Writes nothing to the run directory."""
    from transformers import AutoConfig
    rank, _, world = dist_env()
    if cfg.method.name not in PRETRAIN_OBJECTIVES:
        raise CodirError(f"method.name={cfg.method.name} is not a pre-training objective: use one of "
                         f"{', '.join(PRETRAIN_OBJECTIVES)} here, or launchers/finetune.py for finetuning")
    objective = build_pretrain_objective(cfg.method)
    check_fault_spec()
    run_dir = Path(output_dir)
    mode = check_run_dir(run_dir, cfg.to_dict(), resume, overwrite)
    universal = mode == "resume" and resume_plan(run_dir / "checkpoints", world) == "universal"
    ds, dtype, warning = prepare_ds_config(read_ds_config(ds_config_path), world, cfg.training)
    check_student_options(cfg.training, ds)
    teacher_dir = model_dir(cfg.model.teacher, "model.teacher") if cfg.model.teacher else None
    if objective.uses_teacher and teacher_dir is None:
        raise CodirError(f"method.name={cfg.method.name} needs a teacher: set model.teacher")
    if objective.uses_teacher:  # before the corpus is tokenized, which can take long
        verify_weights(teacher_dir, cfg.model.teacher_sha256, "model.teacher")
    tokenizer = load_tokenizer(tokenizer_dir(cfg.model))
    if teacher_dir is not None:
        check_same_vocab(tokenizer, teacher_dir, "model.teacher")
        limit = position_limit(AutoConfig.from_pretrained(str(teacher_dir)))
        if cfg.corpus.block_size > limit:
            raise CodirError(f"corpus.block_size {cfg.corpus.block_size} exceeds the teacher's {limit} positions: "
                             f"lower corpus.block_size")
    corpus = load_corpus(cfg.corpus, tokenizer, verbose=rank == 0)
    micro = ds["train_micro_batch_size_per_gpu"]
    if len(corpus.train_ids) // world < micro:
        raise CodirError(f"the corpus has {len(corpus.train_ids)} training blocks, fewer than one global micro-batch "
                         f"({micro} x {world} ranks): add text, lower corpus.block_size or the batch size")
    return PreparedPretrain(ds, dtype, warning, corpus, tokenizer, teacher_dir, run_dir, mode, universal)


def build_pretrain_module(student, teacher, mcfg, objective) -> tuple[PretrainModule, Optional[list[int]]]:
    """The module DeepSpeed trains (student + CRD heads when the objective contrasts) and the teacher layers."""
    s_layers = resolve_layers(mcfg.student_layers, student, "method.student_layers")
    t_layers = resolve_layers(mcfg.teacher_layers, teacher, "method.teacher_layers") if objective.uses_crd else None
    ild_spec = build_ild_spec(objective, mcfg, student, teacher)
    module = PretrainModule(
        student, s_layers, mcfg.pooling,
        teacher_dim=len(t_layers) * hidden_size(teacher) if objective.uses_crd else None,
        projection_dim=mcfg.projection_dim if objective.uses_crd else None,
        ild_spec=ild_spec, teacher_width=hidden_size(teacher) if ild_spec is not None else None)
    return module, t_layers


def micro_batches(sampler) -> Iterator[tuple[int, torch.Tensor]]:
    """``(epoch, ids)`` forever, from the sampler's current position (resume-aware)."""
    while True:
        for ids in sampler:
            yield sampler.epoch, ids
        sampler.set_epoch(sampler.epoch + 1)


def batch_negatives(local_ids: torch.Tensor, num_negatives: int, seed: int, step: int,
                    world: int, device=None, group=None) -> torch.Tensor:
    """Ids of the global mini-batch whose bank rows are this step's negatives. COLLECTIVE.

    Every rank contributes the ids of all its micro-batches of this optimizer step; the
    result is identical on every rank. When the global batch has more than
    ``num_negatives + 1`` examples, a subset of that size (seeded by ``(seed, step)``, so
    no communication is needed to agree on it) is used. Each anchor's own row is excluded
    later, so every anchor is contrasted with ``min(num_negatives, G - 1)`` negatives
    (one more when it is not in the sampled subset). The ids come back on the CPU. With
    ``group`` (a gloo group, :func:`~codir_ds.engine.session.host_group`) the all-gather runs
    on the host ids: no host-device sync. Without it, it runs on ``device`` (NCCL needs
    accelerator tensors) and the copy back to the CPU waits for the device.
    """
    if world > 1:
        local = local_ids.cpu() if group is not None else local_ids.to(device or "cpu")
        out = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(out, local, group=group)
        ids = torch.cat(out).cpu()
    else:
        ids = local_ids
    ids = torch.sort(ids).values  # the same set gives the same subset whatever the rank layout
    if ids.numel() > num_negatives + 1:
        g = torch.Generator().manual_seed(derive_seed(seed, step, 7))
        ids = ids[torch.randperm(ids.numel(), generator=g)[: num_negatives + 1]]
    return ids


def self_mask(anchor_ids: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
    """``[B, G]`` True where candidate g is anchor b's own example: a positive is never its own negative."""
    return anchor_ids.to(candidate_ids.device)[:, None] == candidate_ids[None, :]


@torch.no_grad()
def evaluate_mlm(forward: Callable[[dict], torch.Tensor], corpus: PackedCorpus, collator: MLMCollator,
                 batch_size: int, device, rank: int = 0, world: int = 1) -> dict[str, float]:
    """Held-out masked-LM loss, accuracy and perplexity (fixed masks). Collective.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters during
    forward); rows added for padding have no labels and count for nothing.
    """
    ids = list(corpus.validation_ids)
    if not ids:
        return {}
    mine = ids[rank::world]
    per_rank = math.ceil(len(ids) / world)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count (all-reduced on device)
    for start in range(0, per_rank, batch_size):
        chunk = mine[start:start + batch_size]
        padding = min(batch_size, per_rank - start) - len(chunk)
        chunk_ids = chunk + [ids[0]] * padding
        batch = collator([corpus[i] for i in chunk_ids], chunk_ids, epoch=0)
        if padding:
            batch["labels"][len(chunk):] = -100
        batch = {k: v.to(device) for k, v in batch.items()}
        rows = masked_rows(batch["labels"])
        logits = forward({**batch, "rows": rows}).float()
        labels = batch["labels"].reshape(-1)[rows]
        if labels.numel():
            sums[0] += torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
            sums[1] += (logits.argmax(-1) == labels).sum()
            sums[2] += labels.numel()
    if world > 1:
        dist.all_reduce(sums)
    loss_sum, correct, count = sums.tolist()
    loss = loss_sum / max(count, 1.0)
    return {"mlm_loss": loss, "mlm_accuracy": correct / max(count, 1.0),
            "perplexity": math.exp(min(loss, 50.0)), "masked_tokens": int(count)}


def run_pretrain(cfg: ExperimentConfig, ds_config_path: str, output_dir: str, resume: bool = False,
                 overwrite: bool = False, probe: Optional[Callable[[str, dict], None]] = None) -> dict:
    """Check everything, start DeepSpeed, pre-train, evaluate, export. Returns results.json's content.

    ``probe(event, objects)`` (tests, debugging) is called with ``"setup"`` once the engine
    exists and ``"done"`` after training, with the live ``engine``, ``teacher``, ``bank``,
    ``sampler`` and ``module``.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if cfg.method.name == "ctcd":  # two trainable models, two engines: its own loop
        from codir_ds.engine.cotrain import run_cotrain
        return run_cotrain(cfg, ds_config_path, output_dir, "pretrain", resume, overwrite, probe)
    p = prepare_pretrain(cfg, ds_config_path, output_dir, resume, overwrite)
    rank, _, world = dist_env()
    tcfg, mcfg = cfg.training, cfg.method
    objective = build_pretrain_objective(mcfg)
    corpus = p.corpus
    # Loading the teacher (checksum, MLM head) and the student: before any state is written.
    teacher = (load_mlm_teacher(str(p.teacher_dir), p.dtype, cfg.model.teacher_sha256,
                                need_head=objective.uses_teacher_logits) if objective.uses_teacher else None)

    set_seed(tcfg.seed)  # identical student / head initialisation on every rank
    student = build_student(cfg.model, 0, False, p.tokenizer, template_dir=p.teacher_dir, masked_lm=True)
    if cfg.corpus.block_size > position_limit(student.config):
        raise CodirError(f"corpus.block_size {cfg.corpus.block_size} exceeds the student's "
                         f"{position_limit(student.config)} positions: lower corpus.block_size")
    module, t_layers = build_pretrain_module(student, teacher, mcfg, objective)

    init_distributed()
    device = torch.device(get_accelerator().current_device_name())
    open_run_dir(p.run_dir, p.mode, cfg, p.ds, rank, p.warning)

    num_train = len(corpus.train_ids)  # training block ids are 0..num_train-1
    micro = p.ds["train_micro_batch_size_per_gpu"]
    accum = p.ds["gradient_accumulation_steps"]
    sampler, total_steps = sampler_and_steps(num_train, p.ds, rank, world, tcfg)
    opt, sched = optimizer_and_schedule(module, tcfg, total_steps, p.ds)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched,
                                           config=engine_config(p.ds, p.universal))
    if tcfg.compile:
        compile_engine(engine)

    runner = None
    if teacher is not None:
        teacher.to(device)
        runner = MLMTeacherRunner(teacher, t_layers, mcfg.pooling, logits=objective.uses_teacher_logits,
                                  ild_spec=module.ild_spec)
    bank = (ShardedMemoryBank(num_train, mcfg.projection_dim, mcfg.bank_momentum, seed=tcfg.seed).to(device)
            if objective.uses_crd else None)
    ids_group = host_group() if bank is not None else None  # the step's ids travel host to host (NCCL runs)

    state = {"history": [], "consecutive_skips": 0}
    ckpt_root = p.run_dir / "checkpoints"
    if p.mode == "resume":
        state.update(resume_latest(engine, ckpt_root, rank, world, sampler, bank, tcfg.seed))
    else:
        set_seed(tcfg.seed * 1000 + rank)  # dropout differs across ranks

    collator = MLMCollator(p.tokenizer, mcfg.mlm_probability, seed=tcfg.seed)
    if rank == 0:
        print(f"{mcfg.name} pre-training: {num_train} blocks of <= {corpus.block_size} tokens "
              f"({len(corpus.validation_ids)} held out), {world} rank(s), batch {p.ds['train_batch_size']} "
              f"(micro {micro} x accumulation {accum}), {total_steps} steps, "
              f"precision {str(p.dtype).replace('torch.', '')}", flush=True)
    monitor = Monitor(p.run_dir, rank == 0, cfg.logging.tensorboard, cfg.logging.progress_bar, total_steps,
                      initial_step=engine.global_steps, desc=f"{mcfg.name}-pre")

    def forward_logits(batch: dict) -> torch.Tensor:
        return engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], rows=batch["rows"])["logits"]

    def run_eval(step: int) -> dict:
        engine.eval()
        metrics = evaluate_mlm(forward_logits, corpus, collator, tcfg.eval_batch_size, device, rank, world)
        engine.train()
        if metrics:
            monitor.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
            monitor.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            state["history"].append({"step": step, **metrics})
        return metrics

    def save(step: int) -> None:
        save_run_checkpoint(engine, ckpt_root, step, state, rank, world, sampler, bank, tcfg.keep_checkpoints)

    if probe is not None:
        probe("setup", {"engine": engine, "teacher": teacher, "bank": bank, "sampler": sampler, "module": module})
    batches = micro_batches(sampler)
    t_start = time.perf_counter()
    start_step = step = engine.global_steps
    tokens = 0  # real tokens trained on, counted on the host side of the batch (no device sync)
    stopped_early = False
    engine.train()
    while step < total_steps:
        group = [next(batches) for _ in range(accum)]  # this rank's micro-batches of one optimizer step
        cand_ids = candidates = None
        if bank is not None:  # collective: the global mini-batch's bank rows, shared by its micro steps
            cand_ids = batch_negatives(torch.cat([ids for _, ids in group]), mcfg.num_negatives, tcfg.seed,
                                       step, world, device, ids_group)
            candidates = bank.gather(cand_ids)
            cand_ids = cand_ids.to(device, non_blocking=True)
        # Dynamic masking on the host, for the whole step: the MLM/KD terms are means over the
        # masked tokens of the GLOBAL batch (one all-reduce of the count, no host sync), so the
        # gradient does not depend on how tokens fall into micro-batches and ranks.
        hosts = [collator([corpus[i] for i in ids.tolist()], ids, epoch) for epoch, ids in group]
        row_sets = [masked_rows(h["labels"]) for h in hosts]  # host-side: nonzero() on a GPU would sync
        step_masked = torch.tensor(float(sum(len(r) for r in row_sets))).to(device, non_blocking=True)
        if world > 1:
            dist.all_reduce(step_masked)
        per_token = accum * world / step_masked.clamp(min=1.0)
        pending = []
        for host, rows, (epoch, ids) in zip(hosts, row_sets, group):
            labels = host["labels"].reshape(-1)[rows].to(device, non_blocking=True)
            tokens += int(host["attention_mask"].sum())
            token_scale = per_token * len(rows)
            rows = rows.to(device, non_blocking=True)
            batch = to_device(host, device)
            t_out = runner(batch["input_ids"], batch["attention_mask"], rows) if runner is not None else None
            out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], rows=rows,
                         teacher_features=t_out.features if t_out is not None else None,
                         ild=module.ild_spec is not None)
            ild = {**out["ild"], **{k: v for k, v in t_out.ild.items() if k != "mask"}} if "ild" in out else None
            exclude = self_mask(batch["ids"], cand_ids) if bank is not None else None
            total, terms = objective(out["logits"], labels,
                                     teacher_logits=t_out.logits if t_out is not None else None,
                                     h_t=out.get("h_t"), h_s=out.get("h_s"), candidates=candidates, exclude=exclude,
                                     token_scale=token_scale, ild=ild)
            engine.backward(total)
            engine.step()
            if bank is not None:
                pending.append((ids, out["h_s"].detach()))
            monitor.accumulate(terms, len(ids) * world)
        apply_bank_updates(bank, engine, pending, device, routed=tcfg.deterministic)
        step += 1
        check_skipped(engine, state, tcfg.max_consecutive_skips, step)
        if after_step(step, total_steps, engine, cfg, p.dtype, monitor, run_eval, save):
            stopped_early = True
            break

    if probe is not None:
        probe("done", {"engine": engine, "teacher": teacher, "bank": bank, "sampler": sampler, "module": module})
    if stopped_early:
        return stop_early(step, rank, monitor)

    final = run_eval(step)
    save(step)
    export_engine_student(engine, p.tokenizer, p.run_dir / "export", rank,
                          {"stage": "pretrain", "method": mcfg.name, "step": step,
                           **{f"validation_{k}": v for k, v in final.items()}})
    elapsed = time.perf_counter() - t_start
    if world > 1:
        total_tokens = torch.tensor(tokens, dtype=torch.long, device=device)
        dist.all_reduce(total_tokens)
        tokens = int(total_tokens)
    done = step - start_step
    results = {
        "stage": "pretrain", "method": mcfg.name, "seed": tcfg.seed, "world_size": world,
        "precision": str(p.dtype).replace("torch.", ""), "steps": step,
        "train_batch_size": p.ds["train_batch_size"], "block_size": corpus.block_size,
        "num_train_blocks": num_train, "num_validation_blocks": len(corpus.validation_ids),
        "corpus": str(corpus.path), "final": final, "history": state["history"],
        "train_seconds_this_session": round(elapsed, 2),
        "samples_per_second": round(done * p.ds["train_batch_size"] / max(elapsed, 1e-9), 2),
        "tokens_per_second": round(tokens / max(elapsed, 1e-9), 1),
        "export_dir": str(p.run_dir / "export"),
    }
    if rank == 0:
        (p.run_dir / "results.json").write_text(json.dumps(results, indent=2))
    monitor.close()
    dist.barrier()
    return results
