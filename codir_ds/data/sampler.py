"""Training sampler that feeds each rank only the example ids it owns.

Ownership matches the sharded memory bank: id ``i`` belongs to rank
``i % world_size``. Feeding a rank only its own ids makes the bank's momentum
update of the positives purely local (no communication).

Per epoch each rank shuffles its own ids with a generator seeded from
``(seed, epoch, rank)`` and cuts them into micro-batches of ``batch_size``
(drop_last). Every rank yields the SAME number of batches per epoch,
``floor(min_r owned_count(r) / batch_size) = floor((N // W) / batch_size)``
(ranks owning one extra id drop it, among the others that do not fill a batch):
otherwise one rank would enter a collective the others never reach and
distributed training would hang. Which ids are dropped changes each epoch with
the shuffle.

Resuming: ``position`` counts the batches already handed out by ``__iter__`` in
the current epoch; it is advanced *before* a batch is yielded, so a state saved
after training on a batch counts that batch. If the sampler is wrapped by a
prefetching ``DataLoader`` (``num_workers > 0`` / ``prefetch_factor``), the
loader pulls batches ahead of training; the training loop must then record the
number of batches it actually consumed and put that in ``state["position"]``.
"""

from __future__ import annotations

import hashlib
from typing import Iterator, Union

import torch

__all__ = ["OwnedShardSampler", "owner_of"]


def _derive_seed(*parts: int) -> int:
    # Same construction as codir_ds.distill.memory_bank.derive_seed; duplicated
    # so the data package does not import the distill package.
    data = ",".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def owner_of(ids: Union[int, torch.Tensor], world_size: int) -> Union[int, torch.Tensor]:
    """Rank that owns global example id(s) ``ids``: ``ids % world_size``."""
    if world_size <= 0:
        raise ValueError(f"owner_of: world_size must be > 0, got {world_size}")
    if isinstance(ids, int):
        return ids % world_size
    return torch.as_tensor(ids, dtype=torch.long) % world_size


class OwnedShardSampler:
    """Per-rank shuffled batches of the example ids this rank owns.

    Args:
        num_examples: N, global ids ``0..N-1``.
        batch_size: per-rank micro-batch size (ids per yielded batch).
        rank, world_size: this rank and the number of ranks.
        seed: base seed of the shuffles.

    Iterating yields ``LongTensor [batch_size]`` of global ids, from the current
    position to the end of the epoch; then call ``set_epoch(epoch + 1)``.
    """

    def __init__(self, num_examples: int, batch_size: int, rank: int, world_size: int, seed: int):
        num_examples, batch_size = int(num_examples), int(batch_size)
        rank, world_size = int(rank), int(world_size)
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"sampler: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size <= 0:
            raise ValueError(f"sampler: batch_size must be > 0, got {batch_size}")
        if num_examples // world_size < batch_size:
            raise ValueError(
                f"sampler: {num_examples} examples over {world_size} ranks give each rank at least "
                f"{num_examples // world_size} ids, fewer than one micro-batch of {batch_size}; "
                f"lower the per-rank batch size or the number of ranks"
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0
        self._owned = torch.arange(rank, num_examples, world_size, dtype=torch.long)

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank yields per epoch (identical on all ranks)."""
        return (self.num_examples // self.world_size) // self.batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch

    def owned_ids(self) -> torch.Tensor:
        """All ids this rank owns, ascending."""
        return self._owned.clone()

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch."""
        self.epoch = int(epoch)
        self.position = 0

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """This rank's shuffled owned ids for ``epoch`` (before batching/dropping)."""
        g = torch.Generator().manual_seed(_derive_seed(self.seed, epoch, self.rank))
        return self._owned[torch.randperm(self._owned.numel(), generator=g)]

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = self.epoch_order(self.epoch)
        while self.position < self.batches_per_epoch:
            start = self.position * self.batch_size
            self.position += 1  # counted as consumed as soon as it is handed out
            yield order[start : start + self.batch_size].clone()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "world_size": self.world_size,
            "rank": self.rank,
            "num_examples": self.num_examples,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Resume at ``state``'s epoch and position.

        With ``strict=True`` (exact resume) seed, world size, rank, num_examples
        and batch_size must equal this sampler's; then the next batch yielded is
        the one an uninterrupted run would have yielded next. With
        ``strict=False`` and a different layout (e.g. resuming on another number
        of ranks), the epoch is kept and the position is set to the same number
        of examples consumed globally, rounded down; the order of the rest of
        the epoch then differs from the original run.
        """
        keys = ("seed", "world_size", "rank", "num_examples", "batch_size")
        missing = [k for k in ("epoch", "position") + keys if k not in state]
        if missing:
            raise ValueError(f"sampler state lacks keys {missing}")
        diff = {k: (state[k], getattr(self, k)) for k in keys if int(state[k]) != getattr(self, k)}
        epoch, position = int(state["epoch"]), int(state["position"])
        if diff and strict:
            raise ValueError(
                "sampler state is for a different layout (saved, current): "
                + ", ".join(f"{k}={a} vs {b}" for k, (a, b) in diff.items())
                + "; resume with the same settings or load with strict=False"
            )
        if diff:
            consumed = position * int(state["batch_size"]) * int(state["world_size"])
            position = consumed // (self.batch_size * self.world_size)
        if not 0 <= position <= self.batches_per_epoch:
            raise ValueError(
                f"sampler state position {position} is outside [0, {self.batches_per_epoch}]"
            )
        self.epoch, self.position = epoch, position
