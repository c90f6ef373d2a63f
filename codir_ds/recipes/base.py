"""What every training recipe shares: the phases of a run and their bookkeeping.

A recipe is one kind of run (finetuning, pre-training, co-training). ``run()`` is::

    setup()      check every input (nothing written yet) -> models -> distributed -> run directory
                 -> sampler and step count -> DeepSpeed engine(s) -> teacher runner, bank, caches
                 -> resume (or seed) -> monitor
    train()      while steps remain: train_step(one optimizer step's micro-batches), non-finite
                 policy, log / evaluate / checkpoint (after_step); then finish(): final
                 evaluation, checkpoint, export, results.json

Subclasses implement the stage-specific phases (``check_inputs``, ``setup_models``,
``setup_engines``, ``setup_components``, ``evaluate``, ``finish``); their data side is a
:class:`~codir_ds.recipes.stages.DataStage` (``recipe.data``). The base owns the run directory,
checkpoints and resume, the monitor, the non-finite policy and the one ``train_step``: per
micro-batch, the teacher step, the student, ``method.loss``, backward and step, then the components
(:mod:`codir_ds.distill.components`: the memory bank, the EMA copy, the teacher cache) at fixed points.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from codir_ds.cli import report_line
from codir_ds.config import ExperimentConfig
from codir_ds.data.sampler import build_sampler
from codir_ds.distill.bank_component import MemoryBankComponent
from codir_ds.distill.components import Components, RunContext
from codir_ds.distill.memory_bank import ShardedMemoryBank
from codir_ds.distill.diagnostics import CollapseWatch, last_diagnostics
from codir_ds.distill.methods import LossInputs, StudentOutput, build_method
from codir_ds.engine.checkpointing import RunState, engine_config, resume_latest, resume_plan, save_run_checkpoint
from codir_ds.engine.checkpointing.store import COMPLETE, tag_for
from codir_ds.engine.compile import check_compile, compile_engine
from codir_ds.engine.distributed import dist_env, host_group, init_distributed, set_seed
from codir_ds.engine.ds_config import prepare_ds_config, read_ds_config, zero_stage
from codir_ds.engine.export import export_engine_student
from codir_ds.engine.faults import check_fault_spec, maybe_fault
from codir_ds.engine.monitor import Monitor
from codir_ds.engine.optim import check_optimizer_impl, optimizer_and_schedule
from codir_ds.engine.preemption import StopSignals, clear_marker, resume_command, write_marker
from codir_ds.engine.rundir import ARCHITECTURE, check_run_dir, open_run_dir, write_architecture
from codir_ds.engine.sections import section
from codir_ds.engine.teacher import TeacherStep
from codir_ds.errors import CodirError
from codir_ds.recipes.stages import DataStage


@dataclass
class ModelProgress:
    """One trained model's evaluation record and non-finite-step counter."""
    best: Optional[dict] = None
    history: list = field(default_factory=list)
    consecutive_skips: int = 0

    def record(self, step: int, metrics: dict, main: Optional[str] = None) -> bool:
        """Add an evaluation to the history; True when it is a new best of ``main`` (None: no best kept)."""
        self.history.append({"step": step, **metrics})
        if main is None or (self.best is not None and metrics[main] <= self.best[main]):
            return False
        self.best = {"step": step, **metrics}
        return True


@dataclass
class Progress(ModelProgress):
    """Where a run is: optimizer steps done, micro steps done, and (CTCD) the larger model's record.

    Saved in every checkpoint (``state_dict``) and restored on ``--resume``.
    """
    step: int = 0
    micro_step: int = 0
    large: Optional[ModelProgress] = None
    collapse: dict = field(default_factory=dict)  # the CollapseWatch's state

    def state_dict(self) -> dict:
        state = {"micro_step": self.micro_step, "best": self.best, "history": self.history,
                 "consecutive_skips": self.consecutive_skips, "collapse": self.collapse}
        if self.large is not None:
            state["large"] = dataclasses.asdict(self.large)
        return state

    def load_state_dict(self, state: dict) -> None:
        for key in ("micro_step", "best", "history", "consecutive_skips", "collapse"):
            if key in state:
                setattr(self, key, state[key])
        if self.large is not None and "large" in state:
            self.large = ModelProgress(**state["large"])


