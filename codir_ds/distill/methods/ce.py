"""``ce``: plain finetuning, L = L_task (cross-entropy on labels; MSE on regression targets)."""
from __future__ import annotations

from codir_ds.distill.methods.base import Method, task_loss
from codir_ds.distill.methods.registry import register_method


@register_method
class CE(Method):
    name = "ce"
    stages = ("finetune",)
    summary = "plain finetuning on the labels, no teacher"

    def loss(self, student, teacher, batch):
        total, key = task_loss(student.logits, batch)
        return total, {key: total.detach(), "loss/total": total.detach()}
