"""The frozen teacher's forward pass: inference mode, run's precision, pooled features."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from codir_ds.models.mlm import gather_rows, mlm_parts
from codir_ds.models.pooling import pool_layers


@dataclass
class TeacherOutput:
    logits: Optional[torch.Tensor]            # [B, C] (finetuning) or [M, V] at masked positions (pre-training)
    features: Optional[torch.Tensor] = None   # [B, Lt*d_t] pooled layers (CRD only)


class TeacherRunner:
    """Runs the frozen teacher without autograd and returns what the objective needs.

    The outputs are cloned out of inference mode: inference tensors cannot be saved
    for backward, and phi_t (trained) consumes the features.
    """

    def __init__(self, model: torch.nn.Module, layers: Optional[Sequence[int]], pooling: str):
        assert not any(p.requires_grad for p in model.parameters()), "teacher must be frozen"
        self.model = model
        self.layers = list(layers) if layers else None
        self.pooling = pooling

    def __call__(self, input_ids, attention_mask, token_type_ids=None) -> TeacherOutput:
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                             output_hidden_states=self.layers is not None)
            features = (pool_layers(out.hidden_states, attention_mask, self.layers, self.pooling)
                        if self.layers is not None else None)
        return TeacherOutput(logits=out.logits.clone(), features=None if features is None else features.clone())


class MLMTeacherRunner:
    """Pre-training teacher: MLM logits at the masked positions only, and pooled layer features.

    ``model`` is a frozen ``*ForMaskedLM`` (``logits=True``, logit KD) or a bare body
    (``logits=False``: CoDIR-Pre with alpha_kd = 0 needs hidden states only).
    """

    def __init__(self, model: torch.nn.Module, layers: Optional[Sequence[int]], pooling: str, logits: bool):
        assert not any(p.requires_grad for p in model.parameters()), "teacher must be frozen"
        self.model = model
        self.body, self.head = mlm_parts(model) if logits else (model, None)
        self.layers = list(layers) if layers else None
        self.pooling = pooling

    def __call__(self, input_ids, attention_mask, rows: torch.Tensor, token_type_ids=None) -> TeacherOutput:
        with torch.inference_mode():
            out = self.body(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            output_hidden_states=self.layers is not None)
            logits = self.head(gather_rows(out.last_hidden_state, rows)) if self.head is not None else None
            features = (pool_layers(out.hidden_states, attention_mask, self.layers, self.pooling)
                        if self.layers is not None else None)
        return TeacherOutput(logits=None if logits is None else logits.clone(),
                             features=None if features is None else features.clone())
