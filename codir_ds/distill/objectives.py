"""Finetuning objectives, one per method, chosen by ``method.name``.

Eq. 1 of the CoDIR paper: ``L = L_task + a1 * L_KD + a2 * L_CRD``.

- ``ce``:    L_task only (plain finetuning).
- ``kd``:    L_task + a1 * [rho^2] * KL(softmax(z_t/rho) || softmax(z_s/rho)).
- ``codir``: ``kd`` + a2 * InfoNCE(teacher positive vs. K bank negatives).
- ``pkd``:        ``kd`` + a_hidden * PKD's normalised [CLS] MSE over the layer map.
- ``tinybert``:   ``kd`` + a_hidden * hidden-state MSE + a_attention * attention MSE over the layer map.
- ``distilbert``: ``kd`` + a_hidden * cosine loss on the last hidden states.
- ``cr_ild``:     ILD stage: a_hidden * last-layer hidden MSE + a_attention * attention MSE on
  mixed inputs + w(step) * consistency MSE (hidden and attention); KD stage: ``kd``.

Regression tasks (one output): L_task is MSE to the target, and the KD term is
the MSE between student and teacher predictions (a softmax over one output is
constant); CRD negatives come from other target bins (see negatives module).

An objective computes loss terms from tensors it is given; it owns neither the
teacher nor the bank (the trainer runs the teacher and fetches negatives).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from codir_ds.distill.ild import ILD_METHODS, attention_mse, cosine_loss, hidden_mse, pkd_loss
from codir_ds.distill.losses import crd_loss, crd_loss_classes, crd_loss_shared, crd_scores, kd_loss


@dataclass
class _Weights:
    """Which terms of Eq. 1 an objective has, and their hyper-parameters."""
    name: str
    uses_teacher: bool
    uses_crd: bool
    alpha_kd: float = 0.0
    alpha_crd: float = 0.0
    kd_temperature: float = 1.0
    kd_t2_scale: bool = True
    crd_temperature: float = 0.07
    alpha_hidden: float = 0.0
    alpha_attention: float = 0.0

    @property
    def uses_ild(self) -> bool:
        return self.name in ILD_METHODS

    @property
    def uses_attention(self) -> bool:
        return self.name in ("tinybert", "cr_ild") and self.alpha_attention > 0

    def ild_terms(self, ild: dict, terms: dict) -> torch.Tensor:
        """The intermediate-layer terms of pkd / tinybert / distilbert / cr_ild, weighted and summed.

        ``ild`` holds the student's and teacher's mapped features: ``s_cls``/``t_cls`` (pkd),
        ``s_hidden``/``t_hidden`` lists of ``[B, L, d_t]`` and ``mask`` (tinybert, distilbert,
        cr_ild), ``s_attn``/``t_attn`` lists (tinybert, cr_ild); for cr_ild's consistency term
        also ``cons_hidden``/``cons_hidden_target``, ``cons_attn``/``cons_attn_target`` and
        ``cons_weight``.
        """
        if self.name == "pkd":
            loss = pkd_loss(ild["s_cls"], ild["t_cls"])
            terms["loss/pkd"] = loss.detach()
            return self.alpha_hidden * loss
        if self.name == "distilbert":
            loss = cosine_loss(ild["s_hidden"][-1], ild["t_hidden"][-1], ild["mask"])
            terms["loss/cosine"] = loss.detach()
            return self.alpha_hidden * loss
        hid = hidden_mse(ild["s_hidden"], ild["t_hidden"], ild["mask"])
        total = self.alpha_hidden * hid
        terms["loss/hidden_mse"] = hid.detach()
        if self.uses_attention:
            att = attention_mse(ild["s_attn"], ild["t_attn"], ild["mask"])
            total = total + self.alpha_attention * att
            terms["loss/attention_mse"] = att.detach()
        if "cons_hidden" in ild:
            cons = hidden_mse([ild["cons_hidden"]], [ild["cons_hidden_target"]], ild["mask"])
            if "cons_attn" in ild:
                cons = cons + attention_mse([ild["cons_attn"]], [ild["cons_attn_target"]], ild["mask"])
            total = total + ild["cons_weight"] * cons
            terms["loss/consistency"] = cons.detach()
            terms["train/consistency_weight"] = torch.tensor(float(ild["cons_weight"]))
        return total

    def logit_kd(self, logits32: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """KL(softmax(z_t/rho) || softmax(z_s/rho)), times rho^2 when ``kd_t2_scale``."""
        kd = kd_loss(logits32, teacher_logits, self.kd_temperature)
        return kd * self.kd_temperature ** 2 if self.kd_t2_scale else kd

    @classmethod
    def from_config(cls, method_cfg, task_only: str):
        """``task_only`` (ce / mlm) has the task loss alone; ``kd`` adds KD; ``codir`` adds KD and CRD."""
        name = method_cfg.name
        if name == task_only:
            return cls(name, uses_teacher=False, uses_crd=False)
        common = dict(alpha_kd=method_cfg.alpha_kd, kd_temperature=method_cfg.kd_temperature,
                      kd_t2_scale=method_cfg.kd_t2_scale, crd_temperature=method_cfg.crd_temperature)
        if name in ILD_METHODS:
            return cls(name, uses_teacher=True, uses_crd=False, alpha_hidden=method_cfg.alpha_hidden,
                       alpha_attention=method_cfg.alpha_attention, **common)
        if name == "kd":
            return cls(name, uses_teacher=True, uses_crd=False, **common)
        if name == "codir":
            return cls(name, uses_teacher=True, uses_crd=True, alpha_crd=method_cfg.alpha_crd, **common)
        raise ValueError(f"unknown objective {name!r} for {cls.__name__}")


@dataclass
class Objective(_Weights):
    """Finetuning objectives: ``ce``, ``kd``, ``codir`` (negatives ``[B, K, m]`` per anchor)."""

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, is_regression: bool,
                 teacher_logits: Optional[torch.Tensor] = None,
                 h_t: Optional[torch.Tensor] = None, h_s: Optional[torch.Tensor] = None,
                 negatives: Optional[torch.Tensor] = None, ild: Optional[dict] = None,
                 stage: str = "kd", class_negatives: Optional[torch.Tensor] = None,
                 classes: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
        """Return ``(total, terms)``; ``terms`` holds detached fp32 scalars for logging.

        CRD negatives are either ``negatives`` ``[B, K, m]`` per anchor or, as the trainer passes
        them, ``class_negatives`` ``[C, K, m]`` shared by the anchors of each class with the
        anchors' ``classes`` ``[B]`` (no per-anchor copy).

        ``stage`` is cr_ild's current stage: ``"ild"`` (intermediate-layer terms only, on mixed
        inputs; no task or KD term) or ``"kd"`` (task + KD); other methods ignore it.
        """
        if self.name == "cr_ild" and stage == "ild":
            terms: dict = {}
            total = self.ild_terms(ild, terms)
            terms["loss/total"] = total.detach()
            return total, terms
        logits32 = logits.float()
        if is_regression:
            task = F.mse_loss(logits32.squeeze(-1), labels.float())
        else:
            task = F.cross_entropy(logits32, labels)
        total = task
        terms = {"loss/task": task.detach()}
        if self.uses_teacher:
            if is_regression:
                kd = F.mse_loss(logits32, teacher_logits.float())
            else:
                kd = self.logit_kd(logits32, teacher_logits)
            total = total + self.alpha_kd * kd
            terms["loss/kd"] = kd.detach()
        if self.uses_crd:
            if class_negatives is not None:
                crd, pos, neg = crd_loss_classes(h_t, h_s, class_negatives, classes, self.crd_temperature)
            else:
                crd = crd_loss(h_t, h_s, negatives, self.crd_temperature)
                with torch.no_grad():
                    pos, neg = crd_scores(h_t, h_s, negatives, self.crd_temperature)
            total = total + self.alpha_crd * crd
            terms["loss/crd"] = crd.detach()
            terms["bank/pos_sim"] = pos.mean()
            terms["bank/neg_sim"] = neg.mean()
        if self.uses_ild and self.name != "cr_ild":
            total = total + self.ild_terms(ild, terms)
        terms["loss/total"] = total.detach()
        return total, terms


@dataclass
class PretrainObjective(_Weights):
    """Pre-training objectives (CoDIR Sec. 2.3), Eq. 1 with L_task = masked-LM loss.

    - ``mlm``:   MLM cross-entropy on the masked positions (MLM-Pre).
    - ``kd``:    MLM + a1 * [rho^2] * KL on the masked positions' vocabulary logits (KD-Pre).
    - ``codir``: ``kd`` + a2 * InfoNCE against in-batch negatives read from the bank (CoDIR-Pre).

    Logits are ``[M, V]`` rows at the masked positions only, so KD never sees unmasked tokens.
    With a1 = 0 the teacher's MLM head is not needed (and not run).
    """

    @property
    def uses_teacher_logits(self) -> bool:
        return self.uses_teacher and self.alpha_kd > 0

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None,
                 h_t: Optional[torch.Tensor] = None, h_s: Optional[torch.Tensor] = None,
                 candidates: Optional[torch.Tensor] = None,
                 exclude: Optional[torch.Tensor] = None,
                 token_scale: Optional[torch.Tensor] = None, ild: Optional[dict] = None) -> tuple[torch.Tensor, dict]:
        """``logits`` ``[M, V]`` and ``labels`` ``[M]`` at masked positions; returns ``(total, terms)``.

        The MLM and KD terms are means over the ``M`` masked rows, multiplied by
        ``token_scale`` when given (``M x accumulation x world / masked rows of the global
        batch``: the trainer's averaging then gives the mean over every masked token).
        """
        logits32 = logits.float()
        if labels.numel():
            mlm = F.cross_entropy(logits32, labels)
        else:  # no masked token in this micro-batch: contribute nothing, keep the graph connected
            mlm = logits32.sum() * 0.0
        if token_scale is not None:
            mlm = mlm * token_scale
        total = mlm
        terms = {"loss/mlm": mlm.detach()}
        if self.uses_teacher_logits:
            kd = self.logit_kd(logits32, teacher_logits)
            if token_scale is not None:
                kd = kd * token_scale
            total = total + self.alpha_kd * kd
            terms["loss/kd"] = kd.detach()
        if self.uses_crd:
            crd, pos, neg = crd_loss_shared(h_t, h_s, candidates, exclude, self.crd_temperature)
            total = total + self.alpha_crd * crd
            terms["loss/crd"] = crd.detach()
            terms["bank/pos_sim"] = pos.mean()
            terms["bank/neg_sim"] = neg.mean()
        if self.uses_ild:
            total = total + self.ild_terms(ild, terms)
        terms["loss/total"] = total.detach()
        return total, terms


def build_pretrain_objective(method_cfg) -> PretrainObjective:
    """The pre-training objective named by ``method.name`` (mlm, kd, codir, tinybert, distilbert)."""
    return PretrainObjective.from_config(method_cfg, "mlm")


def build_objective(method_cfg) -> Objective:
    """The finetuning objective named by ``method.name`` (ce, kd, codir, pkd, tinybert, distilbert, cr_ild)."""
    return Objective.from_config(method_cfg, "ce")
