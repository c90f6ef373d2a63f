"""Finetuning-stage distillation (CoDIR-Fine, KD, CE, PKD, TinyBERT, DistilBERT, CR-ILD) on one task.

The stage's data side is :class:`TaskStage`: the task's input checks, its micro-batches (collated;
CR-ILD's ILD stage adds supplementary inputs and the mixup draw), the teacher classifier and its
runner, validation and test metrics, the export manifest and results. One optimizer step is the
recipes' one ``train_step`` (``codir_ds/recipes/base.py``): CRD negatives (one bank gather per
step), then per micro-batch the teacher step (or the teacher cache), student forward, the method's
loss terms, backward, step; then the positives' bank updates and the EMA copy. Evaluation scores
the validation split and exports each new best student; ``finish`` writes results.json.
"""
from __future__ import annotations

import math
import sys
import unicodedata
from pathlib import Path

import torch

from codir_ds import checks
from codir_ds.assets import sha256_file
from codir_ds.data.collate import ClassificationCollator, to_device, token_lengths
from codir_ds.data.tasks import TaskData, load_supplementary, load_task
from codir_ds.distill.components import EMAComponent
from codir_ds.distill.heads import build_module
from codir_ds.distill.ild import MixedInputs
from codir_ds.engine.distributed import set_seed
from codir_ds.engine.evaluation import evaluate
from codir_ds.engine.teacher import TeacherRunner
from codir_ds.engine.teacher_cache import CACHE_DIR, TeacherCache
from codir_ds.errors import CodirError
from codir_ds.models.loading import (WEIGHTS, build_student, check_same_vocab, hidden_size, load_teacher,
                                     load_tokenizer, model_dir, position_limit, tokenizer_dir)
from codir_ds.models.size import counts_from_config, parameter_counts, size_comparison
from codir_ds.recipes.base import Recipe
from codir_ds.recipes.stages import DataStage, MicroBatch


def contrast_labels(task: TaskData, bins: int) -> torch.Tensor:
    """Labels that define CRD negatives: class ids, or equal-frequency target bins for regression."""
    values = torch.tensor([ex.label for ex in task.train], dtype=torch.float64)
    if not task.is_regression:
        return values.long()
    edges = torch.quantile(values, torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1])
    return torch.bucketize(values, edges).long()


def check_task_inputs(recipe: Recipe) -> None:
    """Finetuning's input checks, cheap first; loads the task and tokenizer (sets ``task``, ``tokenizer``,
    ``teacher_dir``, ``supplementary`` on ``recipe``). Writes nothing. Shared with co-training."""
    cfg = recipe.cfg
    recipe.task = load_task(cfg.data)
    micro = recipe.ds["train_micro_batch_size_per_gpu"]
    if len(recipe.task.train) < micro * recipe.world:
        raise CodirError(f"the training set has {len(recipe.task.train)} examples, fewer than one global "
                         f"micro-batch ({micro} x {recipe.world} ranks): lower the batch size or add data")
    checks.fits_global_batch(len(recipe.task.train), "the training set", recipe.ds, cfg.training.deterministic)
    check_task_extremes(recipe)
    recipe.teacher_dir = model_dir(cfg.model.teacher, "model.teacher") if cfg.model.teacher else None
    recipe.tokenizer = load_tokenizer(tokenizer_dir(cfg.model))
    check_max_length(recipe, model_positions(recipe))
    if recipe.method.teacher is not None:
        check_same_vocab(recipe.tokenizer, recipe.teacher_dir, "model.teacher")
    recipe.supplementary = load_supplementary(cfg.data, recipe.task)  # CR-ILD's extra ILD inputs, ids < 0
    recipe.num_train = len(recipe.task.train)


def has_text(text) -> bool:
    """Whether a text holds anything a tokenizer keeps: a letter, digit, punctuation or symbol (emoji included),
    not only whitespace, control or zero-width characters."""
    return text is not None and any(ch.isalnum() or unicodedata.category(ch)[0] in "PS" for ch in text)


