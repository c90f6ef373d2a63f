"""``ctcd``: CTCD (Lee et al., 2023), co-training and co-distillation of a larger and a smaller model.

Both models are trainable (two DeepSpeed engines; the co-training recipe) and see the same batch:
``L_large = L_task(large) + a_sl * KD(small -> large)``, ``L_small = L_task(small) + a_ls * KD(large ->
small)``, every soft target detached. One-way variant (``ctcd_one_way``): the frozen ``model.teacher``
distils into both models with ``alpha_kd`` each, and they do not distil into each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from codir_ds import checks
from codir_ds.distill.methods.base import (LossInputs, Method, SecondModelSpec, TeacherSpec, option, soft_kd,
                                           task_loss)
from codir_ds.distill.methods.kd import KDConfig
from codir_ds.distill.methods.registry import register_method
from codir_ds.errors import CodirError


@dataclass
class CTCDConfig(KDConfig):
    ctcd_large_init: Optional[str] = option(None, "the larger model: a directory (e.g. all-MiniLM-L6-v2), a CTCD run "
                                                  "(its export_large/), or null for a random model of the sizes below; "
                                                  "the smaller model is the student (model.*)")
    ctcd_large_layers: int = option(4, "random larger model: layers")
    ctcd_large_hidden: int = option(256, "random larger model: hidden size")
    ctcd_large_heads: int = option(4, "random larger model: attention heads")
    alpha_small_to_large: float = option(0.5, "weight of KD(small -> large) in the larger model's loss")
    alpha_large_to_small: float = option(0.5, "weight of KD(large -> small) in the smaller model's loss")
    ctcd_one_way: bool = option(False, "one-way variant: the frozen model.teacher distils into both models "
                                       "(alpha_kd each), and the two do not distil into each other")

    @staticmethod
    def check(m) -> None:
        for key in ("alpha_small_to_large", "alpha_large_to_small"):
            checks.positive(f"method.{key}", getattr(m, key), allow_zero=True)


@register_method
class CTCD(Method):
    name = "ctcd"
    config = CTCDConfig
    summary = "a larger and a smaller model trained together, each distilling into the other"
    reference = "CTCD, Lee et al. 2023"
    compare_keys = ("alpha_small_to_large", "alpha_large_to_small")
    compare_sets = ("method.ctcd_large_init=all-MiniLM-L6-v2",)
    teacher_condition = " with method.ctcd_one_way"
    tags = {"loss/large_task": "the larger model's task (or masked-LM) loss",
            "loss/small_task": "the smaller model's task (or masked-LM) loss",
            "loss/large_kd": "the larger model's KD term", "loss/small_kd": "the smaller model's KD term"}

    def teacher_spec(self) -> Optional[TeacherSpec]:
        # one-way with alpha_kd = 0 needs model.teacher set but never loads or runs it
        return TeacherSpec(logits=self.cfg.alpha_kd > 0) if self.cfg.ctcd_one_way else None

    def second_model_spec(self) -> SecondModelSpec:
        m = self.cfg
        return SecondModelSpec(m.ctcd_large_init, {"student_layers": m.ctcd_large_layers,
                                                   "student_hidden": m.ctcd_large_hidden,
                                                   "student_heads": m.ctcd_large_heads}, m.ctcd_one_way)

    @classmethod
    def validate(cls, cfg) -> None:
        m = cfg.method
        if not m.ctcd_large_init:
            for key in ("ctcd_large_layers", "ctcd_large_hidden", "ctcd_large_heads"):
                checks.positive(f"method.{key}", getattr(m, key))
            if m.ctcd_large_hidden % m.ctcd_large_heads:
                raise CodirError(f"method.ctcd_large_hidden ({m.ctcd_large_hidden}) must be divisible by "
                                 f"method.ctcd_large_heads ({m.ctcd_large_heads}): change one of them")

    @property
    def alpha_large(self) -> float:
        return self.cfg.alpha_kd if self.cfg.ctcd_one_way else self.cfg.alpha_small_to_large

    @property
    def alpha_small(self) -> float:
        return self.cfg.alpha_kd if self.cfg.ctcd_one_way else self.cfg.alpha_large_to_small

    def summary_dict(self) -> dict:
        """The KD weights actually used (results.json's ``ctcd``)."""
        return {"one_way": self.cfg.ctcd_one_way, "alpha_kd_large": self.alpha_large, "alpha_kd_small": self.alpha_small,
                "kd_temperature": self.cfg.kd_temperature, "kd_t2_scale": self.cfg.kd_t2_scale}

    def soft_kd(self, logits: torch.Tensor, target: torch.Tensor, batch: LossInputs) -> torch.Tensor:
        return soft_kd(logits, target.detach(), self.cfg.kd_temperature, self.cfg.kd_t2_scale,
                       batch.is_regression and not batch.pretraining)

    def co_loss(self, large_logits: torch.Tensor, small_logits: torch.Tensor, batch: LossInputs,
                teacher_logits: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``(L_large, L_small, terms)``; logits ``[B, C]`` or ``[M, V]`` at masked positions."""
        task_large, _ = task_loss(large_logits, batch)
        task_small, _ = task_loss(small_logits, batch)
        large_target = teacher_logits if self.cfg.ctcd_one_way else small_logits
        small_target = teacher_logits if self.cfg.ctcd_one_way else large_logits
        if large_target is None:  # one-way with alpha_kd = 0: no teacher was loaded
            kd_large = kd_small = large_logits.float().sum() * 0.0
        else:
            kd_large = self.soft_kd(large_logits, large_target, batch)
            kd_small = self.soft_kd(small_logits, small_target, batch)
        if batch.token_scale is not None:
            kd_large, kd_small = kd_large * batch.token_scale, kd_small * batch.token_scale
        loss_large = task_large + self.alpha_large * kd_large
        loss_small = task_small + self.alpha_small * kd_small
        terms = {"loss/large_task": task_large.detach(), "loss/small_task": task_small.detach(),
                 "loss/large_kd": kd_large.detach(), "loss/small_kd": kd_small.detach(),
                 "loss/total": (loss_large + loss_small).detach()}
        return loss_large, loss_small, terms

    def loss(self, student, teacher, batch):
        raise CodirError("ctcd trains two models: its loss is co_loss(large_logits, small_logits, ...), run by the "
                         "co-training recipe")
