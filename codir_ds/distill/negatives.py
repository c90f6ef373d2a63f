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

import torch

from codir_ds.distill.memory_bank import derive_seed

__all__ = ["LabelNegativeSampler"]


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
        c, k = self.num_classes, self.num_negatives
        # float64 uniforms carry 53 bits: unbiased enough for any realistic N.
        u = torch.rand(c, k, generator=g, dtype=torch.float64)
        n = self._num_candidates.unsqueeze(1)
        idx = torch.minimum((u * n).long(), n - 1)  # uniform in [0, N - n_c)
        # Skip the block of class c in the label-sorted order.
        start = self._class_start.unsqueeze(1)
        idx = torch.where(idx >= start, idx + self._class_count.unsqueeze(1), idx)
        return self._by_label[idx]

    def ids_for_batch(self, step: int, batch_labels: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` negative ids for positives with labels ``batch_labels [B]``."""
        labels = self._check_batch_labels(batch_labels)
        return self.sample(step)[labels]

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

    def negatives_for_batch(self, bank, step: int, batch_labels: torch.Tensor) -> torch.Tensor:
        """Negative features ``[B, K, m]`` (fp32, bank device) for this rank's positives.

        COLLECTIVE (calls ``bank.gather``): every rank of the bank's group must
        call it for the same ``step``; the local ``batch_labels [B]`` may differ
        per rank (and B may be 0).
        """
        labels = self._check_batch_labels(batch_labels)
        feats = self.class_negatives(bank, step)
        return feats[labels.to(feats.device)]

    def _check_batch_labels(self, batch_labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(batch_labels).reshape(-1).to("cpu", torch.long)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"label negatives: batch labels must be in [0, {self.num_classes}), got "
                f"{labels.unique().tolist()[:10]}"
            )
        return labels