def micro_batches(sampler) -> Iterator[tuple[int, torch.Tensor]]:
    """``(epoch, ids)`` forever, from the sampler's current position (resume-aware)."""
    while True:
        for ids in sampler:
            yield sampler.epoch, ids
        sampler.set_epoch(sampler.epoch + 1)


def precision_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class Recipe:
    """Base of the training recipes; ``stage`` is ``"finetune"`` or ``"pretrain"``."""
    stage = "finetune"

    data_stage: type = DataStage  # the class of the stage's data side (recipe.data)

    def __init__(self, cfg: ExperimentConfig, ds_config_path: str, output_dir: str, resume: bool = False,
                 overwrite: bool = False):
        self.cfg, self.ds_config_path = cfg, ds_config_path
        self.data = self.data_stage(self)  # the task or the corpus: the recipe never branches on the stage
        self.run_dir = Path(output_dir)
        self.resume, self.overwrite = resume, overwrite
        self.rank, _, self.world = dist_env()
        self.method = build_method(cfg.method, self.stage)  # refuses a method the stage does not have
        self.progress = Progress()
        self.engine = self.sampler = self.monitor = None
        self.teacher_step: Optional[TeacherStep] = None  # the teacher's part of a micro step (a method with a teacher)
        self.bank_component: Optional[MemoryBankComponent] = None  # the method's memory bank (BankSpec), if any
        self.components = Components()  # called at fixed points of every step (codir_ds.distill.components)
        self.collapse = CollapseWatch()
        self.last_scalars: dict = {}
        self.extra_engines: dict = {}   # name -> DeepSpeed engine saved in the same checkpoint folder
        self.stops = StopSignals()      # SIGTERM / SIGINT while training: stop after the step, save, exit
        # Set by the phases of setup(), in this order (declared here so that a reader need not hunt for them):
        self.mode = self.ds = self.dtype = self.ds_warning = None  # check_inputs: run mode, DeepSpeed config
        self.universal = False          # check_inputs: resuming from a checkpoint written by another world size
        self.tokenizer = self.teacher_dir = None  # the data side's check_inputs (with task or corpus)
        self.num_train = 0              # ... training examples (blocks): ids 0..num_train-1
        self.teacher = self.module = self.teacher_layers = None  # setup_models: frozen teacher, trained module
        self.sizes: dict = {}           # setup_models: parameter counts (finetuning, co-training)
        self.accum = self.steps_per_epoch = self.total_steps = 0  # setup_data
        self.collator = None            # setup_data: the stage's collator
        self.optimizer = None           # setup_engines
        self.tokens = 0                 # real tokens trained on (pre-training), counted on the host

    # ------------------------------------------------------------------ phases
    def run(self) -> dict:
        """Check everything, start DeepSpeed, train, evaluate, export. Returns results.json's content."""
        self.setup()
        return self.train()

    def setup(self) -> None:
        self.check_inputs()      # every check that can fail on bad input; writes nothing
        self.setup_models()      # teacher and student(s) load before any state is written
        from deepspeed.accelerator import get_accelerator
        init_distributed()
        self.device = torch.device(get_accelerator().current_device_name())
        open_run_dir(self.run_dir, self.mode, self.cfg, self.ds, self.rank, self.ds_warning)
        self.write_architectures()
        self.setup_data()
        self.setup_engines()
        self.setup_components()
        self.restore()
        self.prepare_components()
        self.setup_logging()

    def check_inputs(self) -> None:
        """The checks every run shares, cheap first: fault spec, run directory, DeepSpeed JSON, student options."""
        check_fault_spec()
        self.mode = check_run_dir(self.run_dir, self.cfg.to_dict(), self.resume, self.overwrite)
        self.ds, self.dtype, self.ds_warning = prepare_ds_config(read_ds_config(self.ds_config_path), self.world,
                                                                 self.cfg.training)
        self.universal = (self.mode == "resume" and resume_plan(self.ckpt_root, self.world, zero_stage(self.ds),
                                                                self.ds_config_path) == "universal")
        check_optimizer_impl(self.cfg.training, self.ds)
        check_compile(self.cfg.training, self.ds)
        self.method.check_engine(self.ds)

    def setup_models(self) -> None:
        raise NotImplementedError

    def architectures(self) -> dict:
        """``{folder: model}``: each trained model's architecture folder in the run directory (see below)."""
        return {ARCHITECTURE: self.module.student}

    def run_manifest(self) -> dict:
        """What an export of this run records about the run (task and label names, or the stage; the method)."""
        return {**self.data.manifest(), "method": self.method.name}

    def write_architectures(self) -> None:
        """Rank 0 writes each model's ``config.json``, the tokenizer and the run manifest to ``<run>/architecture/``
        before training, so ``launchers/export.py`` can rebuild any checkpoint, even one saved before the
        first export."""
        if self.rank == 0:
            for folder, model in self.architectures().items():
                write_architecture(model, self.tokenizer, self.run_dir / folder, self.run_manifest())

    def setup_data(self, lengths: Optional[torch.Tensor] = None) -> None:
        """The training sampler over this run's ``num_train`` ids and the run's number of optimizer steps.

        ``training.max_steps`` when > 0, else ``training.epochs`` times the optimizer steps per epoch.
        ``lengths`` (``[N]`` token counts, ``data.group_by_length``) groups batches by length.
        """
        t, ds = self.cfg.training, self.ds
        self.accum = ds["gradient_accumulation_steps"]
        self.sampler = build_sampler(self.num_train, ds["train_micro_batch_size_per_gpu"], self.rank, self.world,
                                     t.seed, self.accum, t.deterministic, lengths, self.cfg.data.group_window)
        self.steps_per_epoch = max(1, self.sampler.batches_per_epoch // self.accum)
        self.total_steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.epochs * self.steps_per_epoch))

    def setup_engines(self) -> None:
        """The optimizer, LR schedule and DeepSpeed engine of ``self.module`` (compiled when asked)."""
        import deepspeed
        opt, sched = optimizer_and_schedule(self.module, self.cfg.training, self.total_steps, self.ds)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.module, optimizer=opt, lr_scheduler=sched, config=engine_config(self.ds, self.universal))
        if self.cfg.training.compile:
            compile_engine(self.engine, *self.compiled_with())

    def compiled_with(self) -> tuple:
        """Other models the compiled forward calls (prepared for compilation like the student)."""
        return ()

    def setup_components(self) -> None:
        """Teacher step, bank, caches: what the method needs besides the engine(s)."""

    def build_teacher_step(self, cache=None) -> None:
        """The teacher on the device and the step that runs it (or reads ``cache``); none without a teacher."""
        if self.teacher is not None:
            self.teacher.to(self.device)
            runner = self.data.teacher_runner(self.teacher, self.teacher_layers, self.module.pooling,
                                              self.module.ild_spec)
            self.teacher_step = TeacherStep(runner, cache, self.device)

    @property
    def bank(self) -> Optional[ShardedMemoryBank]:
        """The memory bank's rows (checkpointed per rank), None without a bank."""
        return self.bank_component.bank if self.bank_component is not None else None

    def build_bank(self) -> None:
        """The method's memory bank component, when it has a :class:`BankSpec` (its negatives: from other labels
        of the data side's contrast labels, or the global batch's rows without them)."""
        spec = self.method.bank
        if spec is not None:
            self.bank_component = self.components.add(MemoryBankComponent(
                spec, self.method.contrast, self.num_train, self.cfg.training.seed, self.device, self.world,
                self.cfg.training.deterministic, self.data.contrast_labels(spec)))


    def restore(self) -> None:
        """``--resume``: load the newest checkpoint; a new run seeds dropout differently on each rank."""
        if self.mode == "resume":
            if self.rank == 0:
                clear_marker(self.run_dir)
            client = resume_latest(self.engine, self.ckpt_root, self.rank, self.world, self.cfg.training.seed,
                                   self.run_state())
            self.progress.load_state_dict(client)
            self.collapse.load_state_dict(self.progress.collapse)
        else:
            set_seed(self.cfg.training.seed * 1000 + self.rank)
        self.progress.step = self.engine.global_steps

    def prepare_components(self) -> None:
        """Every component's ``prepare`` once the run is set up (the bank's warm start on a new run)."""
        student_features = self.engine.module.student_features

        def features(ids: torch.Tensor) -> torch.Tensor:
            batch = self.data.feature_batch(ids)
            return student_features(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        log = (lambda line: print(line, flush=True)) if self.rank == 0 else (lambda line: None)
        self.components.prepare(RunContext(self.mode == "resume", features, self.eval_mode,
                                           self.cfg.training.eval_batch_size, log))

    def setup_logging(self) -> None:
        if self.rank == 0:
            print(self.describe(), flush=True)
        self.monitor = Monitor(self.run_dir, self.rank == 0, self.cfg.logging.tensorboard,
                               self.cfg.logging.progress_bar, self.total_steps, initial_step=self.engine.global_steps,
                               desc=self.monitor_name)

    def describe(self) -> str:
        """The run's one-line summary printed at start-up."""
        raise NotImplementedError

    def batch_summary(self) -> str:
        """Ranks, batch, steps and precision, the end of every recipe's start-up line."""
        ds = self.ds
        return (f"{self.world} rank(s), batch {ds['train_batch_size']} (micro {ds['train_micro_batch_size_per_gpu']} "
                f"x accumulation {self.accum}), {self.total_steps} steps, precision {precision_name(self.dtype)}")

    monitor_name = "train"

    # ------------------------------------------------------------------ training
    def train(self) -> dict:
        """The loop: one ``train_step`` per optimizer step, then the bookkeeping; ``finish`` at the end."""
        batches = micro_batches(self.sampler)
        self.t_start = time.perf_counter()
        self.start_step = self.progress.step
        self.train_mode(True)
        self.stops.install()
        try:
            while self.progress.step < self.total_steps:
                self.train_step([next(batches) for _ in range(self.accum)])
                self.progress.step += 1
                self.check_skipped()
                if self.after_step():
                    return self.stop_early()
                if self.stops.requested(host_group()):  # collective: every rank stops after the same step
                    return self.preempted()
            return self.finish()  # a first signal from here on lets the run end as planned; a second stops it
        finally:
            self.stops.restore()

    def preempted(self) -> dict:
        """A signal stopped the run after this step: one complete checkpoint (unless this step just saved one), the
        marker the SLURM script requeues on, and one line naming the checkpoint and the command that resumes."""
        step = self.progress.step
        tag = self.ckpt_root / tag_for(step)
        if not (tag / COMPLETE).is_file():
            self.save()
        self.monitor.close()
        if self.rank == 0:
            write_marker(self.run_dir, step, self.stops.name, tag)
            report_line(f"stopped by {self.stops.name} after step {step} of {self.total_steps}: saved checkpoint "
                        f"{tag}; continue with: {resume_command()}")
        return {"preempted_at_step": step}

    def train_mode(self, training: bool) -> None:
        for engine in (self.engine, *self.extra_engines.values()):
            engine.train(training)

    @contextlib.contextmanager
    def eval_mode(self):
        """Every trained model in eval mode inside the block, back in training mode after it."""
        self.train_mode(False)
        try:
            yield
        finally:
            self.train_mode(True)

    def train_step(self, batches: list[tuple[int, torch.Tensor]]) -> None:
        """One optimizer step over this rank's ``accumulation`` micro-batches ``(epoch, ids)``: per micro-batch,
        teacher -> student -> ``method.loss`` -> backward / step -> components; then the components' step."""
        step, method = self.progress.step, self.method
        stage = method.stage_at(step, self.total_steps)
        use_layers = self.module.ild_spec is not None and method.uses_layers(stage)
        self.components.start_step(step, batches)  # COLLECTIVE with a bank: the step's negatives
        forward = dict(ild=use_layers, hold_encoder=step < method.encoder_delay, **self.components.forward_inputs())
        weight = method.consistency_weight(step, self.total_steps)
        for mb in self.data.micro_batches(batches, stage):
            t_out = self.teacher_step(mb, use_layers) if self.teacher_step is not None else None
            inputs = LossInputs(mb.labels, pretraining=self.data.masked_lm, is_regression=self.data.is_regression,
                                token_scale=mb.token_scale, stage=stage, consistency_weight=weight,
                                **self.components.loss_inputs(mb.ids))  # the bank's negatives
            with section("student_forward_backward"):
                out = self.engine(**mb.inputs, teacher_features=t_out.features if t_out is not None else None,
                                  mix=mb.mix, **forward)
                total, terms = method.loss(StudentOutput.from_module(out), t_out, inputs)
                self.engine.backward(total)
            with section("optimizer_step"):
                self.engine.step()
            self.progress.micro_step += 1
            self.components.after_micro_step(mb.ids, out)  # the bank holds the positives' features until the step
            self.monitor.accumulate(terms, mb.size * self.world)
        self.components.after_optimizer_step(self.engine.was_step_applied(), stage)  # bank updates, the EMA copy

    def check_skipped(self) -> None:
        """The non-finite policy, after every optimizer step (identical on all ranks)."""
        check_skipped(self.engine, self.progress, self.cfg.training.max_consecutive_skips, self.progress.step)

    def after_step(self) -> bool:
        """Bookkeeping after an optimizer step: log, evaluate, checkpoint.

        Returns True when ``training.stop_at_step`` ends the run here (a checkpoint has been saved).
        The final evaluation and checkpoint, at the last step, are ``finish``'s.
        """
        step, tcfg = self.progress.step, self.cfg.training
        maybe_fault("step", step, self.engine.global_rank)
        self.monitor.advance()
        if step % self.cfg.logging.log_every == 0 or step == self.total_steps:
            self.watch_training(step, self.monitor.flush(step, self.train_scalars()))
        if step >= self.total_steps:
            return False
        if tcfg.eval_every and step % tcfg.eval_every == 0:
            self.evaluate()
        saved = bool(tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0)
        if saved:
            self.save()
        if tcfg.stop_at_step and step == tcfg.stop_at_step:
            if not saved:
                self.save()
            return True
        return False

    def train_scalars(self) -> dict:
        """Scalars logged beside the loss terms. Collective with a bank (every rank calls it at log steps)."""
        extra = {"train/lr": self.engine.get_lr()[0]}
        scale = getattr(self.engine.optimizer, "cur_scale", None)
        if self.dtype == torch.float16 and scale is not None:
            extra["train/loss_scale"] = float(scale)
        extra["train/skipped_steps"] = float(self.engine.skipped_steps)
        extra.update(self.components.scalars())
        return extra

    def watch_training(self, step: int, scalars: dict) -> None:
        """Keep the last logged scalars (results.json's ``diagnostics``); warn once if CRD collapses."""
        self.last_scalars = scalars
        warning = self.collapse.observe(step, scalars)
        if warning:
            self.monitor.write(warning)

    def trained_models(self) -> list[tuple[str, object, ModelProgress, Path, str]]:
        """``(role, engine, progress, export directory, eval tag prefix)`` of every trained model, the run's
        student first."""
        return [("student", self.engine, self.progress, self.run_dir / "export", "")]

    def evaluate(self) -> dict:
        """Every trained model's validation metrics (``{role: metrics}``), logged and recorded; with a main metric
        (finetuning) each model's new best is exported as it comes. COLLECTIVE."""
        step, main, models = self.progress.step, self.data.main_metric, self.trained_models()
        with self.eval_mode():
            results = {role: self.data.evaluate(self.data.forward_with(engine)) for role, engine, *_ in models}
        self.log_eval({f"eval/{prefix}{k}": v for role, *_, prefix in models for k, v in results[role].items()})
        for role, engine, progress, out, _ in models:
            if results[role] and progress.record(step, results[role], main):
                self.export(engine, out, role, results[role])
        return results

    def export_manifest(self, role: str) -> dict:
        """What the export of model ``role`` records about the run."""
        return self.run_manifest()

    def export(self, engine, out: Path, role: str, metrics: dict) -> None:
        """Export ``engine``'s model to ``out`` with the run manifest, the step and its validation ``metrics``."""
        export_engine_student(engine, self.tokenizer, out, self.rank,
                              {**self.export_manifest(role), "step": self.progress.step,
                               **{f"validation_{k}": v for k, v in metrics.items()}})

    def log_eval(self, scalars: dict) -> None:
        """Evaluation scalars (``eval/...`` keys) to TensorBoard and one ``step N: ...`` line."""
        if scalars:
            step = self.progress.step
            self.monitor.scalars(step, scalars)
            self.monitor.write(f"step {step}: " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in scalars.items()))

    # ------------------------------------------------------------------ checkpoints and the end
    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def run_state(self) -> RunState:
        """What a checkpoint holds besides the engine: sampler, stateful components, further engines."""
        return RunState(self.sampler, self.components.stateful(), self.extra_engines)

    def save(self) -> None:
        """Collective: DeepSpeed state plus this rank's sampler position, RNG and stateful components (the bank's
        shard, the EMA copy)."""
        self.progress.collapse = self.collapse.state_dict()
        self.components.before_save()
        save_run_checkpoint(self.engine, self.ckpt_root, self.progress.step, self.progress.state_dict(), self.rank,
                            self.world, self.cfg.training.keep_checkpoints, self.run_state())
        self.stops.last_checkpoint = str(self.ckpt_root / tag_for(self.progress.step))

    def stop_early(self) -> dict:
        """End a run stopped by ``training.stop_at_step``."""
        self.monitor.close()
        if self.rank == 0:
            print(f"stopped at step {self.progress.step} (training.stop_at_step); continue with --resume", flush=True)
        return {"stopped_at_step": self.progress.step}

    def finish(self) -> dict:
        """The final evaluation, checkpoint and (without a main metric) export of the final models; results.json."""
        final = self.evaluate()
        reported = self.final_reports()
        self.save()
        if self.data.main_metric is None:  # no best was exported along the way: the final models are
            for role, engine, _, out, _ in self.trained_models():
                self.export(engine, out, role, final[role])
        timing = self.throughput()
        return self.write_results(self.results(final, reported, timing))

    def final_reports(self) -> dict:
        """What the final model reports beside validation (finetuning: the test split). COLLECTIVE."""
        return {}

    def results(self, final: dict, reported: dict, timing: dict) -> dict:
        """results.json's content (``final``: :meth:`evaluate`'s, ``timing``: :meth:`throughput`'s)."""
        raise NotImplementedError

    def throughput(self) -> dict:
        """This session's training time and samples per second."""
        self.elapsed = elapsed = time.perf_counter() - self.t_start
        done = self.progress.step - self.start_step
        return {"train_seconds_this_session": round(elapsed, 2),
                "samples_per_second": round(done * self.ds["train_batch_size"] / max(elapsed, 1e-9), 2)}

    def write_results(self, results: dict) -> dict:
        if self.rank == 0:
            (self.run_dir / "results.json").write_text(json.dumps(results, indent=2))
        self.monitor.close()
        dist.barrier()
        return results

    def common_results(self) -> dict:
        results = {"method": self.method.name, "seed": self.cfg.training.seed, "world_size": self.world,
                   "precision": precision_name(self.dtype), "steps": self.progress.step,
                   "train_batch_size": self.ds["train_batch_size"]}
        results.update(self.components.results())
        diagnostics = last_diagnostics(self.last_scalars)
        if diagnostics:  # the CRD and bank diagnostics at the last log step
            results["diagnostics"] = {**diagnostics, "collapse_warning": self.collapse.warned}
        return results


def check_skipped(engine, progress: ModelProgress, limit: int, step: int) -> None:
    """The non-finite policy for one engine, after every optimizer step (identical on all ranks).

    DeepSpeed skips a step whose gradients are not finite (fp16 loss-scale overflow or a
    NaN/inf loss in any precision; see ``optimizer_and_schedule`` for plain fp32): weights,
    optimizer state, LR schedule and bank stay as they were. Skipped steps are counted
    (``train/skipped_steps``); ``limit`` of them in a row stop the run with an error.
    """
    if engine.was_step_applied():
        progress.consecutive_skips = 0
        return
    progress.consecutive_skips += 1
    if progress.consecutive_skips >= limit:
        raise CodirError(f"{limit} optimizer steps in a row (up to step {step}) were skipped for non-finite loss or "
                         f"gradients: lower training.lr or check the data, then --resume from the last checkpoint "
                         f"(or raise training.max_consecutive_skips)")
