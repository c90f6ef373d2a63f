"""``codir``: CoDIR (Sun et al., 2020), L = L_task + alpha_1 * L_KD + alpha_2 * L_CRD (Eq. 1).

L_CRD (Eq. 4) is InfoNCE at temperature tau between the teacher's projected pooled layers
``h_t`` (the positive's anchor), the student's ``h_s`` and K negatives read from the sharded
memory bank: finetuning draws, per class, K rows of examples with another label (regression:
another target bin; ``finetune_negatives=anchor``: per anchor); pre-training uses the rows of the
current global mini-batch. Scores and loss are fp32 whatever the training precision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

from codir_ds import checks
from codir_ds.distill.methods.base import BankSpec, ContrastSpec, TeacherSpec, option
from codir_ds.distill.methods.kd import KDConfig, KDMethod
from codir_ds.distill.methods.registry import register_method
from codir_ds.errors import CodirError

POOLINGS = ("mean", "cls")
BANK_INITS = ("random", "student")
PRETRAIN_NEGATIVES = ("batch", "bank")
FINETUNE_NEGATIVES = ("class", "anchor")


@dataclass
class CRDConfig(KDConfig):
    alpha_crd: float = option(0.1, "alpha_2 of Eq. 1: weight of the contrastive (CRD) term")
    crd_temperature: float = option(0.07, "tau of Eq. 4: temperature of the contrastive scores")
    num_negatives: int = option(100, "K: negatives per positive (pre-training: at most the global batch - 1)")
    bank_momentum: float = option(
        0.1, "beta of Eq. 5: momentum of the memory bank's row updates, in [0, 1); 0.1 scored above CRD's 0.5 and "
             "the raw-feature update in trec6 finetuning (docs/methods/codir.md)")
    projection_dim: int = option(128, "m: width of the contrastive space (phi_s, phi_t)")
    pooling: str = option("mean", "layer summary: mean (masked mean over real tokens, the paper's choice) or cls")
    teacher_layers: Union[str, list[int]] = option(
        "all", "teacher layers whose pooled features are concatenated: 'all', 'last' or 1-based layer "
               "indices (0 = the embedding output)")
    student_layers: Union[str, list[int]] = option("all", "student layers, as teacher_layers")
    bank_init: str = option("random", "initial bank rows: random (seeded unit vectors, the CRD convention) or "
                                      "student (one inference pass of the student's projected features over the "
                                      "training set before step 0; not redone on resume)")
    bank_normalize: bool = option(True, "L2-normalise the student feature before the bank's momentum update "
                                        "(Eq. 5, the CRD convention); false only for ablations: the raw feature's "
                                        "growing norm then shrinks the effective momentum towards 0")
    pretrain_negatives: str = option(
        "batch", "pre-training: the negatives' candidates: batch (the global mini-batch's rows, the paper's setting) "
                 "or bank (the batch's rows plus rows of other blocks drawn from the whole bank, up to "
                 "num_negatives + 1 candidates: a harder task when the global batch is small)")
    finetune_negatives: str = option(
        "class", "finetuning: how negatives are drawn: class (one set of K rows per class and step, shared by the "
                 "anchors of that class: C·K rows gathered per step) or anchor (each anchor draws its own K rows: "
                 "G·K rows gathered per step, G the global batch)")
    crd_encoder_delay: int = option(
        0, "optimizer steps during which the CRD gradient trains only the projection heads and stops before the "
           "student body, so that randomly initialised heads do not push the encoder in a task-unrelated "
           "direction; 0: CRD reaches the encoder from step 0 (the paper)")
    regression_bins: int = option(5, "regression tasks: targets are cut into this many equal-frequency bins and "
                                     "CRD negatives come from other bins")

    @staticmethod
    def check(m) -> None:
        checks.choice("method.pooling", m.pooling, POOLINGS)
        checks.choice("method.bank_init", m.bank_init, BANK_INITS)
        checks.choice("method.pretrain_negatives", m.pretrain_negatives, PRETRAIN_NEGATIVES)
        checks.choice("method.finetune_negatives", m.finetune_negatives, FINETUNE_NEGATIVES)
        checks.layers("method.teacher_layers", m.teacher_layers)
        checks.layers("method.student_layers", m.student_layers)
        for key in ("crd_temperature", "num_negatives", "projection_dim", "regression_bins"):
            checks.positive(f"method.{key}", getattr(m, key))
        checks.positive("method.alpha_crd", m.alpha_crd, allow_zero=True)
        checks.positive("method.crd_encoder_delay", m.crd_encoder_delay, allow_zero=True)
        checks.in_range("method.bank_momentum", m.bank_momentum, 0.0 <= m.bank_momentum < 1.0, "[0, 1)")


@register_method
class CoDIR(KDMethod):
    name = "codir"
    config = CRDConfig
    summary = "KD plus contrastive distillation of pooled intermediate layers against memory-bank negatives"
    reference = "CoDIR, Sun et al. 2020"
    compare_keys = ("alpha_kd", "alpha_crd", "num_negatives", "pooling")
    stage_options = {"finetune_negatives": "finetune", "regression_bins": "finetune", "pretrain_negatives": "pretrain"}
    tags = {"loss/crd": "the contrastive (InfoNCE) term",
            "bank/pos_sim": "mean cosine of the teacher's projected feature with the student's (the positive)",
            "bank/neg_sim": "mean cosine of the teacher's projected feature with the negatives' bank rows",
            "bank/sim_gap": "`bank/pos_sim` − `bank/neg_sim`",
            "crd/loss_over_log_k1": "`loss/crd` / log(K+1): 1 when the term cannot tell the positive from its K "
                                    "negatives, towards 0 when it separates them",
            "crd/student_norm": "mean L2 norm of the projected student features (before the cosine)",
            "crd/teacher_norm": "mean L2 norm of the projected teacher features (before the cosine)"}

    def teacher_spec(self) -> TeacherSpec:  # the cache is per finetuning example
        return TeacherSpec(logits=self.uses_teacher_logits, cacheable=not self.pretraining)

    def contrast_spec(self) -> ContrastSpec:
        m = self.cfg
        return ContrastSpec(m.teacher_layers, m.student_layers, m.pooling, m.projection_dim)

    def bank_spec(self) -> BankSpec:
        m = self.cfg
        return BankSpec(m.bank_momentum, m.bank_normalize, m.bank_init, m.num_negatives, m.finetune_negatives,
                        m.pretrain_negatives, m.regression_bins)

    @property
    def encoder_delay(self) -> int:
        return self.cfg.crd_encoder_delay

    def loss(self, student, teacher, batch):
        terms: dict = {}
        total = self.supervised(student, teacher, batch, terms)
        if batch.negatives is None:
            raise CodirError("codir: no CRD negatives were given to the loss")
        crd, pos, neg = batch.negatives.loss(student.h_t, student.h_s, self.cfg.crd_temperature)
        total = total + self.cfg.alpha_crd * crd
        terms["loss/crd"] = crd.detach()
        terms.update(crd_diagnostics(crd, pos, neg, student.h_s, student.h_t, batch.negatives.per_anchor))
        terms["loss/total"] = total.detach()
        return total, terms


def crd_diagnostics(crd, pos, neg, h_s, h_t, k: float) -> dict:
    """What shows a contrastive term that works or collapses (detached, no host sync):

    - ``bank/pos_sim``, ``bank/neg_sim``: mean cosine of the teacher's feature with the student's
      (the positive) and with the bank rows (the negatives); ``bank/sim_gap``: their difference;
    - ``crd/loss_over_log_k1``: L_CRD / log(K+1), 1 for a term that cannot tell the positive from its
      K negatives, towards 0 when it separates them;
    - ``crd/student_norm``, ``crd/teacher_norm``: mean L2 norm of the projected features before the
      cosine (an unbounded student norm shrinks the term's gradient).
    """
    pos, neg = pos.mean(), neg.mean()
    return {"bank/pos_sim": pos, "bank/neg_sim": neg, "bank/sim_gap": pos - neg,
            "crd/loss_over_log_k1": crd.detach() / math.log(k + 1.0),
            "crd/student_norm": h_s.detach().float().norm(dim=1).mean(),
            "crd/teacher_norm": h_t.detach().float().norm(dim=1).mean()}
