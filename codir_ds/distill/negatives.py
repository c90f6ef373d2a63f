"""Finetuning negatives for CoDIR: memory-bank rows whose label differs.

Design rule (CoDIR-Fine, "selected samples have different labels from the
positive sample"):

* Per training step, ONE set of K negative ids is drawn per class ``c``,
  uniformly WITH replacement (as the original CRD code) from the training ids
  whose label is not ``c``. Every positive of class ``c`` in the step (on every
  rank) shares that set. Sharing keeps the all-gather at ``C·K`` rows per step
  instead of ``B·K`` and is a standard CRD simplification; the positive itself
  can never be among its negatives since it has label ``c``.
* The draw uses a ``torch.Generator`` seeded from ``(seed, step)`` only, so every
  rank draws the same sets without communication (required: the bank gather is
  collective and needs the same ids on every rank), and a resumed run draws the
  same sets as an uninterrupted one.
* Sets are drawn for ALL class ids ``0..C-1`` every step (``C = max label + 1``),
  whatever labels happen to be in the local batch, so ranks always agree.
  A class id with no training example (a gap in the label ids) gets a set drawn
  from all ids; it is never indexed by a real positive.
* Regression tasks have no classes: this sampler rejects float labels; the
  caller must choose another rule (e.g. bucketed targets or in-batch negatives).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from codir_ds.distill.losses import crd_loss_anchors, crd_loss_classes, crd_loss_shared
from codir_ds.distill.memory_bank import derive_seed

__all__ = ["AnchorNegativeRows", "AnchorNegatives", "BatchNegatives", "ClassNegativeRows", "ClassNegatives",
           "LabelNegativeSampler", "all_gather_ids", "batch_negatives", "self_mask"]


@dataclass
class ClassNegatives:
    """Finetuning's CRD negatives: ``rows`` ``[C, K, m]`` bank rows per class (one
    :meth:`LabelNegativeSampler.class_negatives` gather per optimizer step), shared by the anchors
    of each class; ``classes`` ``[B]`` are the anchors' classes."""
    rows: torch.Tensor
    classes: torch.Tensor

    @property
    def per_anchor(self) -> float:
        """K: negatives per anchor."""
        return float(self.rows.shape[1])

    def loss(self, h_t: torch.Tensor, h_s: torch.Tensor, tau: float):
        """``(loss, pos_sim [B], neg_sim [B])`` of Eq. 4 (:func:`~codir_ds.distill.losses.crd_loss_classes`)."""
        return crd_loss_classes(h_t, h_s, self.rows, self.classes, tau)


@dataclass
class ClassNegativeRows:
    """The step's per-class negatives: ``rows`` ``[C, K, m]`` (:meth:`LabelNegativeSampler.class_negatives`) and
    ``labels`` ``[N]``, the class of every training example."""
    rows: torch.Tensor
    labels: torch.Tensor

    def for_batch(self, ids: torch.Tensor) -> ClassNegatives:
        """The negatives of one micro-batch's anchors ``ids``: their classes' sets."""
        return ClassNegatives(self.rows, self.labels[ids])


@dataclass
class AnchorNegatives:
    """Finetuning's CRD negatives with ``method.finetune_negatives=anchor``: ``rows`` ``[B, K, m]``, K bank
    rows drawn for each anchor on its own (:meth:`LabelNegativeSampler.anchor_negatives`)."""
    rows: torch.Tensor

    @property
    def per_anchor(self) -> float:
        """K: negatives per anchor."""
        return float(self.rows.shape[1])

    def loss(self, h_t: torch.Tensor, h_s: torch.Tensor, tau: float):
        """``(loss, pos_sim [B], neg_sim [B])`` of Eq. 4 (:func:`~codir_ds.distill.losses.crd_loss_anchors`)."""
        return crd_loss_anchors(h_t, h_s, self.rows, tau)


