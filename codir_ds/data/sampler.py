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

Resuming on another number of ranks (:meth:`OwnedShardSampler.resume` with every
old rank's state): the ids not yet handed out in the current epoch are rebuilt
from the old layout (the shuffles are deterministic), re-sharded by the new
ownership and shuffled again; that epoch ends when they run out, so no example is
repeated or skipped in it. Later epochs follow the new layout.

``GlobalOrderSampler`` (``training.deterministic``) gives up local bank updates
for a run that does not depend on the number of ranks: see its docstring.
"""

from __future__ import annotations

import hashlib
from typing import Iterator, Optional, Union

import torch

__all__ = ["OwnedShardSampler", "GlobalOrderSampler", "build_sampler", "owner_of"]


def _derive_seed(*parts: int) -> int:
    # Same construction as codir_ds.distill.memory_bank.derive_seed; duplicated
    # so the data package does not import the distill package.
    data = ",".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def group_by_length(order: torch.Tensor, lengths: torch.Tensor, unit: int, window: int,
                    generator: torch.Generator) -> torch.Tensor:
    """Reorder ``order`` so that each run of ``unit`` ids has similar lengths (less padding).

    ``order`` is cut into windows of ``unit * window`` ids; each window is sorted by length
    (longest first, stable) and cut into units, whose order within the window is shuffled with
    ``generator``. The result is a permutation of ``order``: every id still comes once per
    epoch, the windows keep the epoch's shuffle at large scale, and an id's neighbours in a
    unit are ids of about its length. A unit is a micro-batch (owned shards) or a whole
    global batch (``training.deterministic``, where a step's set of ids must not depend on
    the ranks). A tail shorter than a window is sorted alike.
    """
    if unit <= 0 or window <= 0:
        raise ValueError(f"group_by_length: unit and window must be > 0, got {unit}, {window}")
    span = unit * window
    pieces = []
    for start in range(0, order.numel(), span):
        chunk = order[start:start + span]
        chunk = chunk[torch.argsort(-lengths[chunk], stable=True)]
        units = list(torch.split(chunk, unit))
        full = [u for u in units if u.numel() == unit]  # a short last unit stays last (it may be dropped)
        perm = torch.randperm(len(full), generator=generator).tolist()
        pieces.extend(full[i] for i in perm)
        pieces.extend(u for u in units if u.numel() != unit)
    return torch.cat(pieces) if pieces else order.clone()


def _check_lengths(lengths, num_examples: int, window: int) -> Optional[torch.Tensor]:
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths, dtype=torch.long).reshape(-1)
    if lengths.numel() != num_examples:
        raise ValueError(f"sampler: {lengths.numel()} lengths for {num_examples} examples")
    if window <= 0:
        raise ValueError(f"sampler: the length-grouping window must be > 0 batches, got {window}")
    return lengths


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

    def __init__(self, num_examples: int, batch_size: int, rank: int, world_size: int, seed: int,
                 lengths: Optional[torch.Tensor] = None, group_window: int = 50):
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
        # data.group_by_length: [N] token counts; micro-batches are then cut from length-sorted windows.
        self.lengths = _check_lengths(lengths, num_examples, group_window)
        self.group_window = int(group_window)
        # After a re-shard: (epoch, this rank's remaining ids in order, batches in that epoch).
        self._resharded: Optional[tuple[int, torch.Tensor, int]] = None

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank yields per (regular) epoch (identical on all ranks)."""
        return (self.num_examples // self.world_size) // self.batch_size

    def _current(self) -> tuple[torch.Tensor, int]:
        """This epoch's order and number of batches (a re-sharded epoch has its own)."""
        if self._resharded is not None and self._resharded[0] == self.epoch:
            return self._resharded[1], self._resharded[2]
        return self.epoch_order(self.epoch), self.batches_per_epoch

    def remaining_ids(self) -> torch.Tensor:
        """Ids of this epoch not handed out yet (including those the epoch will drop)."""
        order, _ = self._current()
        return order[self.position * self.batch_size:].clone()

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
        order = self._owned[torch.randperm(self._owned.numel(), generator=g)]
        if self.lengths is not None:
            order = group_by_length(order, self.lengths, self.batch_size, self.group_window, g)
        return order

    def __iter__(self) -> Iterator[torch.Tensor]:
        order, batches = self._current()
        while self.position < batches:
            start = self.position * self.batch_size
            self.position += 1  # counted as consumed as soon as it is handed out
            yield order[start : start + self.batch_size].clone()

    def state_dict(self) -> dict:
        state = {
            "kind": "owned",
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "world_size": self.world_size,
            "rank": self.rank,
            "num_examples": self.num_examples,
            "batch_size": self.batch_size,
            "grouped": self.lengths is not None,
        }
        if self._resharded is not None and self._resharded[0] == self.epoch:
            state["resharded_order"] = self._resharded[1].clone()
            state["resharded_batches"] = self._resharded[2]
        return state

    def resume(self, states: list[dict]) -> None:
        """Continue from the sampler states saved by EVERY rank of a checkpoint.

        Same layout: exact (:meth:`load_state_dict` of this rank's state). Another world
        size or micro-batch size: the rest of the saved epoch is re-sharded (module
        docstring), so every id not yet seen in that epoch is seen exactly once.
        """
        _check_states(states, self.seed, self.num_examples, self.lengths is not None)
        first = states[0]
        if int(first["world_size"]) == self.world_size and int(first["batch_size"]) == self.batch_size:
            self.load_state_dict(states[self.rank])
            return
        epochs = {int(s["epoch"]) for s in states}
        if len(epochs) != 1:
            raise ValueError(f"sampler states of one checkpoint disagree on the epoch: {sorted(epochs)}")
        epoch = epochs.pop()
        remaining = []
        for st in states:
            old = OwnedShardSampler(self.num_examples, int(st["batch_size"]), int(st["rank"]),
                                    int(st["world_size"]), self.seed, self.lengths, self.group_window)
            old.load_state_dict(st)
            remaining.append(old.remaining_ids())
        left = torch.cat(remaining)
        if int(left.numel()) and int(torch.bincount(left).max()) > 1:
            raise ValueError("sampler states of one checkpoint overlap: they are not from one run")
        owner = left % self.world_size
        per_rank = torch.bincount(owner, minlength=self.world_size)
        batches = int(per_rank.min()) // self.batch_size
        mine = torch.sort(left[owner == self.rank]).values
        g = torch.Generator().manual_seed(_derive_seed(self.seed, epoch, self.rank, self.world_size, 1))
        self.epoch, self.position = epoch, 0
        self._resharded = (epoch, mine[torch.randperm(mine.numel(), generator=g)], batches)

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
        self._resharded = None
        limit = self.batches_per_epoch
        if "resharded_order" in state and not diff:
            limit = int(state["resharded_batches"])
            self._resharded = (epoch, torch.as_tensor(state["resharded_order"], dtype=torch.long).clone(), limit)
        if not 0 <= position <= limit:
            raise ValueError(f"sampler state position {position} is outside [0, {limit}]")
        self.epoch, self.position = epoch, position


def _check_states(states: list[dict], seed: int, num_examples: int, grouped: bool = False) -> None:
    if not states:
        raise ValueError("sampler resume: no saved states")
    if bool(states[0].get("grouped", False)) != grouped:
        was = "on" if states[0].get("grouped") else "off"
        raise ValueError(f"the checkpoint was trained with data.group_by_length {was}: resume with the same "
                         f"setting (the epoch's order depends on it)")
    for st in states:
        if int(st.get("seed", seed)) != seed or int(st.get("num_examples", num_examples)) != num_examples:
            raise ValueError(f"sampler state is for seed {st.get('seed')} / {st.get('num_examples')} examples, "
                             f"this run has seed {seed} / {num_examples}: resume with the same data and seed")
    if len(states) != int(states[0]["world_size"]):
        raise ValueError(f"{len(states)} sampler states for a run of {states[0]['world_size']} ranks")


class GlobalOrderSampler:
    """World-size-invariant batches (``training.deterministic``).

    Each epoch is ONE permutation of all N ids, seeded by ``(seed, epoch)`` only, cut
    into global batches of ``G = micro x world x accumulation`` ids (the remainder
    ``N % G`` is dropped). Micro step ``a`` of rank ``r`` in a global batch takes its
    positions ``[(a*world + r)*micro, ... + micro)``. The set of ids of every optimizer
    step is therefore the same for any world size with the same ``G``.

    Rank ``r`` trains on ids it does not own, so the bank's momentum updates must be
    routed to the owners (``ShardedMemoryBank.update_routed``, one all-gather per step).
    Resuming on another number of ranks with the same ``G`` is exact.
    """

    def __init__(self, num_examples: int, batch_size: int, rank: int, world_size: int, seed: int,
                 accumulation: int = 1, lengths: Optional[torch.Tensor] = None, group_window: int = 50):
        num_examples, batch_size, rank = int(num_examples), int(batch_size), int(rank)
        world_size, accumulation = int(world_size), int(accumulation)
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"sampler: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size <= 0 or accumulation <= 0:
            raise ValueError(f"sampler: batch_size and accumulation must be > 0, got {batch_size}, {accumulation}")
        self.global_batch = batch_size * world_size * accumulation
        if num_examples < self.global_batch:
            raise ValueError(f"sampler: {num_examples} examples are fewer than one global batch of "
                             f"{self.global_batch}; lower the batch size or add data")
        self.num_examples, self.batch_size, self.rank = num_examples, batch_size, rank
        self.world_size, self.accumulation, self.seed = world_size, accumulation, int(seed)
        # data.group_by_length: whole global batches are cut from length-sorted windows (the set of
        # ids of a step stays independent of the ranks).
        self.lengths = _check_lengths(lengths, num_examples, group_window)
        self.group_window = int(group_window)
        self.epoch = 0
        self.position = 0

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches every rank yields per epoch."""
        return (self.num_examples // self.global_batch) * self.accumulation

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.position = 0

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The global order of ``epoch`` (independent of rank and world size)."""
        g = torch.Generator().manual_seed(_derive_seed(self.seed, epoch))
        order = torch.randperm(self.num_examples, generator=g)
        if self.lengths is not None:
            order = group_by_length(order, self.lengths, self.global_batch, self.group_window, g)
        return order

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = self.epoch_order(self.epoch)
        while self.position < self.batches_per_epoch:
            step, micro = divmod(self.position, self.accumulation)
            start = step * self.global_batch + (micro * self.world_size + self.rank) * self.batch_size
            self.position += 1
            yield order[start: start + self.batch_size].clone()

    def state_dict(self) -> dict:
        return {"kind": "global", "epoch": self.epoch, "position": self.position, "seed": self.seed,
                "world_size": self.world_size, "rank": self.rank, "num_examples": self.num_examples,
                "batch_size": self.batch_size, "accumulation": self.accumulation,
                "global_batch": self.global_batch, "grouped": self.lengths is not None}

    def load_state_dict(self, state: dict) -> None:
        self.resume([state] * int(state["world_size"]))

    def resume(self, states: list[dict]) -> None:
        """Continue from every rank's saved state; exact for any world size with the same global batch."""
        _check_states(states, self.seed, self.num_examples, self.lengths is not None)
        st = states[0]
        if st.get("kind") != "global":
            raise ValueError("the checkpoint's sampler is not deterministic (training.deterministic was off)")
        if int(st["global_batch"]) != self.global_batch:
            raise ValueError(f"the checkpoint's global batch is {st['global_batch']}, this run's {self.global_batch}: "
                             f"resume with the same training.train_batch_size")
        position = int(st["position"])
        if position % int(st["accumulation"]):
            raise ValueError(f"sampler state at micro-batch {position} is inside an optimizer step")
        steps = position // int(st["accumulation"])
        self.epoch, self.position = int(st["epoch"]), steps * self.accumulation


def build_sampler(num_examples: int, micro: int, rank: int, world: int, seed: int, accumulation: int,
                  deterministic: bool, lengths: Optional[torch.Tensor] = None, group_window: int = 50):
    """The training sampler of a run: owned-id shards (default) or the world-size-invariant order.

    ``lengths`` (``[N]`` token counts) turns on length grouping (:func:`group_by_length`).
    """
    if deterministic:
        return GlobalOrderSampler(num_examples, micro, rank, world, seed, accumulation, lengths, group_window)
    return OwnedShardSampler(num_examples, micro, rank, world, seed, lengths, group_window)
