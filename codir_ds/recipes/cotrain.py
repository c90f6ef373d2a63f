"""CTCD (Lee et al., 2023): co-training and co-distillation of a larger and a smaller model.

Both models are trainable, each in its own DeepSpeed engine with its own optimizer and LR
schedule (the same DeepSpeed JSON and training.* settings), and both see the same batch. One
optimizer step (``train_step``) reads:

1. this rank's ``accumulation`` micro-batches (pre-training: masked on the host for the whole
   step, with the global batch's masked-token count, as in pre-training distillation);
2. per micro step: forward the larger and the smaller model (and, one-way variant, the frozen
   teacher under inference mode), the method's two losses with every soft target detached,
   then ``backward`` and ``step`` of each engine.

The smaller model is the run's student (``model.*``): results.json's ``final``/``best`` and
``export/`` are its; the larger model's are under ``large`` and in ``export_large/``. Both
engines are saved in one atomically published checkpoint.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Optional

from codir_ds.config import ExperimentConfig
from codir_ds.distill.heads import build_module
from codir_ds.distill.methods import LossInputs, SecondModelSpec
from codir_ds.engine.checkpointing import engine_config
from codir_ds.engine.compile import compile_engine
from codir_ds.engine.distributed import set_seed
from codir_ds.engine.optim import optimizer_and_schedule
from codir_ds.engine.rundir import ARCHITECTURE
from codir_ds.engine.sections import section
from codir_ds.errors import CodirError
from codir_ds.models.loading import build_student, check_same_vocab, model_dir, position_limit
from codir_ds.models.size import parameter_counts
from codir_ds.recipes.base import ModelProgress, Progress, Recipe, check_skipped
from codir_ds.recipes.finetune import TaskStage
from codir_ds.recipes.pretrain import CorpusStage

STAGES = {"finetune": TaskStage, "pretrain": CorpusStage}  # the data side of each stage
LARGE = "large"  # the larger model's DeepSpeed tag inside each checkpoint folder: checkpoints/step_N/large/
EXPORT_LARGE = "export_large"


def large_init_dir(spec: Optional[str]) -> Optional[Path]:
    """``method.ctcd_large_init``: a Hugging Face directory or packaged name, or a CTCD run (its export_large/)."""
    if not spec:
        return None
    if (Path(spec) / EXPORT_LARGE / "config.json").is_file():
        return Path(spec) / EXPORT_LARGE
    return model_dir(spec, "method.ctcd_large_init")


def large_model_config(cfg: ExperimentConfig, large_dir: Optional[Path], spec: SecondModelSpec):
    """The ``model.*`` settings ``build_student`` builds the larger model (``spec``) from."""
    if large_dir is not None:
        return dataclasses.replace(cfg.model, init_from=None, student_init=str(large_dir), student_init_layers=None)
    return dataclasses.replace(cfg.model, init_from=None, student_init=None, student_intermediate=None,
                               **spec.sizes)


class CoTrainRecipe(Recipe):
    """Two trainable models, two engines (``engine`` the smaller, ``engine_large`` the larger)."""

    def __init__(self, cfg: ExperimentConfig, ds_config_path: str, output_dir: str, stage: str = "finetune",
                 resume: bool = False, overwrite: bool = False):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
        self.stage, self.data_stage = stage, STAGES[stage]  # the task or the corpus
        super().__init__(cfg, ds_config_path, output_dir, resume, overwrite)
        self.progress = Progress(large=ModelProgress())
        self.monitor_name = "ctcd" if stage == "finetune" else "ctcd-pre"
        self.tokens = 0  # pre-training: real tokens trained on, counted on the host side of the batch

    def check_inputs(self) -> None:
        super().check_inputs()
        self.data.check_inputs()
        self.large_dir = large_init_dir(self.method.second_model.init)
        if self.large_dir is not None:
            check_same_vocab(self.tokenizer, self.large_dir, "method.ctcd_large_init")
            self.data.check_model_dir("method.ctcd_large_init", self.large_dir)

    def setup_models(self) -> None:
        """The frozen teacher (one-way only) and both models, initialised alike on every rank (smaller first)."""
        cfg, data = self.cfg, self.data
        teacher = self.method.teacher  # one-way with alpha_kd = 0: model.teacher is set but never loaded or run
        self.teacher = data.load_teacher(str(self.teacher_dir)) if teacher is not None and teacher.logits else None
        set_seed(cfg.training.seed)
        small = build_student(cfg.model, data.num_labels, data.is_regression, self.tokenizer,
                              template_dir=self.teacher_dir or self.large_dir, masked_lm=data.masked_lm,
                              label_names=data.label_names)
        large = build_student(large_model_config(cfg, self.large_dir, self.method.second_model), data.num_labels,
                              data.is_regression, self.tokenizer, template_dir=self.teacher_dir,
                              masked_lm=data.masked_lm, label_names=data.label_names)
        if data.masked_lm:
            check_mlm_pair(small, large, cfg.corpus.block_size)
        # no heads (the method contrasts nothing): module.student is the model
        self.module, self.teacher_layers = build_module(small, None, self.method, masked_lm=data.masked_lm)
        self.module_large = build_module(large, None, self.method, masked_lm=data.masked_lm)[0]
        self.sizes = {"student": parameter_counts(small), "teacher": parameter_counts(large)}
        self.n_small, self.n_large = self.sizes["student"]["total"], self.sizes["teacher"]["total"]

    def setup_data(self) -> None:
        super().setup_data(self.data.lengths())
        self.collator = self.data.collator()

    def setup_engines(self) -> None:
        """Two engines, two optimizers and schedules, one DeepSpeed JSON."""
        import deepspeed
        engines = []
        for module in (self.module, self.module_large):
            opt, sched = optimizer_and_schedule(module, self.cfg.training, self.total_steps, self.ds)
            engines.append(deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched,
                                                config=copy.deepcopy(engine_config(self.ds, self.universal)))[:2])
        (self.engine, self.optimizer), (self.engine_large, self.optimizer_large) = engines
        if self.cfg.training.compile:
            compile_engine(self.engine)
            compile_engine(self.engine_large)
        self.extra_engines[LARGE] = self.engine_large

    def setup_components(self) -> None:
        self.build_teacher_step()  # the one-way variant's teacher: its logits alone

    def describe(self) -> str:
        data = self.data.summary()
        kind = "one-way from model.teacher" if self.method.second_model.one_way else "mutual"
        return (f"ctcd {self.stage} ({kind}): larger model {self.n_large / 1e6:.2f}M and smaller "
                f"{self.n_small / 1e6:.2f}M parameters ({self.n_large / max(self.n_small, 1):.1f}x fewer); {data}, "
                f"{self.batch_summary()}")

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, batches) -> None:
        for mb in self.data.micro_batches(batches):
            t_out = self.teacher_step(mb) if self.teacher_step is not None else None  # one-way variant only
            batch = LossInputs(mb.labels, pretraining=self.data.masked_lm, is_regression=self.data.is_regression,
                               token_scale=mb.token_scale)
            with section("student_forward_backward"):
                large_logits = self.engine_large(**mb.inputs)["logits"]
                small_logits = self.engine(**mb.inputs)["logits"]
                # Each loss reads the other model's logits detached: two separate graphs, one per engine.
                loss_large, loss_small, terms = self.method.co_loss(
                    large_logits, small_logits, batch, teacher_logits=t_out.logits if t_out is not None else None)
                self.engine_large.backward(loss_large)
                self.engine.backward(loss_small)
            with section("optimizer_step"):
                self.engine_large.step()
                self.engine.step()
            self.progress.micro_step += 1
            self.monitor.accumulate(terms, mb.size * self.world)

    def check_skipped(self) -> None:
        limit, step = self.cfg.training.max_consecutive_skips, self.progress.step
        check_skipped(self.engine, self.progress, limit, step)
        check_skipped(self.engine_large, self.progress.large, limit, step)

    # ------------------------------------------------------------------ evaluation and the end
    def architectures(self) -> dict:
        return {ARCHITECTURE: self.module.student, ARCHITECTURE + "_large": self.module_large.student}

    def trained_models(self) -> list:
        return [("small", self.engine, self.progress, self.run_dir / "export", ""),
                (LARGE, self.engine_large, self.progress.large, self.run_dir / EXPORT_LARGE, "large_")]

    def export_manifest(self, role: str) -> dict:
        return {**self.run_manifest(), "ctcd_model": role}

    def results(self, final: dict, reported: dict, timing: dict) -> dict:
        results = {**self.common_results(), **self.data.results(final["small"], self.progress)}
        large = {"final": final[LARGE], "history": self.progress.large.history,
                 "export_dir": str(self.run_dir / EXPORT_LARGE), "num_parameters": self.n_large}
        if self.data.main_metric is not None:
            large["best"] = self.progress.large.best
        results.update({**timing, "export_dir": str(self.run_dir / "export"), "num_parameters": self.n_small,
                        # The KD weights actually used: alpha_small_to_large / alpha_large_to_small, or alpha_kd.
                        "ctcd": self.method.summary_dict(), LARGE: large})
        return results


def check_mlm_pair(small, large, block_size: int) -> None:
    """Pre-training co-training: both models fit the blocks and share one vocabulary."""
    for what, model in (("model.*", small), ("method.ctcd_large_*", large)):
        if block_size > position_limit(model.config):
            raise CodirError(f"corpus.block_size {block_size} exceeds the {what} model's "
                             f"{position_limit(model.config)} positions: lower corpus.block_size")
    if small.config.vocab_size != large.config.vocab_size:
        raise CodirError(f"the smaller model has {small.config.vocab_size} vocabulary logits and the larger "
                         f"{large.config.vocab_size}: CTCD distils MLM logits between them, so both need one "
                         f"vocabulary; build both from the same tokenizer and architecture")
