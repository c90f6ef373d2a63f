"""``tinybert``: TinyBERT-style ILD (Jiao et al., 2020): KD plus alpha_hidden * hidden-state MSE
(student states projected to the teacher's width) and alpha_attention * attention-map MSE over the
layer map (default: uniform plus the embeddings)."""
from __future__ import annotations

from codir_ds.distill.ild import attention_mse, hidden_mse
from codir_ds.distill.methods.layers import LayerMethod
from codir_ds.distill.methods.registry import register_method


@register_method
class TinyBERT(LayerMethod):
    name = "tinybert"
    summary = "KD plus hidden-state and attention-map MSE over mapped layers"
    compare_keys = ("layer_map", "alpha_hidden", "alpha_attention")

    @property
    def uses_attention(self) -> bool:
        return self.cfg.alpha_attention > 0

    def default_pairs(self, student_layers, teacher_layers):
        ls, lt = student_layers, teacher_layers
        return [(0, 0)] + [(i, i * lt // ls) for i in range(1, ls + 1)]

    def layer_loss(self, student, teacher, terms):
        hid = hidden_mse(student.hidden, teacher.hidden, student.mask)
        total = self.cfg.alpha_hidden * hid
        terms["loss/hidden_mse"] = hid.detach()
        if self.uses_attention:
            att = attention_mse(student.attn, teacher.attn, student.mask)
            total = total + self.cfg.alpha_attention * att
            terms["loss/attention_mse"] = att.detach()
        return total
