"""CTCD (Lee et al., 2023): co-training and co-distillation of a larger and a smaller model.

Both models are trainable, each in its own DeepSpeed engine with its own optimizer and
LR schedule (the same DeepSpeed JSON and training.* settings), and both see the same
batch. One optimizer step of ``run_cotrain`` reads:

1. take this rank's ``accumulation`` micro-batches from the sampler (pre-training: mask them
   and count the global batch's masked tokens, as ``run_pretrain`` does);
2. per micro step: forward the larger and the smaller model (and, one-way variant, the
   frozen teacher under inference mode), then
   ``L_large = L_task(large) + a_sl * KD(small -> large)`` and
   ``L_small = L_task(small) + a_ls * KD(large -> small)`` with every soft target detached,
   then ``backward`` and ``step`` of each engine;
3. log, evaluate both models, checkpoint both engines in one atomically published checkpoint.

The smaller model is the run's student (``model.*``): ``results.json``'s ``final``/``best``
and ``export/`` are its; the larger model's are under ``large`` and in ``export_large/``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from codir_ds.config import ExperimentConfig
from codir_ds.data.collate import ClassificationCollator, to_device, token_lengths
from codir_ds.data.mlm import MLMCollator
from codir_ds.distill.heads import DistillationModule, PretrainModule
from codir_ds.distill.losses import kd_loss
from codir_ds.distill.objectives import build_objective, build_pretrain_objective
from codir_ds.engine.evaluation import evaluate
from codir_ds.engine.finetune import prepare
from codir_ds.engine.monitor import Monitor
from codir_ds.engine.pretrain import position_limit, evaluate_mlm, micro_batches, prepare_pretrain
from codir_ds.engine.session import (after_step, check_skipped, compile_engine, dist_env, engine_config,
                                     export_engine_student, init_distributed, open_run_dir, optimizer_and_schedule,
                                     resume_latest, sampler_and_steps, save_run_checkpoint, set_seed, stop_early)
from codir_ds.engine.teacher import MLMTeacherRunner, TeacherRunner
from codir_ds.errors import CodirError
from codir_ds.models.loading import build_student, check_same_vocab, load_teacher, model_dir, resolve_layers
from codir_ds.models.mlm import load_mlm_teacher, masked_rows

LARGE = "large"  # the larger model's DeepSpeed tag inside each checkpoint folder: checkpoints/step_N/large/
EXPORT_LARGE = "export_large"


class CoDistillation:
    """CTCD's two losses from the two models' logits (and the frozen teacher's, one-way variant).

    ``L_large = L_task(large) + alpha_large * KD(target_large -> large)``, and the same for the
    smaller model, where the target is the other model's logits (mutual: ``alpha_large`` =
    ``alpha_small_to_large``, ``alpha_small`` = ``alpha_large_to_small``) or the teacher's
    (``ctcd_one_way``: both weights ``alpha_kd``). KD is ``kd_loss`` (times rho^2 with
    ``kd_t2_scale``) on class logits or masked-position vocabulary logits, and the MSE between
    predictions on regression tasks. Targets are always detached: neither model receives a
    gradient from the other's loss. L_task is the ``ce`` (finetuning) or ``mlm`` (pre-training)
    objective's.
    """

    def __init__(self, method_cfg, stage: str, is_regression: bool = False):
        self.stage = stage
        self.is_regression = is_regression
        self.one_way = method_cfg.ctcd_one_way
        self.temperature = method_cfg.kd_temperature
        self.t2_scale = method_cfg.kd_t2_scale
        if self.one_way:
            self.alpha_large = self.alpha_small = method_cfg.alpha_kd
        else:
            self.alpha_large = method_cfg.alpha_small_to_large
            self.alpha_small = method_cfg.alpha_large_to_small
        task_only = dataclasses.replace(method_cfg, name="ce" if stage == "finetune" else "mlm")
        self.task = build_objective(task_only) if stage == "finetune" else build_pretrain_objective(task_only)

    def soft_kd(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """KD of ``logits`` towards the detached ``target`` logits, fp32."""
        target = target.detach()
        if self.is_regression:
            return F.mse_loss(logits.float(), target.float())
        kd = kd_loss(logits, target, self.temperature)
        return kd * self.temperature ** 2 if self.t2_scale else kd

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor,
                  token_scale: Optional[torch.Tensor]) -> torch.Tensor:
        if self.stage == "finetune":
            return self.task(logits, labels, self.is_regression)[0]
        return self.task(logits, labels, token_scale=token_scale)[0]

    def __call__(self, large_logits: torch.Tensor, small_logits: torch.Tensor, labels: torch.Tensor,
                 teacher_logits: Optional[torch.Tensor] = None,
                 token_scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``(L_large, L_small, terms)``; ``terms`` holds detached fp32 scalars for logging.

        Logits are ``[B, C]`` (finetuning) or ``[M, V]`` at the masked positions with ``labels``
        ``[M]`` (pre-training; ``token_scale`` as in ``PretrainObjective`` scales task and KD).
        """
        task_large = self.task_loss(large_logits, labels, token_scale)
        task_small = self.task_loss(small_logits, labels, token_scale)
        large_target = teacher_logits if self.one_way else small_logits
        small_target = teacher_logits if self.one_way else large_logits
        if large_target is None:  # one-way with alpha_kd = 0: no teacher was loaded
            kd_large = kd_small = large_logits.float().sum() * 0.0
        else:
            kd_large = self.soft_kd(large_logits, large_target)
            kd_small = self.soft_kd(small_logits, small_target)
        if token_scale is not None:
            kd_large, kd_small = kd_large * token_scale, kd_small * token_scale
        loss_large = task_large + self.alpha_large * kd_large
        loss_small = task_small + self.alpha_small * kd_small
        terms = {"loss/large_task": task_large.detach(), "loss/small_task": task_small.detach(),
                 "loss/large_kd": kd_large.detach(), "loss/small_kd": kd_small.detach(),
                 "loss/total": (loss_large + loss_small).detach()}
        return loss_large, loss_small, terms