@dataclass
class BatchNegatives:
    """Pre-training's in-batch CRD negatives: ``candidates`` ``[G, m]`` bank rows of the global
    mini-batch and ``exclude`` ``[B, G]`` (True at each anchor's own row)."""
    candidates: torch.Tensor
    exclude: torch.Tensor

    @property
    def per_anchor(self) -> float:
        """K: negatives per anchor (every candidate but the anchor's own row)."""
        return float(self.exclude.shape[1] - 1)

    def loss(self, h_t: torch.Tensor, h_s: torch.Tensor, tau: float):
        """``(loss, pos_sim [B], neg_sim [B])`` of Eq. 4 (:func:`~codir_ds.distill.losses.crd_loss_shared`)."""
        return crd_loss_shared(h_t, h_s, self.candidates, self.exclude, tau)


class LabelNegativeSampler:
    """Per-step, per-class sets of negative example ids with a different label.

    Args:
        labels: ``[N]`` integer class id (>= 0) of every training example, indexed
            by global example id (the same ids as the memory bank).
        num_negatives: K, negatives per positive (> 0).
        seed: base seed; the sets of step ``s`` depend only on ``(seed, s)``.
    """

    def __init__(self, labels: torch.Tensor, num_negatives: int, seed: int):
        labels = torch.as_tensor(labels)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"label negatives need integer class labels, got dtype {labels.dtype} "
                f"(regression tasks have no classes to contrast; use another negative rule)"
            )
        labels = labels.reshape(-1).to("cpu", torch.long)
        if labels.numel() == 0:
            raise ValueError("label negatives: empty label tensor")
        if int(labels.min()) < 0:
            raise ValueError(
                f"label negatives: labels must be class ids >= 0, found {int(labels.min())} "
                f"(drop ignored / unlabelled examples such as -100 first)"
            )
        if int(num_negatives) <= 0:
            raise ValueError(f"label negatives: num_negatives must be > 0, got {num_negatives}")
        self.labels = labels
        self.num_negatives = int(num_negatives)
        self.seed = int(seed)
        self.num_classes = int(labels.max()) + 1
        class_counts = torch.bincount(labels, minlength=self.num_classes)
        if int((class_counts > 0).sum()) < 2:
            raise ValueError(
                f"label negatives: every training example has label {int(labels[0])}, so no "
                f"example has a different label to serve as a negative; CoDIR-Fine needs >= 2 classes"
            )
        # Ids sorted by label: the ids of class c occupy [start_c, start_c + n_c).
        # The candidates of class c are the sorted ids with that block cut out.
        self._by_label = torch.argsort(labels, stable=True)
        self._class_start = torch.cumsum(class_counts, 0) - class_counts
        self._class_count = class_counts
        self._num_candidates = labels.numel() - class_counts  # [C], all > 0 by the check above

    @property
    def num_examples(self) -> int:
        return self.labels.numel()

    def sample(self, step: int) -> torch.Tensor:
        """Negative ids of every class for training step ``step``.

        Returns:
            ``[C, K]`` LongTensor (CPU); row ``c`` holds K global ids whose label
            is not ``c``, drawn uniformly with replacement. Identical on every
            rank and for every call with the same ``(seed, step)``.
        """
        g = torch.Generator().manual_seed(derive_seed(self.seed, int(step)))
        # float64 uniforms carry 53 bits: unbiased enough for any realistic N.
        u = torch.rand(self.num_classes, self.num_negatives, generator=g, dtype=torch.float64)
        return self._other_label_ids(torch.arange(self.num_classes), u)

    def sample_anchors(self, step: int, anchor_ids: torch.Tensor) -> torch.Tensor:
        """Negative ids of each anchor for training step ``step`` (``method.finetune_negatives=anchor``).

        Args:
            anchor_ids: ``[n]`` global ids of the step's anchors, in the order every rank uses.

        Returns:
            ``[n, K]`` LongTensor (CPU); row ``i`` holds K global ids whose label is not that of
            ``anchor_ids[i]``, drawn uniformly with replacement and independently of the other
            rows. Depends only on ``(seed, step)`` and ``anchor_ids``.
        """
        anchor_ids = torch.as_tensor(anchor_ids, dtype=torch.long).cpu()
        g = torch.Generator().manual_seed(derive_seed(self.seed, int(step), 13))
        u = torch.rand(anchor_ids.numel(), self.num_negatives, generator=g, dtype=torch.float64)
        return self._other_label_ids(self.labels[anchor_ids], u)

    def _other_label_ids(self, classes: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``[n, K]`` ids: row i maps the uniforms ``u[i]`` onto the ids whose label is not ``classes[i]``."""
        n = self._num_candidates[classes].unsqueeze(1)
        idx = torch.minimum((u * n).long(), n - 1)  # uniform in [0, N - n_c)
        # Skip the block of class c in the label-sorted order.
        start = self._class_start[classes].unsqueeze(1)
        idx = torch.where(idx >= start, idx + self._class_count[classes].unsqueeze(1), idx)
        return self._by_label[idx]

    def class_negatives(self, bank, step: int) -> torch.Tensor:
        """Negative features ``[C, K, m]`` (fp32, bank device) of every class for ``step``. COLLECTIVE.

        One ``bank.gather`` of ``C·K`` rows; index the result with the positives' labels.
        Every rank of the bank's group must call it for the same ``step``.
        """
        if bank.num_examples != self.num_examples:
            raise ValueError(
                f"label negatives: the bank has {bank.num_examples} rows but the labels "
                f"cover {self.num_examples} examples"
            )
        neg_ids = self.sample(step)  # [C, K], same on every rank
        return bank.gather(neg_ids.reshape(-1)).reshape(self.num_classes, self.num_negatives, -1)

    def anchor_negatives(self, bank, step: int, local_ids: torch.Tensor, world: int, device=None,
                         group=None) -> "AnchorNegativeRows":
        """Negative features of every anchor of the optimizer step (``method.finetune_negatives=anchor``). COLLECTIVE.

        ``local_ids``: this rank's ids of all its micro-batches of the step. The step's ids are
        all-gathered (on the host with ``group``, a gloo group), sorted, and each draws its own K
        negatives (:meth:`sample_anchors`); one ``bank.gather`` fetches the ``G·K`` rows (G the
        global batch), so the traffic is ``G/C`` times that of the per-class sets (C classes). Every
        rank of the bank's group must call it for the same ``step``.
        """
        if bank.num_examples != self.num_examples:
            raise ValueError(
                f"label negatives: the bank has {bank.num_examples} rows but the labels "
                f"cover {self.num_examples} examples"
            )
        ids = torch.sort(all_gather_ids(local_ids, world, device, group)).values
        neg_ids = self.sample_anchors(step, ids)  # [G, K], same on every rank
        rows = bank.gather(neg_ids.reshape(-1)).reshape(ids.numel(), self.num_negatives, -1)
        return AnchorNegativeRows(ids, rows)


def all_gather_ids(local_ids: torch.Tensor, world: int, device=None, group=None) -> torch.Tensor:
    """Every rank's ``local_ids`` (the same count on every rank), concatenated in rank order, on the CPU.
    COLLECTIVE. With ``group`` (gloo) the ids travel host to host; without it on ``device``."""
    if world == 1:
        return local_ids.cpu()
    local = local_ids.cpu() if group is not None else local_ids.to(device or "cpu")
    out = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(out, local, group=group)
    return torch.cat(out).cpu()


@dataclass
class AnchorNegativeRows:
    """The step's per-anchor negatives: ``rows[i]`` ``[K, m]`` belong to the anchor with global id ``ids[i]``
    (``ids`` sorted)."""
    ids: torch.Tensor
    rows: torch.Tensor

    def for_batch(self, ids: torch.Tensor) -> "AnchorNegatives":
        """The negatives of one micro-batch's anchors ``ids`` (all among the step's ids)."""
        ids = ids.cpu()
        at = torch.searchsorted(self.ids, ids).clamp_max(self.ids.numel() - 1)
        if not torch.equal(self.ids[at], ids):
            raise ValueError("anchor negatives: the micro-batch holds ids that are not among the step's ids")
        return AnchorNegatives(self.rows[at.to(self.rows.device)])


def batch_negatives(local_ids: torch.Tensor, num_negatives: int, seed: int, step: int,
                    world: int, device=None, group=None, fill_from: int = 0) -> torch.Tensor:
    """Ids of the global mini-batch whose bank rows are this step's negatives. COLLECTIVE.

    Every rank contributes the ids of all its micro-batches of this optimizer step; the
    result is identical on every rank. When the global batch has more than
    ``num_negatives + 1`` examples, a subset of that size (seeded by ``(seed, step)``, so
    no communication is needed to agree on it) is used. Each anchor's own row is excluded
    later, so every anchor is contrasted with ``min(num_negatives, G - 1)`` negatives
    (one more when it is not in the sampled subset). The ids come back on the CPU. With
    ``group`` (a gloo group, :func:`~codir_ds.engine.distributed.host_group`) the all-gather runs
    on the host ids: no host-device sync. Without it, it runs on ``device`` (NCCL needs
    accelerator tensors) and the copy back to the CPU waits for the device.

    ``fill_from`` = N > 0 (``method.pretrain_negatives=bank``): when the global batch has fewer than
    ``num_negatives + 1`` examples, ids of other examples of ``0..N-1``, drawn uniformly without
    replacement (seeded by ``(seed, step)``, the same on every rank), join the candidates up to
    that size: a small batch's in-batch task is too easy to teach anything.
    """
    # sorted: the same set gives the same subset whatever the rank layout
    ids = torch.sort(all_gather_ids(local_ids, world, device, group)).values
    if ids.numel() > num_negatives + 1:
        g = torch.Generator().manual_seed(derive_seed(seed, step, 7))
        ids = ids[torch.randperm(ids.numel(), generator=g)[: num_negatives + 1]]
    elif fill_from > 0 and ids.numel() < num_negatives + 1:
        ids = torch.cat([ids, other_ids(ids, num_negatives + 1 - ids.numel(), fill_from, seed, step)])
    return ids


def other_ids(taken: torch.Tensor, count: int, num_examples: int, seed: int, step: int) -> torch.Tensor:
    """``count`` distinct ids of ``0..num_examples-1`` not in ``taken`` (fewer when not that many are left),
    drawn uniformly, seeded by ``(seed, step)`` only: every rank draws the same."""
    free = num_examples - int(torch.unique(taken).numel())
    count = min(count, free)
    if count <= 0:
        return torch.empty(0, dtype=torch.long)
    g = torch.Generator().manual_seed(derive_seed(seed, step, 11))
    if free <= 4 * count:  # a large share of what is left: one permutation of it
        rest = torch.ones(num_examples, dtype=torch.bool)
        rest[taken] = False
        pool = rest.nonzero().flatten()
        return pool[torch.randperm(pool.numel(), generator=g)[:count]]
    picked = torch.empty(0, dtype=torch.long)
    while picked.numel() < count:  # rejection: a few rounds, since at most a quarter of the free ids is wanted
        draw = torch.randint(num_examples, (2 * count,), generator=g)
        draw = draw[~torch.isin(draw, taken) & ~torch.isin(draw, picked)]
        draw = draw[torch.tensor(_first_occurrence(draw), dtype=torch.long)]  # distinct, in drawing order
        picked = torch.cat([picked, draw])[:count]
    return picked


def _first_occurrence(x: torch.Tensor) -> list:
    """Positions of the first occurrence of each value of ``x``, in order."""
    seen, keep = set(), []
    for i, v in enumerate(x.tolist()):
        if v not in seen:
            seen.add(v)
            keep.append(i)
    return keep


def self_mask(anchor_ids: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
    """``[B, G]`` True where candidate g is anchor b's own example: a positive is never its own negative."""
    return anchor_ids.to(candidate_ids.device)[:, None] == candidate_ids[None, :]