def check_task_extremes(recipe: Recipe) -> None:
    """Data that loads but cannot train or be scored meaningfully: one class, constant regression targets
    (train: nothing to fit; validation: correlations undefined), CRD bins without negatives, no text at all."""
    task, cfg = recipe.task, recipe.cfg
    files = task.name == "files"
    where = {"training": f"data.train_file '{cfg.data.train_file}'" if files else f"task {task.name}",
             "validation": (f"data.validation_file '{cfg.data.validation_file}'" if files and cfg.data.validation_file
                            else f"the validation split of task {task.name}")}
    limit = {"training": "data.max_train_examples", "validation": "data.max_eval_examples"}
    splits = (("training", task.train), ("validation", task.validation))
    train_y = [ex.label for ex in task.train]
    if not task.is_regression and len(set(train_y)) < 2:
        raise CodirError(f"every training example of {where['training']} has label "
                         f"{task.label_names[train_y[0]]!r}: a classifier needs at least 2 classes to learn "
                         f"anything; add examples of other classes (check data.label_column, {limit['training']})")
    for split, examples in splits if task.is_regression else ():
        values = {ex.label for ex in examples}
        if len(values) == 1:
            why = ("there is nothing to fit" if split == "training"
                   else "Pearson and Spearman correlations are undefined on constant targets")
            raise CodirError(f"every {split} target of {where[split]} is {next(iter(values))}: {why}; add "
                             f"examples with other targets (check data.label_column, {limit[split]})")
    bank = recipe.method.bank
    if task.is_regression and bank is not None and len(set(contrast_labels(task, bank.regression_bins).tolist())) < 2:
        raise CodirError(f"method.regression_bins={bank.regression_bins} puts every training target of "
                         f"{where['training']} into one bin, so CRD has no negatives (examples of other bins): "
                         f"set method.regression_bins >= 2 or add examples with other targets")
    for split, examples in splits:
        if not any(has_text(ex.text) or has_text(ex.text_pair) for ex in examples):
            raise CodirError(f"every {split} text of {where[split]} is empty or whitespace, so the model would see "
                             f"only special tokens: check data.text_column (and data.text_pair_column)")


def model_positions(recipe: Recipe) -> list:
    """``[(what, model directory or None)]`` whose position embeddings bound ``data.max_length``: the teacher,
    the student's init directory; None: a student built from a config without a template (512 positions)."""
    mc = recipe.cfg.model
    dirs = [(f"model.teacher '{recipe.teacher_dir}'", recipe.teacher_dir)] if recipe.teacher_dir else []
    if mc.student_init:
        dirs.append((f"model.student_init '{mc.student_init}'", model_dir(mc.student_init, "model.student_init")))
    elif mc.init_from:
        run = Path(mc.init_from)
        run = run / "export" if (run / "export" / "config.json").is_file() else run
        if (run / "config.json").is_file():
            dirs.append((f"model.init_from '{mc.init_from}'", run))
    elif not dirs:
        dirs.append(("the student built from model.student_*", None))
    return dirs


def check_max_length(recipe: Recipe, dirs: list) -> None:
    """``data.max_length`` between what the special tokens need and the position embeddings of ``dirs``."""
    from transformers import AutoConfig
    length, task = recipe.cfg.data.max_length, recipe.task
    pairs = task.train[0].text_pair is not None
    specials = recipe.tokenizer.num_special_tokens_to_add(pair=pairs)
    least = specials + (2 if pairs else 1)  # one token of text (per side)
    if length < least:
        raise CodirError(f"data.max_length {length} leaves no room for text ({specials} special tokens per "
                         f"{'text pair' if pairs else 'text'}): set data.max_length >= {least}")
    for what, path in dirs:
        limit = position_limit(AutoConfig.from_pretrained(str(path))) if path is not None else 512
        if length > limit:
            raise CodirError(f"data.max_length {length} exceeds the {limit} positions of {what}: set data.max_length "
                             f"<= {limit} (longer texts are truncated)")


def task_summary(task: TaskData) -> str:
    test = f" / {len(task.test)} test" if task.test else ""
    return f"{len(task.train)} train / {len(task.validation)} validation{test} examples"


# Fewer optimizer steps than this and a student rarely moves off the majority class: measured on a 300-row
# CSV, where 16 steps left kd and codir students at the majority class while the teacher reached 1.0, and
# on movie_snippets, where the README's 124 steps train every method (docs/data.md, small data).
MIN_STEPS = 100


def short_schedule_warning(total_steps: int, num_train: int, cfg, batch: int, steps_per_epoch: int):
    """A start-up warning when the schedule is too short for the student to learn, with what to raise; None
    when it is long enough."""
    if total_steps >= MIN_STEPS:
        return None
    t = cfg.training
    schedule = (f"training.max_steps={t.max_steps}" if t.max_steps > 0
                else f"{t.epochs:g} epoch(s) of {steps_per_epoch} step(s)")
    epochs = math.ceil(MIN_STEPS / max(steps_per_epoch, 1))
    fix = ("raise training.max_steps" if t.max_steps > 0 else
           f"raise training.epochs (--set training.epochs={epochs} gives {epochs * steps_per_epoch} steps)")
    return (f"warning: this run makes only {total_steps} optimizer steps ({num_train} training examples, batch "
            f"{batch}, {schedule}): a student usually needs {MIN_STEPS} or more to move off the majority class; "
            f"{fix}, lower training.train_batch_size, or add data (docs/data.md: small data)")


