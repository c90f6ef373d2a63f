"""The data side of a run, task or corpus: what every recipe asks of its stage.

A :class:`DataStage` knows what the stage trains on and how: the input checks, the collator, the teacher to load
and run, the micro-batches of one optimizer step (:class:`MicroBatch`), evaluation, the export manifest and the
results.json entries. :class:`~codir_ds.recipes.finetune.TaskStage` (finetuning: a task's examples,
classification or regression) and :class:`~codir_ds.recipes.pretrain.CorpusStage` (pre-training: masked-LM blocks
of a corpus) are the two; a recipe holds one as ``recipe.data`` and never branches on the stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch


@dataclass
class MicroBatch:
    """One micro-batch as the models see it."""
    ids: torch.Tensor                         # [B] example (block) ids, host
    inputs: dict                              # the models' keyword inputs on the device
    labels: torch.Tensor                      # [B] classes / targets, or [M] token ids at the masked positions
    size: int                                 # B: examples of this rank (the monitor's sample count)
    token_scale: Optional[torch.Tensor] = None  # pre-training: micro-batch mean -> global per-token mean
    mix: Optional[tuple] = None               # (lam, partner): mixup of word embeddings (mixing stages)


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
        """The frozen teacher (checksum verified), with what the method's :class:`TeacherSpec` asks for."""
        raise NotImplementedError

    def teacher_runner(self, teacher, layers=None, pooling: str = "mean", ild_spec=None):
        """Runs ``teacher`` under inference mode: its logits, pooled ``layers``, the mapped layers of ``ild_spec``."""
        raise NotImplementedError

    def micro_batches(self, batches, stage: str = "train") -> Iterator[MicroBatch]:
        """The micro-batches of one optimizer step (``batches``: this rank's ``(epoch, ids)``), on the device."""
        raise NotImplementedError

    def contrast_labels(self, spec) -> Optional[torch.Tensor]:
        """``[N]`` labels whose other values give a bank's negatives (``spec``: its BankSpec); None: the global
        batch's rows are the negatives."""
        return None

    def feature_batch(self, ids: torch.Tensor) -> dict:
        """The training inputs of ``ids`` on the device, as the bank's features are computed in training."""
        raise NotImplementedError

    def forward_with(self, engine):
        """``batch -> logits`` of ``engine`` for evaluation."""
        raise NotImplementedError

    def evaluate(self, forward) -> dict:
        raise NotImplementedError

    def manifest(self) -> dict:
        raise NotImplementedError

    def summary(self) -> str:
        raise NotImplementedError

    def results(self, final: dict, progress) -> dict:
        raise NotImplementedError
