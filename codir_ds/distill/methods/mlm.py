"""``mlm``: pre-training without a teacher (MLM-Pre), L = masked-LM cross-entropy.

The masking rate ``method.mlm_probability`` applies to every pre-training method
(:class:`~codir_ds.distill.methods.base.PretrainingConfig`).
"""
from __future__ import annotations

from codir_ds.distill.methods.base import TaskMethod
from codir_ds.distill.methods.registry import register_method


@register_method
class MLM(TaskMethod):
    name = "mlm"
    stages = ("pretrain",)
    summary = "masked-LM pre-training of the student alone (MLM-Pre)"
