"""``pkd``: Patient KD (Sun et al., 2019): KD plus alpha_hidden * the squared distance between
L2-normalised [CLS] vectors of mapped layers (default map: uniform over the intermediate layers
without the last one, "PKD-skip": the last layer is covered by KD)."""
from __future__ import annotations

from codir_ds.distill.ild import pkd_loss
from codir_ds.distill.methods.layers import LayerMethod
from codir_ds.distill.methods.registry import register_method


@register_method
class PKD(LayerMethod):
    name = "pkd"
    stages = ("finetune",)
    features = "cls"
    summary = "KD plus normalised MSE of the [CLS] rows of mapped intermediate layers"
    reference = "Patient KD, Sun et al. 2019"
    tags = {"loss/pkd": "normalised [CLS] distance over the mapped layers"}

    def default_pairs(self, student_layers, teacher_layers):
        ls, lt = student_layers, teacher_layers
        return [(i, i * lt // ls) for i in range(1, ls)] or [(ls, lt)]

    def layer_loss(self, student, teacher, terms):
        loss = pkd_loss(student.cls, teacher.cls)
        terms["loss/pkd"] = loss.detach()
        return self.cfg.alpha_hidden * loss
