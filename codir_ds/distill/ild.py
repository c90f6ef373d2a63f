"""Intermediate-layer distillation (ILD): layer maps and the losses of PKD, TinyBERT, DistilBERT and CR-ILD.

All losses are computed in fp32 whatever the inputs' dtype (docs/methods/: pkd, tinybert, distilbert, cr_ild).
Positions are restricted to real tokens with the attention mask ``[B, L]`` (1 = real).

- :func:`pkd_loss`: PKD's "patient" loss, the squared distance between L2-normalised
  [CLS] vectors, summed over mapped layer pairs, mean over the batch.
- :func:`hidden_mse`: TinyBERT's hidden-state MSE over real tokens (student states already
  projected to the teacher's width), summed over pairs.
- :func:`attention_mse`: TinyBERT's attention MSE over real (query, key) entries, summed over
  pairs. Hugging Face models expose attention *probabilities* (after softmax), not TinyBERT's
  raw scores; probabilities are bounded and need no masking of ``-inf`` entries, so they are
  what is compared here. When the head counts differ, each side's maps are averaged over heads.
- :func:`cosine_loss`: DistilBERT's cosine embedding loss ``1 - cos`` over real tokens.
- :func:`mixup_embeddings` / :func:`consistency_weight` / :class:`MixedInputs`: CR-ILD's embedding-level
  mixup, its linearly ramped consistency weight and its mixed (and supplementary) inputs.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from codir_ds.distill.memory_bank import derive_seed
from codir_ds.errors import CodirError

def _no_autocast(t: torch.Tensor):
    return torch.autocast(device_type=t.device.type, enabled=False)


def layer_pairs(spec: Union[str, Sequence[Sequence[int]]], default: Sequence[tuple[int, int]], student_layers: int,
                teacher_layers: int) -> list[tuple[int, int]]:
    """``[(student_layer, teacher_layer), ...]`` for ``method.layer_map`` (0 = embedding output).

    - ``default``: the method's own map, given as ``default`` (see each ILD method's ``default_pairs``).
    - ``uniform``: student layer ``i`` <- teacher layer ``i * Lt // Ls`` for ``i = 1..Ls``.
    - ``last``: ``[(Ls, Lt)]``.
    - a list of pairs, checked against both depths.
    """
    ls, lt = student_layers, teacher_layers
    if spec == "default":
        pairs = [tuple(p) for p in default]
    elif spec == "uniform":
        pairs = [(i, i * lt // ls) for i in range(1, ls + 1)]
    elif spec == "last":
        pairs = [(ls, lt)]
    else:
        pairs = [(int(s), int(t)) for s, t in spec]
        bad = [p for p in pairs if not (0 <= p[0] <= ls and 0 <= p[1] <= lt)]
        if bad:
            raise CodirError(f"method.layer_map pairs {bad} are outside a {ls}-layer student / {lt}-layer teacher "
                             f"(0 = embeddings, 1..L = Transformer layers): fix method.layer_map")
    return pairs


def pkd_loss(student_cls: Sequence[torch.Tensor], teacher_cls: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over pairs of mean_b || s_b/|s_b| - t_b/|t_b| ||^2 for ``[B, d]`` [CLS] vectors."""
    with _no_autocast(student_cls[0]):
        total = student_cls[0].new_zeros((), dtype=torch.float32)
        for s, t in zip(student_cls, teacher_cls, strict=True):
            s = F.normalize(s.float(), dim=-1)
            t = F.normalize(t.detach().float(), dim=-1)
            total = total + (s - t).pow(2).sum(-1).mean()
        return total


