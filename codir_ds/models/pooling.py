"""Per-layer pooled features for contrastive distillation (CoDIR Sec. 2.2, step 1-2)."""
from __future__ import annotations

from typing import Sequence

import torch


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Summarise one layer ``[B, L, d]`` into ``[B, d]``.

    ``mean``: mean over real tokens only (``attention_mask == 1``), the paper's choice;
    ``cls``: the first position. Accumulates in fp32 so half-precision inputs do not
    overflow on long sequences.
    """
    if mode == "cls":
        return hidden[:, 0]
    if mode != "mean":
        raise ValueError(f"unknown pooling {mode!r}: use 'mean' or 'cls'")
    mask = attention_mask.to(torch.float32).unsqueeze(-1)
    summed = (hidden.to(torch.float32) * mask).sum(dim=1)
    return (summed / mask.sum(dim=1).clamp_min(1.0)).to(hidden.dtype)


def pool_layers(hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor,
                layers: Sequence[int], mode: str) -> torch.Tensor:
    """Concatenate the pooled features of ``layers`` into ``[B, len(layers) * d]``.

    ``hidden_states`` is the Hugging Face tuple: index 0 the embedding output,
    index i the output of Transformer layer i.
    """
    return torch.cat([pool_hidden(hidden_states[i], attention_mask, mode) for i in layers], dim=-1)
