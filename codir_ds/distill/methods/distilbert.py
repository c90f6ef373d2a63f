"""``distilbert``: DistilBERT-style (Sanh et al., 2019): KD plus alpha_hidden * the cosine embedding
loss ``1 - cos`` between the last hidden states over real tokens (default map: last <- last)."""
from __future__ import annotations

from codir_ds.distill.ild import cosine_loss
from codir_ds.distill.methods.layers import LayerMethod
from codir_ds.distill.methods.registry import register_method


@register_method
class DistilBERT(LayerMethod):
    name = "distilbert"
    summary = "KD plus cosine loss between the last hidden states"
    reference = "DistilBERT-style, Sanh et al. 2019"
    tags = {"loss/cosine": "cosine loss on the last hidden states"}

    def layer_loss(self, student, teacher, terms):
        loss = cosine_loss(student.hidden[-1], teacher.hidden[-1], student.mask)
        terms["loss/cosine"] = loss.detach()
        return self.cfg.alpha_hidden * loss
