"""Finetuning-stage distillation (CoDIR-Fine, KD, CE) on a DeepSpeed engine.

``run_finetune`` is the whole recipe; the loop in ``_train`` reads top to bottom:
teacher forward, student forward, negatives, loss terms, backward, step, bank
update, log, evaluate, checkpoint.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from codir_ds.config import FINETUNE_OBJECTIVES, ExperimentConfig
from codir_ds.data.collate import ClassificationCollator, to_device, token_lengths
from codir_ds.data.tasks import Example, TaskData, load_supplementary, load_task
from codir_ds.distill.heads import DistillationModule, build_ild_spec
from codir_ds.distill.ild import consistency_weight, mixup_draw
from codir_ds.distill.memory_bank import derive_seed
from codir_ds.distill.memory_bank import ShardedMemoryBank
from codir_ds.distill.negatives import LabelNegativeSampler
from codir_ds.distill.objectives import build_objective
from codir_ds.engine.ds_config import prepare_ds_config, read_ds_config
from codir_ds.engine.evaluation import evaluate
from codir_ds.engine.faults import check_fault_spec
from codir_ds.engine.monitor import Monitor
from codir_ds.engine.rundir import check_run_dir
from codir_ds.engine.session import (after_step, apply_bank_updates, check_skipped, check_student_options,
                                     compile_engine, dist_env, engine_config, export_engine_student, init_distributed,
                                     open_run_dir, optimizer_and_schedule, resume_latest, resume_plan,
                                     sampler_and_steps, save_run_checkpoint, set_seed, stop_early)
from codir_ds.engine.teacher import TeacherRunner
from codir_ds.engine.teacher_cache import CACHE_DIR, TeacherCache
from codir_ds.errors import CodirError
from codir_ds.assets import sha256_file
from codir_ds.models.loading import (WEIGHTS, build_student, check_same_vocab, hidden_size, load_teacher,
                                     load_tokenizer, model_dir, resolve_layers, tokenizer_dir)


def contrast_labels(task: TaskData, bins: int) -> torch.Tensor:
    """Labels that define CRD negatives: class ids, or equal-frequency target bins for regression."""
    values = torch.tensor([ex.label for ex in task.train], dtype=torch.float64)
    if not task.is_regression:
        return values.long()
    edges = torch.quantile(values, torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1])
    return torch.bucketize(values, edges).long()


@dataclass
class Prepared:
    """Everything checked and loaded before DeepSpeed starts."""
    cfg: ExperimentConfig
    ds: dict
    dtype: torch.dtype
    warning: Optional[str]
    task: TaskData
    tokenizer: object
    teacher_dir: Optional[Path]
    run_dir: Path
    mode: str
    universal: bool  # resuming a ZeRO checkpoint written by another number of ranks
    supplementary: list[Example]  # CR-ILD's extra ILD inputs (data.supplementary), ids < 0


class EMA:
    """Exponential moving average of the student's weights (CR-ILD's optional consistency targets).

    Every rank holds the same copy (data-parallel weights are identical after a step); it is
    updated after each applied optimizer step and saved in the per-rank checkpoint files.
    """

    def __init__(self, student: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(student).requires_grad_(False)

    @torch.no_grad()
    def update(self, student: torch.nn.Module) -> None:
        for e, p in zip(self.model.parameters(), student.parameters(), strict=True):
            e.mul_(self.decay).add_(p.detach().to(e.dtype), alpha=1.0 - self.decay)

    def state_dict(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


def prepare(cfg: ExperimentConfig, ds_config_path: str, output_dir: str, resume: bool, overwrite: bool) -> Prepared:
    """Every check that can fail on bad input, in cheap-to-expensive order. Writes nothing."""
    rank, _, world = dist_env()
    if cfg.method.name not in FINETUNE_OBJECTIVES:
        raise CodirError(f"method.name={cfg.method.name} is not a finetuning objective: use one of "
                         f"{', '.join(FINETUNE_OBJECTIVES)} here, or launchers/pretrain.py for pre-training")
    check_fault_spec()
    run_dir = Path(output_dir)
    mode = check_run_dir(run_dir, cfg.to_dict(), resume, overwrite)
    universal = mode == "resume" and resume_plan(run_dir / "checkpoints", world) == "universal"
    ds, dtype, warning = prepare_ds_config(read_ds_config(ds_config_path), world, cfg.training)
    check_student_options(cfg.training, ds)
    task = load_task(cfg.data)
    micro = ds["train_micro_batch_size_per_gpu"]
    if len(task.train) < micro * world:
        raise CodirError(f"the training set has {len(task.train)} examples, fewer than one global micro-batch "
                         f"({micro} x {world} ranks): lower the batch size or add data")
    teacher_dir = model_dir(cfg.model.teacher, "model.teacher") if cfg.model.teacher else None
    tokenizer = load_tokenizer(tokenizer_dir(cfg.model))
    objective = build_objective(cfg.method)
    if objective.uses_teacher:
        check_same_vocab(tokenizer, teacher_dir, "model.teacher")
    supplementary = load_supplementary(cfg.data, task)
    if cfg.method.name == "cr_ild" and cfg.method.consistency_ema > 0 and ds.get("zero_optimization", {}).get("stage", 0) == 3:
        raise CodirError("method.consistency_ema keeps a full copy of the student, which ZeRO-3 partitions: use "
                         "ds_configs/zero2.json or set method.consistency_ema=0")
    return Prepared(cfg, ds, dtype, warning, task, tokenizer, teacher_dir, run_dir, mode, universal, supplementary)


def run_finetune(cfg: ExperimentConfig, ds_config_path: str, output_dir: str, resume: bool = False,
                 overwrite: bool = False, probe: Optional[Callable[[str, dict], None]] = None) -> dict:
    """Check everything, start DeepSpeed, train, evaluate, export. Returns results.json's content.

    ``probe(event, objects)``, for tests and debugging tools, is called with event
    ``"setup"`` once the engine exists and ``"done"`` after training; ``objects`` holds
    the live ``engine``, ``optimizer``, ``teacher``, ``bank`` and ``sampler``.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if cfg.method.name == "ctcd":  # two trainable models, two engines: its own loop
        from codir_ds.engine.cotrain import run_cotrain
        return run_cotrain(cfg, ds_config_path, output_dir, "finetune", resume, overwrite, probe)
    p = prepare(cfg, ds_config_path, output_dir, resume, overwrite)
    rank, _, world = dist_env()
    tcfg, mcfg = cfg.training, cfg.method
    objective = build_objective(mcfg)
    task = p.task
    # Teacher (checksum, classification head) and student are loaded before any state is written.
    teacher = (load_teacher(str(p.teacher_dir), task.num_labels, p.dtype, cfg.model.teacher_sha256)
               if objective.uses_teacher else None)

    set_seed(tcfg.seed)  # identical student / head initialisation on every rank
    student = build_student(cfg.model, task.num_labels, task.is_regression, p.tokenizer,
                            template_dir=p.teacher_dir)
    s_layers = resolve_layers(mcfg.student_layers, student, "method.student_layers")
    t_layers = resolve_layers(mcfg.teacher_layers, teacher, "method.teacher_layers") if teacher is not None else None
    ild_spec = build_ild_spec(objective, mcfg, student, teacher)
    module = DistillationModule(
        student, s_layers, mcfg.pooling,
        teacher_dim=len(t_layers) * hidden_size(teacher) if objective.uses_crd else None,
        projection_dim=mcfg.projection_dim if objective.uses_crd else None,
        ild_spec=ild_spec, teacher_width=hidden_size(teacher) if ild_spec is not None else None)
    ema = EMA(student, mcfg.consistency_ema) if ild_spec is not None and ild_spec.consistency and \
        mcfg.consistency_ema > 0 else None

    init_distributed()
    device = torch.device(get_accelerator().current_device_name())
    open_run_dir(p.run_dir, p.mode, cfg, p.ds, rank, p.warning)

    accum = p.ds["gradient_accumulation_steps"]
    lengths = (token_lengths(p.tokenizer, task.train, cfg.data.max_length) if cfg.data.group_by_length else None)
    sampler, total_steps = sampler_and_steps(len(task.train), p.ds, rank, world, tcfg, lengths,
                                             cfg.data.group_window)
    opt, sched = optimizer_and_schedule(module, tcfg, total_steps, p.ds)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched,
                                                      config=engine_config(p.ds, p.universal))
    if tcfg.compile:
        compile_engine(engine, ema.model if ema is not None else None)

    runner = None
    if teacher is not None:
        teacher.to(device)
        runner = TeacherRunner(teacher, t_layers if objective.uses_crd else None, mcfg.pooling, ild_spec)
    if ema is not None:
        ema.model.to(device=device, dtype=p.dtype)
    bank = neg_sampler = None
    labels_for_negatives = None
    if objective.uses_crd:
        bank = ShardedMemoryBank(len(task.train), mcfg.projection_dim, mcfg.bank_momentum, seed=tcfg.seed).to(device)
        labels_for_negatives = contrast_labels(task, mcfg.regression_bins)
        neg_sampler = LabelNegativeSampler(labels_for_negatives, mcfg.num_negatives, seed=tcfg.seed)

    cache = None
    if tcfg.teacher_cache:
        meta = {"teacher": str(p.teacher_dir), "teacher_sha256": sha256_file(p.teacher_dir / WEIGHTS),
                "task": task.name, "num_examples": len(task.train), "max_length": cfg.data.max_length,
                "teacher_layers": t_layers if objective.uses_crd else None, "pooling": mcfg.pooling,
                "dtype": str(p.dtype)}
        cache = TeacherCache(p.run_dir / CACHE_DIR, rank, len(task.train), task.num_labels,
                             len(t_layers) * hidden_size(teacher) if objective.uses_crd else None, meta)

    state = {"micro_step": 0, "best": None, "history": [], "consecutive_skips": 0}
    ckpt_root = p.run_dir / "checkpoints"
    extras = {"ema": ema} if ema is not None else {}
    if p.mode == "resume":
        state.update(resume_latest(engine, ckpt_root, rank, world, sampler, bank, tcfg.seed, extras))
    else:
        set_seed(tcfg.seed * 1000 + rank)  # dropout differs across ranks
    # CR-ILD: the first ild_steps optimizer steps are the ILD stage, the rest prediction-layer KD.
    ild_steps = round(mcfg.ild_fraction * total_steps) if mcfg.name == "cr_ild" else 0

    collator = ClassificationCollator(p.tokenizer, cfg.data.max_length, task.is_regression)
    if rank == 0:
        print(f"{mcfg.name}: {len(task.train)} train / {len(task.validation)} validation examples, "
              f"{world} rank(s), batch {p.ds['train_batch_size']} (micro {p.ds['train_micro_batch_size_per_gpu']} x "
              f"accumulation {accum}), {total_steps} steps, precision {str(p.dtype).replace('torch.', '')}",
              flush=True)
    monitor = Monitor(p.run_dir, rank == 0, cfg.logging.tensorboard, cfg.logging.progress_bar, total_steps,
                      initial_step=engine.global_steps, desc=f"{mcfg.name}")

    def forward_logits(batch):
        return engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      token_type_ids=batch.get("token_type_ids"))["logits"]

    def run_eval(step: int) -> dict:
        engine.eval()
        metrics = evaluate(forward_logits, task.validation, collator, tcfg.eval_batch_size, device,
                           task.metric_names, rank, world)
        engine.train()
        main = task.metric_names[0]
        monitor.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
        monitor.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        state["history"].append({"step": step, **metrics})
        if state["best"] is None or metrics[main] > state["best"][main]:
            state["best"] = {"step": step, **metrics}
            export_engine_student(engine, p.tokenizer, p.run_dir / "export", rank,
                                  {"task": task.name, "label_names": task.label_names, "method": mcfg.name,
                                   "step": step, **{f"validation_{k}": v for k, v in metrics.items()}})
        return metrics

    def save(step: int) -> None:
        if cache is not None:
            cache.flush()
        save_run_checkpoint(engine, ckpt_root, step, state, rank, world, sampler, bank, tcfg.keep_checkpoints,
                            extras)

    objects = {"engine": engine, "optimizer": ds_optimizer, "teacher": teacher, "bank": bank, "sampler": sampler}
    if probe is not None:
        probe("setup", objects)
    t_start = time.perf_counter()
    start_step = engine.global_steps
    step = engine.global_steps
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # bank updates wait for the optimizer step
    class_negatives = None  # [C, K, m] bank rows, fetched once per optimizer step
    stopped_early = False
    engine.train()
    while step < total_steps:
        for ids in sampler:
            stage = "ild" if step < ild_steps else "kd"
            examples = [task.train[i] for i in ids.tolist()]
            mix = None
            if stage == "ild":  # CR-ILD: supplementary inputs join the batch, embeddings are mixed
                micro_seed = derive_seed(tcfg.seed, rank, state["micro_step"])
                if p.supplementary:
                    pick = torch.randint(len(p.supplementary), (len(examples),),
                                         generator=torch.Generator().manual_seed(micro_seed))
                    examples = examples + [p.supplementary[i] for i in pick.tolist()]
                mix = mixup_draw(mcfg.mixup_alpha, len(examples), micro_seed)
            batch = to_device(collator(examples), device)
            use_ild = ild_spec is not None and (mcfg.name != "cr_ild" or stage == "ild")
            t_out = cache.lookup(ids, device) if cache is not None else None
            if t_out is None and runner is not None:
                t_out = runner(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                               ild=use_ild, mix=mix)
                if cache is not None:
                    cache.store(ids, t_out)
            out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch.get("token_type_ids"),
                         teacher_features=t_out.features if t_out is not None else None,
                         ild=use_ild, mix=mix, clean_model=ema.model if ema is not None else None)
            ild = None
            if use_ild:
                ild = {**out["ild"], **{k: v for k, v in t_out.ild.items() if k != "mask"},
                       "cons_weight": consistency_weight(step, ild_steps, mcfg.consistency_ramp,
                                                         mcfg.alpha_consistency)}
            classes = None
            if objective.uses_crd:
                if class_negatives is None:  # collective, first micro step of an optimizer step
                    class_negatives = neg_sampler.class_negatives(bank, step)
                classes = labels_for_negatives[ids]
            total, terms = objective(out["logits"], batch["labels"], task.is_regression,
                                     teacher_logits=t_out.logits if t_out is not None else None,
                                     h_t=out.get("h_t"), h_s=out.get("h_s"), ild=ild, stage=stage,
                                     class_negatives=class_negatives, classes=classes)
            engine.backward(total)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            state["micro_step"] += 1
            if bank is not None:
                pending.append((ids, out["h_s"].detach()))
            monitor.accumulate(terms, len(ids) * world)
            if not boundary:
                continue
            apply_bank_updates(bank, engine, pending, device, routed=tcfg.deterministic)
            if ema is not None and step < ild_steps and engine.was_step_applied():
                ema.update(engine.module.student)
            class_negatives = None
            step += 1
            check_skipped(engine, state, tcfg.max_consecutive_skips, step)
            if after_step(step, total_steps, engine, cfg, p.dtype, monitor, run_eval, save):
                stopped_early = True
                break
            if step >= total_steps:
                break
        else:
            sampler.set_epoch(sampler.epoch + 1)
            continue
        break

    if probe is not None:
        probe("done", objects)
    if stopped_early:
        return stop_early(step, rank, monitor)

    final = run_eval(step)
    save(step)
    elapsed = time.perf_counter() - t_start
    results = {
        "task": task.name, "method": mcfg.name, "seed": tcfg.seed, "world_size": world,
        "precision": str(p.dtype).replace("torch.", ""), "steps": step,
        "train_batch_size": p.ds["train_batch_size"], "num_train_examples": len(task.train),
        "num_validation_examples": len(task.validation), "main_metric": task.metric_names[0],
        "final": final, "best": state["best"], "history": state["history"],
        "train_seconds_this_session": round(elapsed, 2),
        "samples_per_second": round((step - start_step) * p.ds["train_batch_size"] / max(elapsed, 1e-9), 2),
        "export_dir": str(p.run_dir / "export"),
    }
    if cache is not None:  # this rank's (rank 0's) counts: micro-batches served from the cache, disk used
        results["teacher_cache"] = {"hit_batches": cache.hits, "miss_batches": cache.misses,
                                    "disk_bytes_rank0": cache.disk_bytes()}
    if rank == 0:
        (p.run_dir / "results.json").write_text(json.dumps(results, indent=2))
    monitor.close()
    dist.barrier()
    return results