def large_init_dir(spec: Optional[str]) -> Optional[Path]:
    """``method.ctcd_large_init``: a Hugging Face directory or packaged name, or a CTCD run (its export_large/)."""
    if not spec:
        return None
    if (Path(spec) / EXPORT_LARGE / "config.json").is_file():
        return Path(spec) / EXPORT_LARGE
    return model_dir(spec, "method.ctcd_large_init")


def large_model_config(cfg: ExperimentConfig, large_dir: Optional[Path]):
    """The ``model.*`` settings ``build_student`` builds the larger model from."""
    m = cfg.method
    if large_dir is not None:
        return dataclasses.replace(cfg.model, init_from=None, student_init=str(large_dir), student_init_layers=None)
    return dataclasses.replace(cfg.model, init_from=None, student_init=None, student_layers=m.ctcd_large_layers,
                               student_hidden=m.ctcd_large_hidden, student_heads=m.ctcd_large_heads,
                               student_intermediate=None)


def checks_view(cfg: ExperimentConfig, stage: str) -> ExperimentConfig:
    """``cfg`` as the finetune / pretrain start-up checks (``prepare``, ``prepare_pretrain``) see a CTCD run.

    Each model trains with the task objective (``ce`` / ``mlm``), plus KD from the frozen
    teacher in the one-way variant (``kd``), so those checks apply as they are under that
    name. ``to_dict`` stays the real config's: on --resume the run directory is compared
    with the ctcd config that was saved.
    """
    name = "kd" if cfg.method.ctcd_one_way else ("ce" if stage == "finetune" else "mlm")
    view = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, name=name))
    view.to_dict = cfg.to_dict
    return view


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def run_cotrain(cfg: ExperimentConfig, ds_config_path: str, output_dir: str, stage: str, resume: bool = False,
                overwrite: bool = False, probe: Optional[Callable[[str, dict], None]] = None) -> dict:
    """CTCD finetuning (``stage="finetune"``) or pre-training (``"pretrain"``). Returns results.json's content.

    ``probe(event, objects)`` is called with ``"setup"`` once both engines exist and ``"done"``
    after training; ``objects`` holds ``engine`` / ``optimizer`` / ``module`` (the smaller model),
    ``engine_large`` / ``optimizer_large`` / ``module_large``, ``teacher`` (one-way) and ``sampler``.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if stage not in ("finetune", "pretrain"):
        raise ValueError(f"stage must be finetune or pretrain, got {stage!r}")
    finetune = stage == "finetune"
    view = checks_view(cfg, stage)
    p = (prepare if finetune else prepare_pretrain)(view, ds_config_path, output_dir, resume, overwrite)
    rank, _, world = dist_env()
    tcfg, mcfg = cfg.training, cfg.method
    large_dir = large_init_dir(mcfg.ctcd_large_init)
    if large_dir is not None:
        check_same_vocab(p.tokenizer, large_dir, "method.ctcd_large_init")
    task = p.task if finetune else None
    corpus = None if finetune else p.corpus
    num_labels, is_regression = (task.num_labels, task.is_regression) if finetune else (0, False)
    co = CoDistillation(mcfg, stage, is_regression)

    # The frozen teacher (one-way only) and both models are loaded before any state is written.
    teacher = None
    if mcfg.ctcd_one_way and mcfg.alpha_kd > 0:
        teacher = (load_teacher(str(p.teacher_dir), num_labels, p.dtype, cfg.model.teacher_sha256) if finetune else
                   load_mlm_teacher(str(p.teacher_dir), p.dtype, cfg.model.teacher_sha256, need_head=True))
    set_seed(tcfg.seed)  # identical initialisation of both models on every rank; the smaller one first
    template = p.teacher_dir or large_dir
    small = build_student(cfg.model, num_labels, is_regression, p.tokenizer, template_dir=template,
                          masked_lm=not finetune)
    large = build_student(large_model_config(cfg, large_dir), num_labels, is_regression, p.tokenizer,
                          template_dir=p.teacher_dir, masked_lm=not finetune)
    if not finetune:
        for what, model in (("model.*", small), ("method.ctcd_large_*", large)):
            if cfg.corpus.block_size > position_limit(model.config):
                raise CodirError(f"corpus.block_size {cfg.corpus.block_size} exceeds the {what} model's "
                                 f"{position_limit(model.config)} positions: lower corpus.block_size")
        if small.config.vocab_size != large.config.vocab_size:
            raise CodirError(f"the smaller model has {small.config.vocab_size} vocabulary logits and the larger "
                             f"{large.config.vocab_size}: CTCD distils MLM logits between them, so both need one "
                             f"vocabulary; build both from the same tokenizer and architecture")
    wrap = DistillationModule if finetune else PretrainModule  # no projection heads: module.student is the model
    module = wrap(small, resolve_layers("all", small, "model"), mcfg.pooling)
    module_large = wrap(large, resolve_layers("all", large, "method.ctcd_large_init"), mcfg.pooling)

    init_distributed()
    device = torch.device(get_accelerator().current_device_name())
    open_run_dir(p.run_dir, p.mode, cfg, p.ds, rank, p.warning)

    num_train = len(task.train) if finetune else len(corpus.train_ids)
    micro = p.ds["train_micro_batch_size_per_gpu"]
    accum = p.ds["gradient_accumulation_steps"]
    lengths = (token_lengths(p.tokenizer, task.train, cfg.data.max_length)
               if finetune and cfg.data.group_by_length else None)
    sampler, total_steps = sampler_and_steps(num_train, p.ds, rank, world, tcfg, lengths, cfg.data.group_window)
    # Two engines, two optimizers and schedules, one DeepSpeed JSON.
    opt, sched = optimizer_and_schedule(module, tcfg, total_steps, p.ds)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched,
                                                      config=copy.deepcopy(engine_config(p.ds, p.universal)))
    opt, sched = optimizer_and_schedule(module_large, tcfg, total_steps, p.ds)
    engine_large, ds_optimizer_large, _, _ = deepspeed.initialize(
        model=module_large, optimizer=opt, lr_scheduler=sched, config=copy.deepcopy(engine_config(p.ds, p.universal)))
    if tcfg.compile:
        compile_engine(engine)
        compile_engine(engine_large)

    runner = None
    if teacher is not None:
        teacher.to(device)
        runner = (TeacherRunner(teacher, None, mcfg.pooling) if finetune else
                  MLMTeacherRunner(teacher, None, mcfg.pooling, logits=True))

    # The larger model's best / history / skip counter ride in the checkpoint's client state too.
    state = {"micro_step": 0, "best": None, "history": [], "consecutive_skips": 0,
             LARGE: {"best": None, "history": [], "consecutive_skips": 0}}
    ckpt_root = p.run_dir / "checkpoints"
    engines = {LARGE: engine_large}
    if p.mode == "resume":
        state.update(resume_latest(engine, ckpt_root, rank, world, sampler, None, tcfg.seed, extra_engines=engines))
    else:
        set_seed(tcfg.seed * 1000 + rank)  # dropout differs across ranks

    collator = (ClassificationCollator(p.tokenizer, cfg.data.max_length, is_regression) if finetune else
                MLMCollator(p.tokenizer, mcfg.mlm_probability, seed=tcfg.seed))
    n_small, n_large = count_parameters(small), count_parameters(large)
    if rank == 0:
        data = (f"{len(task.train)} train / {len(task.validation)} validation examples" if finetune else
                f"{num_train} blocks of <= {corpus.block_size} tokens ({len(corpus.validation_ids)} held out)")
        kind = "one-way from model.teacher" if mcfg.ctcd_one_way else "mutual"
        print(f"ctcd {stage} ({kind}): larger model {n_large / 1e6:.2f}M and smaller {n_small / 1e6:.2f}M "
              f"parameters; {data}, {world} rank(s), batch {p.ds['train_batch_size']} (micro {micro} x accumulation "
              f"{accum}), {total_steps} steps, precision {str(p.dtype).replace('torch.', '')}", flush=True)
    monitor = Monitor(p.run_dir, rank == 0, cfg.logging.tensorboard, cfg.logging.progress_bar, total_steps,
                      initial_step=engine.global_steps, desc="ctcd" if finetune else "ctcd-pre")

    def forward_with(eng) -> Callable[[dict], torch.Tensor]:
        if finetune:
            return lambda b: eng(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                 token_type_ids=b.get("token_type_ids"))["logits"]
        return lambda b: eng(input_ids=b["input_ids"], attention_mask=b["attention_mask"], rows=b["rows"])["logits"]

    def export(eng, out: Path, role: str, step: int, metrics: dict) -> None:
        extra = ({"task": task.name, "label_names": task.label_names} if finetune else {"stage": "pretrain"})
        export_engine_student(eng, p.tokenizer, out, rank,
                              {**extra, "method": "ctcd", "ctcd_model": role, "step": step,
                               **{f"validation_{k}": v for k, v in metrics.items()}})

    def run_eval(step: int) -> dict:
        """Evaluate both models; finetuning exports each one's best to export/ and export_large/."""
        engine.eval()
        engine_large.eval()
        results = {}
        for role, eng, st, out in (("small", engine, state, p.run_dir / "export"),
                                   (LARGE, engine_large, state[LARGE], p.run_dir / EXPORT_LARGE)):
            if finetune:
                metrics = evaluate(forward_with(eng), task.validation, collator, tcfg.eval_batch_size, device,
                                   task.metric_names, rank, world)
            else:
                metrics = evaluate_mlm(forward_with(eng), corpus, collator, tcfg.eval_batch_size, device, rank, world)
            results[role] = metrics
            if not metrics:
                continue
            st["history"].append({"step": step, **metrics})
            if finetune:
                main = task.metric_names[0]
                if st["best"] is None or metrics[main] > st["best"][main]:
                    st["best"] = {"step": step, **metrics}
                    export(eng, out, role, step, metrics)
        engine.train()
        engine_large.train()
        logged = {**{f"eval/{k}": v for k, v in results["small"].items()},
                  **{f"eval/large_{k}": v for k, v in results[LARGE].items()}}
        if logged:
            monitor.scalars(step, logged)
            monitor.write(f"step {step}: " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in logged.items()))
        return results

    def save(step: int) -> None:
        save_run_checkpoint(engine, ckpt_root, step, state, rank, world, sampler, None, tcfg.keep_checkpoints,
                            extra_engines=engines)

    objects = {"engine": engine, "optimizer": ds_optimizer, "module": module, "engine_large": engine_large,
               "optimizer_large": ds_optimizer_large, "module_large": module_large, "teacher": teacher,
               "sampler": sampler}
    if probe is not None:
        probe("setup", objects)
    batches = micro_batches(sampler)
    t_start = time.perf_counter()
    start_step = step = engine.global_steps
    tokens = 0  # pre-training: real tokens trained on, counted on the host
    stopped_early = False
    engine.train()
    engine_large.train()
    while step < total_steps:
        group = [next(batches) for _ in range(accum)]  # this rank's micro-batches of one optimizer step
        if finetune:
            hosts = [collator([task.train[i] for i in ids.tolist()]) for _, ids in group]
            row_sets = [None] * accum
        else:  # the MLM and KD terms are means over the GLOBAL batch's masked tokens, as in run_pretrain
            hosts = [collator([corpus[i] for i in ids.tolist()], ids, epoch) for epoch, ids in group]
            row_sets = [masked_rows(h["labels"]) for h in hosts]
            step_masked = torch.tensor(float(sum(len(r) for r in row_sets))).to(device, non_blocking=True)
            if world > 1:
                dist.all_reduce(step_masked)
            per_token = accum * world / step_masked.clamp(min=1.0)
        for host, rows, (_, ids) in zip(hosts, row_sets, group):
            batch = to_device(host, device)
            inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            if finetune:
                labels, token_scale = batch["labels"], None
                inputs["token_type_ids"] = batch.get("token_type_ids")
            else:  # vocabulary logits at the masked positions only
                labels = host["labels"].reshape(-1)[rows].to(device, non_blocking=True)
                tokens += int(host["attention_mask"].sum())
                token_scale = per_token * len(rows)
                inputs["rows"] = rows.to(device, non_blocking=True)
            t_out = runner(**inputs) if runner is not None else None  # one-way variant only
            large_logits = engine_large(**inputs)["logits"]
            small_logits = engine(**inputs)["logits"]
            # Each loss reads the other model's logits detached: two separate graphs, one per engine.
            loss_large, loss_small, terms = co(large_logits, small_logits, labels,
                                               teacher_logits=t_out.logits if t_out is not None else None,
                                               token_scale=token_scale)
            engine_large.backward(loss_large)
            engine.backward(loss_small)
            engine_large.step()
            engine.step()
            state["micro_step"] += 1
            monitor.accumulate(terms, len(ids) * world)
        step += 1
        check_skipped(engine, state, tcfg.max_consecutive_skips, step)
        check_skipped(engine_large, state[LARGE], tcfg.max_consecutive_skips, step)
        if after_step(step, total_steps, engine, cfg, p.dtype, monitor, run_eval, save):
            stopped_early = True
            break

    if probe is not None:
        probe("done", objects)
    if stopped_early:
        return stop_early(step, rank, monitor)

    final = run_eval(step)
    save(step)
    if not finetune:
        export(engine, p.run_dir / "export", "small", step, final["small"])
        export(engine_large, p.run_dir / EXPORT_LARGE, LARGE, step, final[LARGE])
    elapsed = time.perf_counter() - t_start
    done = step - start_step
    results = {"method": "ctcd", "seed": tcfg.seed, "world_size": world,
               "precision": str(p.dtype).replace("torch.", ""), "steps": step,
               "train_batch_size": p.ds["train_batch_size"]}
    if finetune:
        results.update({"task": task.name, "num_train_examples": len(task.train),
                        "num_validation_examples": len(task.validation), "main_metric": task.metric_names[0],
                        "final": final["small"], "best": state["best"], "history": state["history"]})
    else:
        if world > 1:
            total_tokens = torch.tensor(tokens, dtype=torch.long, device=device)
            dist.all_reduce(total_tokens)
            tokens = int(total_tokens)
        results.update({"stage": "pretrain", "block_size": corpus.block_size, "num_train_blocks": num_train,
                        "num_validation_blocks": len(corpus.validation_ids), "corpus": str(corpus.path),
                        "final": final["small"], "history": state["history"],
                        "tokens_per_second": round(tokens / max(elapsed, 1e-9), 1)})
    large_results = {"final": final[LARGE], "history": state[LARGE]["history"],
                     "export_dir": str(p.run_dir / EXPORT_LARGE), "num_parameters": n_large}
    if finetune:
        large_results["best"] = state[LARGE]["best"]
    results.update({
        "train_seconds_this_session": round(elapsed, 2),
        "samples_per_second": round(done * p.ds["train_batch_size"] / max(elapsed, 1e-9), 2),
        "export_dir": str(p.run_dir / "export"), "num_parameters": n_small,
        # The KD weights actually used: alpha_small_to_large / alpha_large_to_small, or alpha_kd (one-way).
        "ctcd": {"one_way": co.one_way, "alpha_kd_large": co.alpha_large, "alpha_kd_small": co.alpha_small,
                 "kd_temperature": co.temperature, "kd_t2_scale": co.t2_scale},
        LARGE: large_results,
    })
    if rank == 0:
        (p.run_dir / "results.json").write_text(json.dumps(results, indent=2))
    monitor.close()
    dist.barrier()
    return results
