"""The frozen teacher's forward pass: inference mode, run's precision, pooled features; the teacher step of a
training step (:class:`TeacherStep`: the teacher cache, else a forward)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from codir_ds.distill.heads import ILDSpec, ild_features, use_eager_attention
from codir_ds.distill.ild import mixup_embeddings
from codir_ds.distill.methods.base import LayerFeatures, TeacherOutput
from codir_ds.engine.sections import section
from codir_ds.models.mlm import gather_rows, mlm_parts
from codir_ds.models.pooling import pool_layers


def _clone_layers(feats: Optional[dict]) -> Optional[LayerFeatures]:
    """The mapped layers as :class:`LayerFeatures`, cloned out of inference mode."""
    if feats is None:
        return None
    return LayerFeatures(**{k: ([t.clone() for t in v] if isinstance(v, list) else v) for k, v in feats.items()})


class TeacherRunner:
    """Runs the frozen teacher without autograd and returns what the objective needs.

    The outputs are cloned out of inference mode: inference tensors cannot be saved
    for backward, and phi_t (trained) consumes the features.
    """

    def __init__(self, model: torch.nn.Module, layers: Optional[Sequence[int]], pooling: str = "mean",
                 ild_spec: Optional[ILDSpec] = None):
        assert not any(p.requires_grad for p in model.parameters()), "teacher must be frozen"
        self.model = model
        self.layers = list(layers) if layers else None
        self.pooling = pooling
        self.ild_spec = ild_spec
        if ild_spec is not None and ild_spec.attention:
            use_eager_attention(model)

    def __call__(self, input_ids, attention_mask, token_type_ids=None, ild: bool = False,
                 mix: Optional[tuple] = None) -> TeacherOutput:
        """``ild``: also the mapped layers' features; ``mix=(lam, partner)``: on mixed word embeddings."""
        with torch.inference_mode():
            kwargs = dict(token_type_ids=token_type_ids, output_hidden_states=self.layers is not None or ild,
                          output_attentions=ild and self.ild_spec.attention)
            mask = attention_mask
            if mix is not None:
                embeds, mask = mixup_embeddings(self.model.get_input_embeddings()(input_ids), attention_mask, *mix)
                out = self.model(inputs_embeds=embeds, attention_mask=mask, **kwargs)
            else:
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            features = (pool_layers(out.hidden_states, attention_mask, self.layers, self.pooling)
                        if self.layers is not None else None)
            feats = ild_features(out.hidden_states, out.attentions, mask, self.ild_spec, "teacher") if ild else None
        return TeacherOutput(logits=out.logits.clone(), features=None if features is None else features.clone(),
                             layers=_clone_layers(feats))


class MLMTeacherRunner:
    """Pre-training teacher: MLM logits at the masked positions only, and pooled layer features.

    ``model`` is a frozen ``*ForMaskedLM`` (``logits=True``, logit KD) or a bare body
    (``logits=False``: CoDIR-Pre with alpha_kd = 0 needs hidden states only).
    """

    def __init__(self, model: torch.nn.Module, layers: Optional[Sequence[int]], pooling: str = "mean",
                 logits: bool = True, ild_spec: Optional[ILDSpec] = None):
        assert not any(p.requires_grad for p in model.parameters()), "teacher must be frozen"
        self.model = model
        self.body, self.head = mlm_parts(model) if logits else (model, None)
        self.layers = list(layers) if layers else None
        self.pooling = pooling
        self.ild_spec = ild_spec
        if ild_spec is not None and ild_spec.attention:
            use_eager_attention(model)

    def __call__(self, input_ids, attention_mask, rows: torch.Tensor, token_type_ids=None, ild: bool = False,
                 mix: Optional[tuple] = None) -> TeacherOutput:
        """``ild``: also the mapped layers' features; no ``mix`` in pre-training."""
        if mix is not None:
            raise ValueError("pre-training does not mix inputs")
        with torch.inference_mode():
            out = self.body(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            output_hidden_states=self.layers is not None or ild,
                            output_attentions=ild and self.ild_spec.attention)
            logits = self.head(gather_rows(out.last_hidden_state, rows)) if self.head is not None else None
            features = (pool_layers(out.hidden_states, attention_mask, self.layers, self.pooling)
                        if self.layers is not None else None)
            feats = ild_features(out.hidden_states, out.attentions, attention_mask, self.ild_spec, "teacher") \
                if ild else None
        return TeacherOutput(logits=None if logits is None else logits.clone(),
                             features=None if features is None else features.clone(), layers=_clone_layers(feats))


class TeacherStep:
    """The teacher's part of a micro step: the teacher cache's rows when it holds every example of the
    micro-batch, else a forward of ``runner`` (then cached). Runs under the profiler section ``teacher_forward``."""
    section = "teacher_forward"

    def __init__(self, runner, cache=None, device=None):
        self.runner, self.cache, self.device = runner, cache, device

    def __call__(self, mb, ild: bool = False) -> TeacherOutput:
        """The teacher's outputs for micro-batch ``mb`` (a :class:`~codir_ds.recipes.stages.MicroBatch`);
        ``ild``: also the mapped layers."""
        with section(self.section):
            out = self.cache.lookup(mb.ids, self.device) if self.cache is not None else None
            if out is None:
                out = self.runner(**mb.inputs, ild=ild, mix=mb.mix)
                if self.cache is not None:
                    self.cache.store(mb.ids, out)
            return out
