"""The data side of a run, task or corpus, for recipes that serve both stages (co-training).

A :class:`DataStage` knows what the stage trains on and how: the input checks, the collator, the models'
keyword inputs and labels per micro-batch, the teacher to load, evaluation, the export manifest and the
results.json entries. ``stage_for(name, recipe)`` gives :class:`TaskStage` (finetuning: a task's examples,
classification or regression) or :class:`CorpusStage` (pre-training: masked-LM blocks of a corpus), so the
recipe never branches on the stage.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from codir_ds.data.collate import ClassificationCollator, to_device
from codir_ds.data.mlm import MLMCollator
from codir_ds.engine.evaluation import evaluate, evaluate_mlm
from codir_ds.engine.teacher import MLMTeacherRunner, TeacherRunner
from codir_ds.models.loading import load_teacher
from codir_ds.models.mlm import load_mlm_teacher
from codir_ds.recipes.finetune import check_max_length, check_task_inputs, task_lengths, task_summary
from codir_ds.recipes.pretrain import check_corpus_inputs, corpus_summary, count_tokens, mask_step


class DataStage:
    """What a recipe needs to know about its stage's data; ``recipe`` is the run it serves."""
    name = ""
    masked_lm = False

    def __init__(self, recipe):
        self.recipe = recipe

    # everything below is stage-specific
    def check_inputs(self) -> None:
        raise NotImplementedError

    def check_model_dir(self, what: str, path) -> None:
        """A further model directory (e.g. CTCD's larger model) fits the stage's inputs."""

    @property
    def num_labels(self) -> int:
        return 0

    @property
    def is_regression(self) -> bool:
        return False

    @property
    def label_names(self) -> tuple:
        return ()

    @property
    def main_metric(self) -> Optional[str]:
        """The metric a best model is chosen on (None: no best kept)."""
        return None

    def lengths(self):
        """Token counts for ``data.group_by_length`` (None: no grouping)."""
        return None

    def collator(self):
        raise NotImplementedError

    def load_teacher(self, path: str):
        raise NotImplementedError

    def teacher_runner(self, teacher):
        raise NotImplementedError

    def step_inputs(self, batches) -> Iterator[tuple[dict, torch.Tensor, Optional[torch.Tensor], int]]:
        """Per micro-batch: the models' keyword inputs on the device, labels, token scale, batch size."""
        raise NotImplementedError

    def forward_with(self, engine):
        raise NotImplementedError

    def evaluate(self, forward) -> dict:
        raise NotImplementedError

    def manifest(self) -> dict:
        raise NotImplementedError

    def summary(self) -> str:
        raise NotImplementedError

    def results(self, final: dict, progress) -> dict:
        raise NotImplementedError


class TaskStage(DataStage):
    """Finetuning: the task's training examples, validation metrics, the best model exported as it comes."""
    name = "finetune"

    def check_inputs(self) -> None:
        check_task_inputs(self.recipe)

    def check_model_dir(self, what: str, path) -> None:
        check_max_length(self.recipe, [(f"{what} '{path}'", path)])

    @property
    def task(self):
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

    def teacher_runner(self, teacher):
        return TeacherRunner(teacher, None)

    def step_inputs(self, batches):
        r = self.recipe
        for _, ids in batches:
            batch = to_device(r.collator([self.task.train[i] for i in ids.tolist()]), r.device)
            inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          token_type_ids=batch.get("token_type_ids"))
            yield inputs, batch["labels"], None, len(ids)

    def forward_with(self, engine):
        return lambda b: engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                token_type_ids=b.get("token_type_ids"))["logits"]

    def evaluate(self, forward) -> dict:
        r = self.recipe
        return evaluate(forward, self.task.validation, r.collator, r.cfg.training.eval_batch_size, r.device,
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


class CorpusStage(DataStage):
    """Pre-training: masked-LM blocks of the corpus, held-out MLM metrics, the final models exported."""
    name = "pretrain"
    masked_lm = True

    def check_inputs(self) -> None:
        check_corpus_inputs(self.recipe)

    def collator(self):
        r = self.recipe
        return MLMCollator(r.tokenizer, r.method.mlm_probability, seed=r.cfg.training.seed)

    def load_teacher(self, path: str):
        r = self.recipe
        return load_mlm_teacher(path, r.dtype, r.cfg.model.teacher_sha256, need_head=True, source=r.cfg.source)

    def teacher_runner(self, teacher):
        return MLMTeacherRunner(teacher, None, logits=True)

    def step_inputs(self, batches):
        r = self.recipe
        for mb in mask_step(r, batches):  # vocabulary logits at the masked positions only
            batch = to_device(mb.host, r.device)
            labels = mb.host["labels"].reshape(-1)[mb.rows].to(r.device, non_blocking=True)
            r.tokens += int(mb.host["attention_mask"].sum())
            inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          rows=mb.rows.to(r.device, non_blocking=True))
            yield inputs, labels, mb.token_scale, len(mb.ids)

    def forward_with(self, engine):
        return lambda b: engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"], rows=b["rows"])["logits"]

    def evaluate(self, forward) -> dict:
        r = self.recipe
        return evaluate_mlm(forward, r.corpus, r.collator, r.cfg.training.eval_batch_size, r.device, r.rank, r.world)

    def manifest(self) -> dict:
        return {"stage": "pretrain"}

    def summary(self) -> str:
        return corpus_summary(self.recipe.corpus)

    def results(self, final: dict, progress) -> dict:
        r = self.recipe
        tokens = count_tokens(r.tokens, r.device, r.world)
        return {"stage": "pretrain", "block_size": r.corpus.block_size, "num_train_blocks": r.num_train,
                "num_validation_blocks": len(r.corpus.validation_ids), "corpus": str(r.corpus.path),
                "final": final, "history": progress.history,
                "tokens_per_second": round(tokens / max(r.elapsed, 1e-9), 1)}


STAGES = {"finetune": TaskStage, "pretrain": CorpusStage}


def stage_for(name: str, recipe) -> DataStage:
    """The data stage ``name`` (finetune / pretrain) of ``recipe``."""
    if name not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {name!r}")
    return STAGES[name](recipe)
