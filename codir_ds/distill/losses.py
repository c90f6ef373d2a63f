"""Distillation losses: the contrastive CRD term (Eq. 4) and logit KD (Eq. 2).

Both losses are computed in fp32 whatever the dtype of their inputs and return
an fp32 scalar. The authors' released code evaluated ``exp(cos/τ)`` in fp16,
which overflows (fp16 max is 65504) as soon as ``cos/τ > ~11``, i.e. cos > 0.78
at τ = 0.07; here inputs are cast to fp32 *before* normalisation and the
softmax denominators go through ``logsumexp`` (via ``cross_entropy`` /
``log_softmax``), never a raw ``exp``. Autocast is disabled inside so an
enclosing ``torch.autocast`` region cannot silently cast the maths back down.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["crd_loss", "crd_loss_anchors", "crd_loss_classes", "crd_loss_shared", "kd_loss"]


def _no_autocast(device: torch.device):
    # An enclosing autocast region would run the einsum / matmul in fp16/bf16
    # again; switch it off for this device type only.
    return torch.autocast(device_type=device.type, enabled=False)


def _check_crd_shapes(h_t: torch.Tensor, h_s: torch.Tensor, negatives: torch.Tensor) -> None:
    if h_t.dim() != 2 or h_s.shape != h_t.shape:
        raise ValueError(
            f"crd: h_t and h_s must both be [B, m]; got {tuple(h_t.shape)} and {tuple(h_s.shape)}"
        )
    b, m = h_t.shape
    if negatives.dim() != 3 or negatives.shape[0] != b or negatives.shape[2] != m:
        raise ValueError(
            f"crd: negatives must be [B, K, m] = [{b}, K, {m}]; got {tuple(negatives.shape)}"
        )


def _cosine_scores(
    h_t: torch.Tensor, h_s: torch.Tensor, negatives: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cosine-similarity maths of :func:`crd_loss`.

    Returns ``pos [B]`` = cos(h_t, h_s) and ``neg [B, K]`` = cos(h_t, n_j), fp32,
    differentiable with respect to all three inputs. Must be called with autocast
    disabled (the public functions do that).
    """
    _check_crd_shapes(h_t, h_s, negatives)
    # Cast first, then normalise: normalising in fp16 can underflow/overflow the
    # squared norm for large activations.
    t = F.normalize(h_t.float(), dim=-1)
    s = F.normalize(h_s.float(), dim=-1)
    n = F.normalize(negatives.to(device=t.device, dtype=torch.float32), dim=-1)
    pos = (t * s).sum(dim=-1)  # [B]
    neg = torch.einsum("bm,bkm->bk", t, n)  # [B, K]
    return pos, neg


def crd_loss(
    h_t: torch.Tensor, h_s: torch.Tensor, negatives: torch.Tensor, tau: float
) -> torch.Tensor:
    """Contrastive representation distillation loss (CoDIR Eq. 4), batch mean.

    For each row b::

        -log( exp(cos(t_b, s_b)/τ) / (exp(cos(t_b, s_b)/τ) + Σ_j exp(cos(t_b, n_bj)/τ)) )

    i.e. a (K+1)-way cross-entropy whose correct class is the positive pair.

    Args:
        h_t: ``[B, m]`` projected teacher features of the positives (any float dtype).
        h_s: ``[B, m]`` projected student features of the positives.
        negatives: ``[B, K, m]`` student features of K negatives per positive, as
            read from the memory bank (K may be 0, then the loss is 0).
        tau: temperature τ > 0 (dimensionless; the paper uses ~0.07-0.1).

    Returns:
        fp32 scalar in nats. Gradients flow to ``h_t`` and ``h_s`` (and to
        ``negatives`` only if the caller passes a tensor that requires grad;
        bank rows do not).
    """
    return crd_loss_anchors(h_t, h_s, negatives, tau)[0]