def _token_weights(mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(torch.float32)
    return m / m.sum().clamp_min(1.0)


def hidden_mse(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Sum over pairs of the MSE between ``[B, L, d]`` states, averaged over real tokens and d."""
    with _no_autocast(student[0]):
        w = _token_weights(mask)
        total = student[0].new_zeros((), dtype=torch.float32)
        for s, t in zip(student, teacher, strict=True):
            if s.shape != t.shape:
                raise ValueError(f"hidden_mse: student {tuple(s.shape)} vs teacher {tuple(t.shape)}: project first")
            err = (s.float() - t.detach().float()).pow(2).mean(-1)       # [B, L]
            total = total + (err * w).sum()
        return total


def attention_mse(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Sum over pairs of the MSE between ``[B, H, L, L]`` attention maps over real (query, key) entries."""
    with _no_autocast(student[0]):
        m = mask.to(torch.float32)
        pair_w = m[:, :, None] * m[:, None, :]                            # [B, L, L]
        pair_w = pair_w / pair_w.sum().clamp_min(1.0)
        total = student[0].new_zeros((), dtype=torch.float32)
        for s, t in zip(student, teacher, strict=True):
            s, t = s.float(), t.detach().float()
            if s.shape[1] != t.shape[1]:  # different head counts: compare head-averaged maps
                s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
            err = (s - t).pow(2).mean(1)                                  # [B, L, L]
            total = total + (err * pair_w).sum()
        return total


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """DistilBERT's cosine embedding loss: mean over real tokens of ``1 - cos(s, t)`` for ``[B, L, d]``."""
    with _no_autocast(student):
        cos = F.cosine_similarity(student.float(), teacher.detach().float(), dim=-1)  # [B, L]
        return ((1.0 - cos) * _token_weights(mask)).sum()


def mixup_draw(alpha: float, batch: int, seed: int) -> tuple[float, torch.Tensor]:
    """CR-ILD's mixup draw for one micro-batch: ``(lambda, partner)``.

    ``lambda ~ Beta(alpha, alpha)``, then ``max(lambda, 1 - lambda)`` so the mix stays closer to
    the example itself; ``partner`` ``[B]`` is a random permutation (example b is mixed with
    example ``partner[b]`` of the same batch). Reproducible from ``seed``.
    """
    rng = np.random.default_rng(seed)
    lam = float(rng.beta(alpha, alpha))
    return max(lam, 1.0 - lam), torch.from_numpy(rng.permutation(batch)).long()


class MixedInputs:
    """The mixing stages' inputs (a method's :class:`~codir_ds.distill.methods.base.MixSpec`): each micro-batch
    gains as many ``supplementary`` examples (drawn with replacement) as it has, and one mixup draw over the
    whole. Both are seeded by ``(seed, rank, micro step)``, so a resumed run draws what the uninterrupted one
    did."""

    def __init__(self, alpha: float, supplementary: Sequence, seed: int, rank: int):
        self.alpha, self.supplementary, self.seed, self.rank = alpha, list(supplementary), seed, rank

    def __call__(self, examples: list, micro_step: int) -> tuple[list, tuple[float, torch.Tensor]]:
        """``(examples plus supplementary ones, (lambda, partner))`` for micro step ``micro_step``."""
        micro_seed = derive_seed(self.seed, self.rank, micro_step)
        if self.supplementary:
            pick = torch.randint(len(self.supplementary), (len(examples),),
                                 generator=torch.Generator().manual_seed(micro_seed))
            examples = examples + [self.supplementary[i] for i in pick.tolist()]
        return examples, mixup_draw(self.alpha, len(examples), micro_seed)


def mixup_embeddings(embeds: torch.Tensor, attention_mask: torch.Tensor, lam: float,
                     partner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix word embeddings ``[B, L, d]``: ``lam * e_b + (1 - lam) * e_partner[b]``.

    Returns the mixed embeddings and the union of the two attention masks (a position is real
    when it is real in either input).
    """
    partner = partner.to(embeds.device)
    mixed = lam * embeds + (1.0 - lam) * embeds.index_select(0, partner)
    mask = torch.maximum(attention_mask, attention_mask.index_select(0, partner))
    return mixed, mask


def mix_targets(clean: torch.Tensor, lam: float, partner: torch.Tensor) -> torch.Tensor:
    """The consistency target: ``lam * r_b + (1 - lam) * r_partner[b]`` of clean representations (no grad)."""
    clean = clean.detach()
    return lam * clean + (1.0 - lam) * clean.index_select(0, partner.to(clean.device))


def consistency_weight(step: int, ild_steps: int, ramp: float, alpha: float) -> float:
    """Weight of the consistency term at optimizer step ``step`` (0-based) of the ILD stage.

    Rises linearly from 0 to ``alpha`` over the first ``ramp`` fraction of the ``ild_steps``
    steps, then stays at ``alpha``.
    """
    ramp_steps = max(1.0, ramp * ild_steps)
    return float(alpha) * min(1.0, step / ramp_steps)
