"""``cr_ild``: CR-ILD (Ko et al., 2023), two stages on one run's optimizer steps.

1. ILD stage (the first ``ild_fraction`` of the steps): on mixup inputs (embedding-level,
   lambda ~ Beta(a, a), lambda <- max(lambda, 1 - lambda)), optionally with supplementary
   inputs in each batch, the last layers' hidden-state MSE (alpha_hidden) and attention MSE
   (alpha_attention), plus w(step) * consistency: the student's last layer (and attention) on
   the mixed input against the lambda-mix of its own (or an EMA copy's) clean representations,
   w ramping linearly from 0 to alpha_consistency. No task or KD term.
2. KD stage: task loss plus prediction-layer KD (alpha_kd, kd_temperature).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from codir_ds import checks
from codir_ds.distill.ild import attention_mse, consistency_weight, hidden_mse
from codir_ds.distill.methods.base import LayerSpec, MixSpec, option
from codir_ds.distill.methods.layers import HiddenAttentionMethod, LayerConfig
from codir_ds.distill.methods.registry import register_method
from codir_ds.engine.ds_config import zero_stage
from codir_ds.errors import CodirError


@dataclass
class CRILDConfig(LayerConfig):
    ild_fraction: float = option(0.5, "fraction of the optimizer steps in the ILD stage; the rest is "
                                      "prediction-layer KD (+ CE) with alpha_kd / kd_temperature")
    alpha_consistency: float = option(1.0, "final weight of the mixup consistency term")
    consistency_ramp: float = option(1.0, "fraction of the ILD stage over which that weight rises 0 -> final")
    mixup_alpha: float = option(1.0, "lambda ~ Beta(a, a), then lambda = max(lambda, 1 - lambda)")
    consistency_ema: float = option(0.0, "0: clean targets from the student itself (no grad); in (0, 1): from an "
                                         "EMA copy of the student with this decay")

    @staticmethod
    def check(m) -> None:
        checks.positive("method.alpha_consistency", m.alpha_consistency, allow_zero=True)
        checks.positive("method.mixup_alpha", m.mixup_alpha)
        checks.in_range("method.ild_fraction", m.ild_fraction, 0.0 <= m.ild_fraction <= 1.0, "[0, 1]")
        checks.in_range("method.consistency_ramp", m.consistency_ramp, 0.0 < m.consistency_ramp <= 1.0, "(0, 1]")
        checks.in_range("method.consistency_ema", m.consistency_ema, 0.0 <= m.consistency_ema < 1.0, "[0, 1)")


@register_method
class CRILD(HiddenAttentionMethod):
    name = "cr_ild"
    config = CRILDConfig
    stages = ("finetune",)
    summary = "last-layer ILD with mixup consistency (and supplementary data), then prediction-layer KD"
    reference = "CR-ILD, Ko et al. 2023"
    tags = {"loss/consistency": "the mixup consistency term (ILD stage)",
            "train/consistency_weight": "the consistency term's current weight (ILD stage)"}
    compare_keys = ("ild_fraction", "alpha_consistency")
    compare_sets = ("data.supplementary={supplementary}", "data.supplementary_max_examples={max_train_examples}")

    def layer_spec(self) -> LayerSpec:
        return LayerSpec("hidden", attention=self.uses_attention, consistency=self.cfg.alpha_consistency > 0)

    def mix_spec(self) -> MixSpec:  # the ILD stage mixes, with data.supplementary's examples
        return MixSpec(self.cfg.mixup_alpha, supplementary=True)

    def check_engine(self, ds: dict) -> None:
        if self.ema_decay > 0 and zero_stage(ds) == 3:
            raise CodirError("method.consistency_ema keeps a full copy of the student, which ZeRO-3 partitions: use "
                             "ds_configs/zero2.json or set method.consistency_ema=0")

    @property
    def ema_decay(self) -> float:
        return self.cfg.consistency_ema if self.layers.consistency else 0.0

    def uses_layers(self, stage: str) -> bool:
        return stage == "ild"

    def mixes_inputs(self, stage: str) -> bool:
        return stage == "ild"

    def ild_steps(self, total_steps: int) -> int:
        return round(self.cfg.ild_fraction * total_steps)

    def stage_at(self, step: int, total_steps: int) -> str:
        return "ild" if step < self.ild_steps(total_steps) else "kd"

    def consistency_weight(self, step: int, total_steps: int) -> float:
        return consistency_weight(step, self.ild_steps(total_steps), self.cfg.consistency_ramp,
                                  self.cfg.alpha_consistency)

    def loss(self, student, teacher, batch):
        terms: dict = {}
        if batch.stage != "ild":
            total = self.supervised(student, teacher, batch, terms)
            terms["loss/total"] = total.detach()
            return total, terms
        total = self.layer_loss(student.layers, teacher.layers, terms)
        cons = student.consistency
        if cons is not None:
            term = hidden_mse([cons.hidden], [cons.hidden_target], student.layers.mask)
            if cons.attn is not None:
                term = term + attention_mse([cons.attn], [cons.attn_target], student.layers.mask)
            total = total + batch.consistency_weight * term
            terms["loss/consistency"] = term.detach()
            terms["train/consistency_weight"] = torch.tensor(float(batch.consistency_weight))
        terms["loss/total"] = total.detach()
        return total, terms
