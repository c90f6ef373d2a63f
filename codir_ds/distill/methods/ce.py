"""``ce``: plain finetuning, L = L_task (cross-entropy on labels; MSE on regression targets)."""
from __future__ import annotations

from codir_ds.distill.methods.base import TaskMethod
from codir_ds.distill.methods.registry import register_method


@register_method
class CE(TaskMethod):
    name = "ce"
    stages = ("finetune",)
    summary = "plain finetuning on the labels, no teacher"
