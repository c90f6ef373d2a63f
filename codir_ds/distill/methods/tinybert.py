"""``tinybert``: TinyBERT-style ILD (Jiao et al., 2020): KD plus alpha_hidden * hidden-state MSE
(student states projected to the teacher's width) and alpha_attention * attention-map MSE over the
layer map (default: uniform plus the embeddings)."""
from __future__ import annotations

from codir_ds.distill.methods.layers import HiddenAttentionMethod
from codir_ds.distill.methods.registry import register_method


@register_method
class TinyBERT(HiddenAttentionMethod):
    name = "tinybert"
    summary = "KD plus hidden-state and attention-map MSE over mapped layers"
    reference = "TinyBERT-style, Jiao et al. 2020"
    compare_keys = ("layer_map", "alpha_hidden", "alpha_attention")

    def default_pairs(self, student_layers, teacher_layers):
        ls, lt = student_layers, teacher_layers
        return [(0, 0)] + [(i, i * lt // ls) for i in range(1, ls + 1)]