def task_lengths(recipe: Recipe):
    """Token counts of the training examples when ``data.group_by_length`` is on, else None."""
    if not recipe.cfg.data.group_by_length:
        return None
    return token_lengths(recipe.tokenizer, recipe.task.train, recipe.cfg.data.max_length)


class TaskStage(DataStage):
    """Finetuning's data: the task's training examples (with the mixing stages' supplementary examples and mixup
    draw), validation metrics, the best model exported as it comes."""
    name = "finetune"

    def __init__(self, recipe):
        super().__init__(recipe)
        self.mixer = None  # MixedInputs of a method with a MixSpec (set up with the run's components)

    def check_inputs(self) -> None:
        check_task_inputs(self.recipe)

    def check_model_dir(self, what: str, path) -> None:
        check_max_length(self.recipe, [(f"{what} '{path}'", path)])

    @property
    def task(self) -> TaskData:
        return self.recipe.task

    @property
    def num_labels(self) -> int:
        return self.task.num_labels

    @property
    def is_regression(self) -> bool:
        return self.task.is_regression

    @property
    def label_names(self) -> tuple:
        return self.task.label_names

    @property
    def main_metric(self) -> str:
        return self.task.metric_names[0]

    def lengths(self):
        return task_lengths(self.recipe)

    def collator(self):
        r = self.recipe
        return ClassificationCollator(r.tokenizer, r.cfg.data.max_length, self.is_regression)

    def load_teacher(self, path: str):
        r = self.recipe
        return load_teacher(path, self.num_labels, r.dtype, r.cfg.model.teacher_sha256, source=r.cfg.source)

    def teacher_runner(self, teacher, layers=None, pooling: str = "mean", ild_spec=None):
        return TeacherRunner(teacher, layers, pooling, ild_spec)

    def setup_mixing(self, spec, supplementary) -> None:
        """The mixing stages' inputs for a method's MixSpec ``spec`` (None: never mixed)."""
        r = self.recipe
        if spec is not None:
            self.mixer = MixedInputs(spec.alpha, supplementary if spec.supplementary else [],
                                     r.cfg.training.seed, r.rank)

    def micro_batches(self, batches, stage: str = "train"):
        r = self.recipe
        mixes = self.mixer is not None and r.method.mixes_inputs(stage)
        for _, ids in batches:
            examples, mix = [self.task.train[i] for i in ids.tolist()], None
            if mixes:  # CR-ILD: supplementary inputs join the batch, embeddings are mixed
                examples, mix = self.mixer(examples, r.progress.micro_step)
            batch = to_device(r.collator(examples), r.device)
            inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          token_type_ids=batch.get("token_type_ids"))
            yield MicroBatch(ids, inputs, batch["labels"], len(ids), mix=mix)

    def contrast_labels(self, spec) -> torch.Tensor:
        return contrast_labels(self.task, spec.regression_bins)

    def feature_batch(self, ids: torch.Tensor) -> dict:
        r = self.recipe
        return to_device(r.collator([self.task.train[i] for i in ids.tolist()]), r.device)

    def forward_with(self, engine):
        return lambda b: engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                token_type_ids=b.get("token_type_ids"))["logits"]

    def evaluate(self, forward, split: str = "validation") -> dict:
        r = self.recipe
        return evaluate(forward, getattr(self.task, split), r.collator, r.cfg.training.eval_batch_size, r.device,
                        self.task.metric_names, r.rank, r.world)

    def manifest(self) -> dict:
        return {"task": self.task.name, "label_names": self.task.label_names}

    def summary(self) -> str:
        return task_summary(self.task)

    def results(self, final: dict, progress) -> dict:
        task = self.task
        return {"task": task.name, "num_train_examples": len(task.train), "parameters": self.recipe.sizes,
                "num_validation_examples": len(task.validation), "main_metric": self.main_metric,
                "final": final, "best": progress.best, "history": progress.history}