def crd_loss_anchors(h_t: torch.Tensor, h_s: torch.Tensor, negatives: torch.Tensor,
                     tau: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`crd_loss` (each anchor with its own ``[K, m]`` negatives) plus the detached cosines for monitoring:
    ``(loss, pos_sim [B], mean_neg_sim [B])`` like :func:`crd_loss_shared`."""
    if not tau > 0:
        raise ValueError(f"crd: temperature tau must be > 0, got {tau}")
    with _no_autocast(h_t.device):
        pos, neg = _cosine_scores(h_t, h_s, negatives)
        logits = torch.cat([pos.unsqueeze(1), neg], dim=1) / float(tau)  # [B, K+1]
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        # cross_entropy = logsumexp(logits) - logits[:, 0]: stable for any cos/τ.
        return F.cross_entropy(logits, target, reduction="mean"), pos.detach(), neg.detach().mean(1)


def crd_loss_shared(h_t: torch.Tensor, h_s: torch.Tensor, candidates: torch.Tensor, exclude: torch.Tensor,
                    tau: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CRD (Eq. 4) when all anchors share one candidate set of negatives, e.g. in-batch negatives.

    Equal to :func:`crd_loss` with ``negatives[b]`` = the candidates not excluded for
    anchor ``b``, but scores ``[B, G]`` come from one matrix product against the ``[G, m]``
    candidates instead of a ``[B, K, m]`` copy per anchor.

    Args:
        h_t, h_s: ``[B, m]`` projected teacher / student features of the positives.
        candidates: ``[G, m]`` bank rows (no gradient).
        exclude: ``[B, G]`` bool, True where candidate g is not a negative of anchor b
            (its own row, so the positive is never its own negative).
        tau: temperature > 0.

    Returns:
        ``(loss, pos_sim [B], mean_neg_sim [B])``: fp32 loss (batch mean) and detached cosine
        similarities for monitoring.
    """
    if not tau > 0:
        raise ValueError(f"crd: temperature tau must be > 0, got {tau}")
    if h_t.dim() != 2 or h_s.shape != h_t.shape or candidates.dim() != 2 or candidates.shape[1] != h_t.shape[1]:
        raise ValueError(f"crd: h_t, h_s must be [B, m] and candidates [G, m]; got {tuple(h_t.shape)}, "
                         f"{tuple(h_s.shape)}, {tuple(candidates.shape)}")
    if exclude.shape != (h_t.shape[0], candidates.shape[0]):
        raise ValueError(f"crd: exclude must be [B, G] = {[h_t.shape[0], candidates.shape[0]]}, got {tuple(exclude.shape)}")
    with _no_autocast(h_t.device):
        t = F.normalize(h_t.float(), dim=-1)
        s = F.normalize(h_s.float(), dim=-1)
        c = F.normalize(candidates.to(device=t.device, dtype=torch.float32), dim=-1)
        pos = (t * s).sum(dim=-1)                                     # [B]
        neg = t @ c.t()                                               # [B, G]
        logits = torch.cat([pos.unsqueeze(1), neg.masked_fill(exclude, float("-inf"))], dim=1) / float(tau)
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits, target, reduction="mean")
        with torch.no_grad():
            keep = (~exclude).float()
            mean_neg = (neg.detach() * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return loss, pos.detach(), mean_neg


def crd_loss_classes(h_t: torch.Tensor, h_s: torch.Tensor, class_negatives: torch.Tensor, classes: torch.Tensor,
                     tau: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CRD (Eq. 4) when every anchor of class c shares that class's K negatives (finetuning).

    Equal to :func:`crd_loss` with ``negatives = class_negatives[classes]``, without building that
    ``[B, K, m]`` copy: scores ``[B, C, K]`` come from one product of the anchors with the
    ``[C, K, m]`` class sets, and each anchor keeps its own class's row. With few classes (C is
    the number of classes or regression bins) this is cheaper than the copy, and it has no
    host-device sync.

    Returns ``(loss, pos_sim [B], mean_neg_sim [B])`` like :func:`crd_loss_shared`.
    """
    if not tau > 0:
        raise ValueError(f"crd: temperature tau must be > 0, got {tau}")
    if h_t.dim() != 2 or h_s.shape != h_t.shape or class_negatives.dim() != 3 or \
            class_negatives.shape[2] != h_t.shape[1] or classes.shape != (h_t.shape[0],):
        raise ValueError(f"crd: h_t, h_s must be [B, m], class_negatives [C, K, m] and classes [B]; got "
                         f"{tuple(h_t.shape)}, {tuple(h_s.shape)}, {tuple(class_negatives.shape)}, {tuple(classes.shape)}")
    with _no_autocast(h_t.device):
        t = F.normalize(h_t.float(), dim=-1)
        s = F.normalize(h_s.float(), dim=-1)
        n = F.normalize(class_negatives.to(device=t.device, dtype=torch.float32), dim=-1)
        pos = (t * s).sum(dim=-1)                                              # [B]
        every = torch.einsum("bm,ckm->bck", t, n)                              # [B, C, K]
        rows = classes.to(t.device, non_blocking=True).view(-1, 1, 1).expand(-1, 1, every.shape[2])
        neg = every.gather(1, rows).squeeze(1)                                 # [B, K]: each anchor's class
        logits = torch.cat([pos.unsqueeze(1), neg], dim=1) / float(tau)       # [B, K+1]
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits, target, reduction="mean")
        return loss, pos.detach(), neg.detach().mean(1)


def kd_loss(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logit distillation KL( softmax(z_t/T) || softmax(z_s/T) ) (CoDIR Eq. 2).

    Summed over classes, averaged over rows. Rows are examples (``[N, C]``
    classification logits) or token positions (e.g. ``[B, L, V]`` MLM logits,
    flattened to ``[B*L, V]``; select masked positions before calling if only
    those should count). The conventional T² factor is NOT applied: the
    objective multiplies by it when configured.

    Args:
        z_s: student logits ``[..., C]`` (any float dtype).
        z_t: teacher logits, same shape; detached here (the teacher is a target).
        temperature: T > 0.

    Returns:
        fp32 scalar in nats; 0 (still attached to ``z_s``) if there are no rows.
    """
    if not temperature > 0:
        raise ValueError(f"kd: temperature must be > 0, got {temperature}")
    if z_s.shape != z_t.shape or z_s.dim() < 1:
        raise ValueError(
            f"kd: student and teacher logits must have the same shape [..., C]; "
            f"got {tuple(z_s.shape)} and {tuple(z_t.shape)}"
        )
    with _no_autocast(z_s.device):
        s = z_s.reshape(-1, z_s.shape[-1]).float()
        t = z_t.detach().reshape(-1, z_t.shape[-1]).to(device=s.device, dtype=torch.float32)
        rows = s.shape[0]
        if rows == 0:
            # e.g. a micro-batch with no masked positions: contribute nothing
            # but keep the graph connected for engine.backward.
            return s.sum() * 0.0
        log_p_s = F.log_softmax(s / float(temperature), dim=-1)
        log_p_t = F.log_softmax(t / float(temperature), dim=-1)
        # log_target=True handles teacher probabilities that underflow to 0.
        return F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True) / rows
