"""``kd``: L = L_task + alpha_1 * [rho^2] * KL(softmax(z_t/rho) || softmax(z_s/rho)) (CoDIR Eq. 1-2).

Finetuning: on class logits (on regression tasks, the MSE between student and teacher
predictions). Pre-training (KD-Pre): on the vocabulary logits of the masked positions;
with alpha_kd = 0 the teacher's MLM head is neither loaded nor run.
"""
from __future__ import annotations

from dataclasses import dataclass

from codir_ds import checks
from codir_ds.distill.methods.base import TASK_TAGS, Method, TeacherSpec, option, soft_kd, task_loss
from codir_ds.distill.methods.registry import register_method


@dataclass
class KDConfig:
    alpha_kd: float = option(0.7, "alpha_1 of Eq. 1: weight of the logit KD term")
    kd_temperature: float = option(2.0, "rho of Eq. 2: softmax temperature of logit KD")
    kd_t2_scale: bool = option(True, "multiply the KD term by rho^2 (common practice; explicit here)")

    @staticmethod
    def check(m) -> None:
        checks.positive("method.kd_temperature", m.kd_temperature)
        checks.positive("method.alpha_kd", m.alpha_kd, allow_zero=True)


class KDMethod(Method):
    """L_task plus logit KD from the frozen teacher; the base of every method that reads a teacher."""
    tags = {**TASK_TAGS, "loss/kd": "logit KD, when the teacher's logits are used (pre-training: `method.alpha_kd` > 0; "
                                    "`cr_ild`: its KD stage)"}

    def teacher_spec(self) -> TeacherSpec:
        return TeacherSpec(logits=self.uses_teacher_logits)

    @property
    def uses_teacher_logits(self) -> bool:
        # Pre-training with alpha_kd = 0 needs the teacher's hidden states only (no MLM head).
        return not self.pretraining or self.cfg.alpha_kd > 0

    def supervised(self, student, teacher, batch, terms: dict):
        """``L_task + alpha_kd * KD`` (KD when the teacher's logits are used), terms logged into ``terms``."""
        logits32 = student.logits.float()  # one cast: task and KD gradients meet in fp32, then one cast back
        total, key = task_loss(logits32, batch)
        terms[key] = total.detach()
        if self.uses_teacher_logits:
            kd = soft_kd(logits32, teacher.logits, self.cfg.kd_temperature, self.cfg.kd_t2_scale,
                         batch.is_regression and not batch.pretraining)
            if batch.token_scale is not None:
                kd = kd * batch.token_scale
            total = total + self.cfg.alpha_kd * kd
            terms["loss/kd"] = kd.detach()
        return total

    def loss(self, student, teacher, batch):
        terms: dict = {}
        total = self.supervised(student, teacher, batch, terms)
        terms["loss/total"] = total.detach()
        return total, terms


@register_method
class KD(KDMethod):
    name = "kd"
    config = KDConfig
    summary = "task loss plus logit KD from the frozen teacher (KD, KD-Pre)"
    reference = "Hinton et al. 2015"
    compare_keys = ("alpha_kd", "kd_temperature")

    def teacher_spec(self) -> TeacherSpec:  # the cache is per finetuning example
        return TeacherSpec(logits=self.uses_teacher_logits, cacheable=not self.pretraining)
