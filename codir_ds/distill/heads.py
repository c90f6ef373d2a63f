"""The module DeepSpeed trains: the student plus the objective's learnable heads.

CRD's projections phi_s and phi_t are trained with the student (phi_t maps the
frozen teacher's features; the teacher body itself is never in the optimizer).
Keeping them inside the engine's module means ZeRO partitions and checkpoints them
with the student, and ZeRO-3 gathers their parameters during ``forward``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from codir_ds.models.mlm import gather_rows, mlm_parts
from codir_ds.models.pooling import pool_layers


class ProjectionHead(nn.Module):
    """Linear map of concatenated pooled layers ``[B, L*d]`` to the contrastive space ``[B, m]``."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.to(self.linear.weight.dtype))


class DistillationModule(nn.Module):
    """Student classifier with optional CRD heads.

    ``forward`` returns a dict with ``logits`` ``[B, C]`` and, when the heads exist
    and ``teacher_features`` ``[B, Lt*d_t]`` is given, ``h_s`` and ``h_t`` ``[B, m]``.
    """

    def __init__(self, student: nn.Module, student_layers: Sequence[int], pooling: str,
                 teacher_dim: Optional[int] = None, projection_dim: Optional[int] = None):
        super().__init__()
        self.student = student
        self.student_layers = list(student_layers)
        self.pooling = pooling
        if projection_dim:
            s_dim = len(self.student_layers) * student.config.hidden_size
            self.proj_s = ProjectionHead(s_dim, projection_dim)
            self.proj_t = ProjectionHead(teacher_dim, projection_dim)
        else:
            self.proj_s = self.proj_t = None

    def forward(self, input_ids, attention_mask, token_type_ids=None,
                teacher_features: Optional[torch.Tensor] = None) -> dict:
        want_features = self.proj_s is not None and teacher_features is not None
        out = self.student(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                           output_hidden_states=want_features)
        result = {"logits": out.logits}
        if want_features:
            pooled = pool_layers(out.hidden_states, attention_mask, self.student_layers, self.pooling)
            result["h_s"] = self.proj_s(pooled)
            result["h_t"] = self.proj_t(teacher_features)
        return result


class PretrainModule(DistillationModule):
    """Masked-LM student with optional CRD heads (pre-training distillation).

    ``forward`` returns ``logits`` ``[M, V]`` at the flat masked positions ``rows`` only
    (see :func:`codir_ds.models.mlm.masked_rows`) and, with CRD heads and
    ``teacher_features``, ``h_s`` / ``h_t`` ``[B, m]`` pooled from the same masked input.
    """

    def forward(self, input_ids, attention_mask, rows: torch.Tensor, token_type_ids=None,
                teacher_features: Optional[torch.Tensor] = None) -> dict:
        body, head = mlm_parts(self.student)
        want_features = self.proj_s is not None and teacher_features is not None
        out = body(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                   output_hidden_states=want_features)
        result = {"logits": head(gather_rows(out.last_hidden_state, rows))}
        if want_features:
            pooled = pool_layers(out.hidden_states, attention_mask, self.student_layers, self.pooling)
            result["h_s"] = self.proj_s(pooled)
            result["h_t"] = self.proj_t(teacher_features)
        return result
