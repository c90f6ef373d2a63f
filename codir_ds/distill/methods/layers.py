"""Shared base of the intermediate-layer distillation (ILD) methods: pkd, tinybert, distilbert, cr_ild.

An ILD method maps teacher layers to student layers (``method.layer_map``; its own default
map otherwise), asks the recipe for those layers' features (:attr:`features`: ``"cls"`` rows
or whole ``"hidden"`` sequences, plus attention maps when :attr:`uses_attention`), and adds
``layer_loss`` to the task and KD terms. A student narrower than the teacher gets one learned
linear map per layer pair (in the trained module).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from codir_ds import checks
from codir_ds.distill.ild import attention_mse, hidden_mse, layer_pairs
from codir_ds.distill.methods.base import LayerFeatures, LayerSpec, option
from codir_ds.distill.methods.kd import KDConfig, KDMethod
from codir_ds.errors import CodirError

LAYER_MAPS = ("default", "uniform", "last")


@dataclass
class LayerConfig(KDConfig):
    layer_map: Union[str, list[list[int]]] = option(
        "default", "which teacher layer feeds which student layer: default (the method's own map), uniform "
                   "(student layer i <- teacher layer i * Lt / Ls), last (last <- last), or a list of "
                   "[student_layer, teacher_layer] pairs (1-based, 0 = embeddings)")
    alpha_hidden: float = option(1.0, "weight of the hidden-state term: pkd normalised [CLS] MSE, tinybert/cr_ild "
                                      "MSE, distilbert cosine loss")
    alpha_attention: float = option(1.0, "weight of the attention-map MSE (tinybert, cr_ild)")

    @staticmethod
    def check(m) -> None:
        for key in ("alpha_hidden", "alpha_attention"):
            checks.positive(f"method.{key}", getattr(m, key), allow_zero=True)
        if isinstance(m.layer_map, str):
            checks.choice("method.layer_map", m.layer_map, LAYER_MAPS)
        elif not m.layer_map or any(len(pair) != 2 or min(pair) < 0 for pair in m.layer_map):
            raise CodirError(f"config key 'method.layer_map' must be default, uniform, last or a list of "
                             f"[student_layer, teacher_layer] pairs of indices >= 0, got {m.layer_map!r}: "
                             f"{checks.fix('method.layer_map')}")


class LayerMethod(KDMethod):
    """KD plus a loss on mapped intermediate layers; subclasses set ``features`` and ``layer_loss``."""
    config = LayerConfig
    features = "hidden"          # "cls": the [CLS] row of each mapped layer; "hidden": whole sequences
    compare_keys = ("layer_map", "alpha_hidden")

    @property
    def uses_attention(self) -> bool:
        return False

    def layer_spec(self) -> LayerSpec:
        return LayerSpec(self.features, attention=self.uses_attention)

    def default_pairs(self, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
        """The method's own layer map (``method.layer_map: default``): last <- last unless overridden."""
        return [(student_layers, teacher_layers)]

    def layer_pairs(self, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
        """``[(student_layer, teacher_layer)]`` for ``method.layer_map`` (0 = embedding output)."""
        return layer_pairs(self.cfg.layer_map, self.default_pairs(student_layers, teacher_layers),
                           student_layers, teacher_layers)

    def layer_loss(self, student: LayerFeatures, teacher: LayerFeatures, terms: dict) -> torch.Tensor:
        """The weighted intermediate-layer terms (detached copies logged into ``terms``)."""
        raise NotImplementedError

    def loss(self, student, teacher, batch):
        terms: dict = {}
        total = self.supervised(student, teacher, batch, terms)
        total = total + self.layer_loss(student.layers, teacher.layers, terms)
        terms["loss/total"] = total.detach()
        return total, terms


class HiddenAttentionMethod(LayerMethod):
    """ILD on whole hidden states plus, with ``alpha_attention > 0``, attention maps (tinybert, cr_ild)."""
    tags = {"loss/hidden_mse": "hidden-state MSE of the mapped layers (`cr_ild`: its ILD stage)",
            "loss/attention_mse": "attention-map MSE, when `method.alpha_attention` > 0 (`cr_ild`: its ILD stage)"}

    @property
    def uses_attention(self) -> bool:
        return self.cfg.alpha_attention > 0

    def layer_loss(self, student, teacher, terms):
        hid = hidden_mse(student.hidden, teacher.hidden, student.mask)
        total = self.cfg.alpha_hidden * hid
        terms["loss/hidden_mse"] = hid.detach()
        if self.uses_attention:
            att = attention_mse(student.attn, teacher.attn, student.mask)
            total = total + self.cfg.alpha_attention * att
            terms["loss/attention_mse"] = att.detach()
        return total
