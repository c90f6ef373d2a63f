"""Reference ("oracle") implementations used only by the tests.

Per-anchor forms of product code: the product uses the shared / per-class forms
(:class:`~codir_ds.distill.negatives.ClassNegatives`, ``crd_loss_classes``), the tests
check them against these plain per-anchor ``[B, K]`` / ``[B, K, m]`` versions.
"""

from __future__ import annotations

from typing import Tuple

import torch

from codir_ds.distill.losses import _cosine_scores, _no_autocast


def check_batch_labels(sampler, batch_labels: torch.Tensor) -> torch.Tensor:
    """``batch_labels`` as a CPU ``[B]`` LongTensor; ValueError unless each is in ``[0, C)``."""
    labels = torch.as_tensor(batch_labels).reshape(-1).to("cpu", torch.long)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= sampler.num_classes):
        raise ValueError(
            f"label negatives: batch labels must be in [0, {sampler.num_classes}), got "
            f"{labels.unique().tolist()[:10]}"
        )
    return labels


def ids_for_batch(sampler, step: int, batch_labels: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` negative ids of a ``LabelNegativeSampler`` for positives with labels ``batch_labels [B]``."""
    labels = check_batch_labels(sampler, batch_labels)
    return sampler.sample(step)[labels]


def negatives_for_batch(sampler, bank, step: int, batch_labels: torch.Tensor) -> torch.Tensor:
    """Negative features ``[B, K, m]`` (fp32, bank device) for this rank's positives.

    COLLECTIVE (``sampler.class_negatives`` calls ``bank.gather``): every rank of the bank's
    group must call it for the same ``step``; the local ``batch_labels [B]`` may differ per
    rank (and B may be 0).
    """
    labels = check_batch_labels(sampler, batch_labels)
    feats = sampler.class_negatives(bank, step)
    return feats[labels.to(feats.device)]


def crd_scores(
    h_t: torch.Tensor, h_s: torch.Tensor, negatives: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities behind ``crd_loss``: ``(pos_sim [B], neg_sim [B, K])``.

    fp32, in [-1, 1], *not* divided by τ, detached. ``negatives`` is ``[B, K, m]``.
    Same maths as ``crd_loss`` (the shared ``_cosine_scores``).
    """
    with torch.no_grad(), _no_autocast(h_t.device):
        return _cosine_scores(h_t, h_s, negatives)