class FinetuneRecipe(Recipe):
    """Distil a frozen teacher into a student classifier (or regressor) on one task."""
    stage = "finetune"
    data_stage = TaskStage
    monitor_name = property(lambda self: self.method.name)

    def check_inputs(self) -> None:
        super().check_inputs()
        self.data.check_inputs()

    def setup_models(self) -> None:
        """Teacher (checksum, classification head), then the student and the method's heads, seeded alike
        on every rank."""
        self.teacher = self.load_teacher_model() if self.method.teacher is not None else None
        set_seed(self.cfg.training.seed)  # identical student / head initialisation on every rank
        student = self.build_student_model()
        self.module, self.teacher_layers = build_module(student, self.teacher, self.method)
        teacher_size = (parameter_counts(self.teacher) if self.teacher is not None else
                        counts_from_config(self.teacher_dir, self.task.num_labels) if self.teacher_dir else None)
        self.sizes = {"student": parameter_counts(student), "teacher": teacher_size}
        decay = self.method.ema_decay
        self.ema = self.components.add(EMAComponent(student, decay, lambda: self.engine.module.student,
                                                   active=self.method.uses_layers)) if decay > 0 else None

    def load_teacher_model(self) -> torch.nn.Module:
        """The frozen teacher classifier (checksum verified, classification head for this task)."""
        return self.data.load_teacher(str(self.teacher_dir))

    def build_student_model(self) -> torch.nn.Module:
        """The student classifier (``model.*``), from layers of another model or a config."""
        return build_student(self.cfg.model, self.task.num_labels, self.task.is_regression, self.tokenizer,
                             template_dir=self.teacher_dir, label_names=self.task.label_names)

    def setup_data(self) -> None:
        super().setup_data(self.data.lengths())
        self.collator = self.data.collator()
        warning = short_schedule_warning(self.total_steps, self.num_train, self.cfg, self.ds["train_batch_size"],
                                         self.steps_per_epoch)
        if warning and self.rank == 0:
            print(warning, file=sys.stderr, flush=True)

    def compiled_with(self) -> tuple:
        return (self.ema.model,) if self.ema is not None else ()

    def setup_components(self) -> None:
        """EMA copy, memory bank and label negatives, teacher cache and teacher step, mixed inputs."""
        if self.ema is not None:
            self.ema.model.to(device=self.device, dtype=self.dtype)
        self.build_bank()
        self.cache = self.components.add(self.open_teacher_cache()) if self.cfg.training.teacher_cache else None
        self.build_teacher_step(self.cache)
        self.data.setup_mixing(self.method.mixing, self.supplementary)

    def open_teacher_cache(self) -> TeacherCache:
        """Memory-mapped per-example teacher logits (and pooled features) under <run>/teacher_cache/."""
        pooled = self.teacher_layers is not None  # a contrast spec: the pooled features are cached too
        meta = {"teacher": str(self.teacher_dir), "teacher_sha256": sha256_file(self.teacher_dir / WEIGHTS),
                "task": self.task.name, "num_examples": self.num_train, "max_length": self.cfg.data.max_length,
                "teacher_layers": self.teacher_layers, "pooling": self.module.pooling,
                "dtype": str(self.dtype)}
        feature_dim = len(self.teacher_layers) * hidden_size(self.teacher) if pooled else None
        return TeacherCache(self.run_dir / CACHE_DIR, self.rank, self.num_train, self.task.num_labels, feature_dim,
                            meta)

    def describe(self) -> str:
        return (f"{self.method.name}: {task_summary(self.task)}, {size_comparison(**self.sizes)}, "
                f"{self.batch_summary()}")

    # ------------------------------------------------------------------ evaluation and the end
    def final_reports(self) -> dict:
        """The final model's metrics on the task's test split (None without one). COLLECTIVE. Reported only:
        nothing is selected on them."""
        task = self.task
        if not task.test:
            return {"test": None}
        with self.eval_mode():
            metrics = self.data.evaluate(self.data.forward_with(self.engine), "test")
        if self.rank == 0:
            print(f"test split ({len(task.test)} examples, final model): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        return {"test": metrics}

    def results(self, final: dict, reported: dict, timing: dict) -> dict:
        task = self.task
        return {"task": task.name, **self.common_results(), "num_train_examples": len(task.train),
                "num_validation_examples": len(task.validation), "num_test_examples": len(task.test),
                "main_metric": task.metric_names[0], "final": final["student"], "test": reported["test"],
                "best": self.progress.best, "history": self.progress.history,
                "parameters": self.sizes, **timing, "export_dir": str(self.run_dir / "export")}
