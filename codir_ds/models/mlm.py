"""Masked-LM models for pre-training distillation: teacher with/without an MLM head, body/head split.

Logits over the vocabulary are only ever computed at the masked positions: the
body runs on the whole block, then the MLM head runs on the ``[M, d]`` rows that
carry a label. That is what the MLM loss and the KD term need, and it skips
~85% of the (large, ``d x V``) decoder work.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers import AutoModel, AutoModelForMaskedLM

from codir_ds.errors import CodirError
from codir_ds.models.loading import model_dir, verify_weights

HEAD_ATTRIBUTES = ("cls", "lm_head")  # BERT-style, RoBERTa/MPNet-style


def mlm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(body, head)`` of a ``*ForMaskedLM`` model."""
    body = getattr(model, model.base_model_prefix, None)
    head = next((getattr(model, a) for a in HEAD_ATTRIBUTES if hasattr(model, a)), None)
    if body is None or head is None:
        raise CodirError(f"{type(model).__name__} is not a masked-LM model with a body and an MLM head "
                         f"(expected attributes '{model.base_model_prefix}' and one of {HEAD_ATTRIBUTES})")
    return body, head


def masked_rows(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices of the labelled (masked) positions of ``labels`` ``[B, T]``, in row-major order."""
    return (labels.reshape(-1) != -100).nonzero(as_tuple=True)[0]


def gather_rows(sequence: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[B, T, d]`` -> ``[M, d]`` at flat positions ``rows``."""
    return sequence.reshape(-1, sequence.shape[-1]).index_select(0, rows)


def load_mlm_teacher(spec: str, dtype: torch.dtype, sha256: Optional[str] = None,
                     need_head: bool = True, source: Optional[str] = None) -> torch.nn.Module:
    """Frozen pre-training teacher.

    With ``need_head`` (logit KD), a ``*ForMaskedLM`` whose head weights are all in the
    checkpoint; otherwise the bare body (hidden states only, e.g. CoDIR-Pre with alpha_kd = 0).
    ``source``: the run's YAML, for the command the missing-head error suggests.
    """
    path = model_dir(spec, "model.teacher")
    verify_weights(path, sha256, "model.teacher")
    if need_head:
        model, info = AutoModelForMaskedLM.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
        missing = sorted(info["missing_keys"])
        if missing:
            from codir_ds.config import missing_mlm_head
            raise CodirError(missing_mlm_head(spec, source, f" (missing {missing[0]} and {len(missing) - 1} more)"))
    else:
        model = AutoModel.from_pretrained(str(path), dtype=dtype, add_pooling_layer=False)
    model.requires_grad_(False)
    model.eval()
    return model
