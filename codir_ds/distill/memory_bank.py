"""The contrastive memory bank, sharded across ranks by example id.

One row of ``dim`` fp32 values per training example (CoDIR's ``M ∈ R^{N×m}``).
Row of global example id ``i`` lives on rank ``i % world_size`` at local row
``i // world_size``. The training sampler (``codir_ds.data.sampler``) hands each
rank only the ids it owns, so the momentum update of the positives (Eq. 5) is
local; negatives owned by other ranks are fetched with one all-gather
(:meth:`ShardedMemoryBank.gather`). Unlike the authors' code (a full replica per
process that drifted between processes, only rank 0's copy checkpointed), every
row has exactly one owner, and checkpoints hold every shard with its ids so a run
can resume on a different number of ranks (:meth:`load_state_dict` re-shards).

Rank and world size come from ``torch.distributed`` when it is initialised (the
``group`` argument selects a process group), otherwise the bank is one shard
holding every row. With the gloo backend rows stay on CPU; with NCCL move the
bank to the GPU with ``.to(device)``.
"""

from __future__ import annotations

import hashlib
from typing import List, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from codir_ds.errors import CodirError

__all__ = ["ShardedMemoryBank", "BankStateError", "derive_seed"]

# Rows are initialised chunk by chunk (one generator per chunk of global ids),
# so no rank ever materialises the full [N, dim] matrix. The chunk size is part
# of the definition of the initial rows: changing it changes them.
_INIT_CHUNK = 65536


class BankStateError(CodirError, ValueError):
    """A bank checkpoint does not fit this bank (shape, coverage of ids)."""


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a deterministic function of the integers ``parts``.

    Used so that generators seeded from e.g. ``(seed, step)`` are identical on
    every rank and independent across steps, without communication.
    """
    data = ",".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


# torch >= 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
def _all_gather_single(out: torch.Tensor, inp: torch.Tensor, group=None) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def _dist_layout(group) -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _as_ids(ids, name: str = "ids") -> torch.Tensor:
    t = torch.as_tensor(ids)
    if t.dim() != 1:
        t = t.reshape(-1)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"memory bank: {name} must be integer example ids, got dtype {t.dtype}")
    return t.to(device="cpu", dtype=torch.long)


class ShardedMemoryBank:
    """Per-rank shard of the ``[num_examples, dim]`` memory bank.

    Args:
        num_examples: N, number of training examples (global ids ``0..N-1``).
        dim: m, feature size of a row (the projection size, e.g. 128).
        momentum: β of Eq. 5, in [0, 1): fraction of the old row kept per update.
        seed: seeds the random unit-vector initial rows; row ``i`` depends only on
            ``(seed, i)``, not on the world size.
        group: ``torch.distributed`` process group to shard over (default group
            when None). Ignored when distributed is not initialised.
        normalize_features: L2-normalise each feature before Eq. 5 (the CRD convention,
            default). False applies Eq. 5 to the raw feature: only for ablations.

    Attributes:
        rank, world_size: layout of this bank.
        rows: ``[n_local, dim]`` fp32 tensor, local row ``k`` = global id
            ``rank + k * world_size``.
    """

    def __init__(self, num_examples: int, dim: int, momentum: float, seed: int = 0, group=None,
                 normalize_features: bool = True):
        if int(num_examples) <= 0:
            raise ValueError(f"memory bank: num_examples must be > 0, got {num_examples}")
        if int(dim) <= 0:
            raise ValueError(f"memory bank: dim must be > 0, got {dim}")
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"memory bank: momentum β must be in [0, 1), got {momentum}")
        self.num_examples = int(num_examples)
        self.dim = int(dim)
        self.momentum = float(momentum)
        self.seed = int(seed)
        self.group = group
        self.normalize_features = bool(normalize_features)
        self.rank, self.world_size = _dist_layout(group)
        self._owned = torch.arange(self.rank, self.num_examples, self.world_size, dtype=torch.long)
        self.rows = self._init_rows()
        # Momentum updates received per local row (a positive seen in an applied step).
        self.updates = torch.zeros(len(self._owned), dtype=torch.long)

    # ------------------------------------------------------------------ layout
    def _init_rows(self) -> torch.Tensor:
        rows = torch.empty(len(self._owned), self.dim, dtype=torch.float32)
        for start in range(0, self.num_examples, _INIT_CHUNK):
            stop = min(start + _INIT_CHUNK, self.num_examples)
            g = torch.Generator().manual_seed(derive_seed(self.seed, start // _INIT_CHUNK))
            block = F.normalize(torch.randn(stop - start, self.dim, generator=g), dim=1)
            # owned global ids in [start, stop): first one >= start congruent to rank
            first = start + ((self.rank - start) % self.world_size)
            if first >= stop:
                continue
            gids = torch.arange(first, stop, self.world_size)
            rows[gids // self.world_size] = block[gids - start]
        return rows

    @property
    def device(self) -> torch.device:
        return self.rows.device

    @property
    def num_local(self) -> int:
        """Number of rows this rank owns."""
        return self.rows.shape[0]

    def to(self, device) -> "ShardedMemoryBank":
        """Move the local rows to ``device`` (in place); returns self."""
        self.rows = self.rows.to(device)
        self.updates = self.updates.to(device)
        return self

    def owned_ids(self) -> torch.Tensor:
        """Global ids this rank owns, ascending, LongTensor ``[n_local]`` on CPU."""
        return self._owned.clone()

    def _check_range(self, ids: torch.Tensor, what: str) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_examples):
            bad = ids[(ids < 0) | (ids >= self.num_examples)][:5].tolist()
            raise ValueError(
                f"memory bank {what}: example ids out of range [0, {self.num_examples}): {bad}"
            )

    def _local_rows_of(self, ids, what: str) -> torch.Tensor:
        """Validate that ``ids`` are in range and owned here; return local row indices."""
        ids = _as_ids(ids)
        self._check_range(ids, what)
        if self.world_size > 1:
            foreign = ids % self.world_size != self.rank
            if bool(foreign.any()):
                bad = ids[foreign][:5].tolist()
                raise ValueError(
                    f"memory bank {what}: ids {bad} are not owned by rank {self.rank} of "
                    f"{self.world_size} (id i lives on rank i % world_size); feed each rank "
                    f"only its own ids (OwnedShardSampler) or use gather() to read any id"
                )
        return ids // self.world_size

    # ----------------------------------------------------------------- access
    @torch.no_grad()
    def update(self, ids, feats: torch.Tensor) -> None:
        """Momentum update of the positives' rows (CoDIR Eq. 5) on L2-normalised features, then L2 re-normalise.

        ``row ← normalize(β·row + (1-β)·normalize(h))`` where ``h`` is the row of ``feats``
        (the projected student feature ``h^s``, cast to fp32 and detached). Normalising ``h``
        first is the CRD convention (the authors' code normalises the embedding before the
        update): with the raw feature, whose norm grows during training, the effective momentum
        would fall towards 0 and the bank would only copy the latest feature.

        Args:
            ids: ``[B]`` global example ids, all owned by this rank.
            feats: ``[B, dim]`` student features, any float dtype / device.

        An id repeated within one call is applied sequentially in the order it
        appears (same result as several single-id updates). The sampler never
        produces duplicates within a step.
        """
        local = self._local_rows_of(ids, "update")
        if feats.dim() != 2 or feats.shape != (local.numel(), self.dim):
            raise ValueError(
                f"memory bank update: feats must be [{local.numel()}, {self.dim}] "
                f"(one row per id), got {tuple(feats.shape)}"
            )
        if local.numel() == 0:
            return
        # Duplicates are found on the host ids (no device-to-host sync on the training hot path).
        _, host_counts = torch.unique(local, return_counts=True)
        rounds = int(host_counts.max())
        feats = feats.detach().to(device=self.device, dtype=torch.float32)
        if self.normalize_features:
            feats = F.normalize(feats, dim=1)
        local = local.to(self.device, non_blocking=True)
        self.updates.index_add_(0, local, torch.ones_like(local))
        beta = self.momentum
        if rounds == 1:
            rows = beta * self.rows[local] + (1.0 - beta) * feats
            self.rows[local] = F.normalize(rows, dim=1)
            return
        # Duplicates: the k-th occurrence of every id is applied in round k.
        order = torch.argsort(local, stable=True)
        sorted_local = local[order]
        first_pos = torch.searchsorted(sorted_local, sorted_local)  # start of each run
        occurrence = torch.empty_like(local)
        occurrence[order] = torch.arange(local.numel(), device=local.device) - first_pos
        for k in range(rounds):
            sel = occurrence == k
            idx = local[sel]
            rows = beta * self.rows[idx] + (1.0 - beta) * feats[sel]
            self.rows[idx] = F.normalize(rows, dim=1)

    @torch.no_grad()
    def set_rows(self, ids, feats: torch.Tensor) -> None:
        """Replace the rows of owned ``ids`` by L2-normalised ``feats`` (a warm start; not counted as updates)."""
        local = self._local_rows_of(ids, "set_rows")
        if feats.shape != (local.numel(), self.dim):
            raise ValueError(f"memory bank set_rows: feats must be [{local.numel()}, {self.dim}], "
                             f"got {tuple(feats.shape)}")
        self.rows[local.to(self.device)] = F.normalize(feats.detach().to(self.device, torch.float32), dim=1)

    @torch.no_grad()
    def update_routed(self, ids, feats: torch.Tensor, id_group=None) -> None:
        """:meth:`update` for positives of ANY rank: each row is updated on its owner. COLLECTIVE.

        Used when a rank trains on ids it does not own (``training.deterministic``). Every
        rank passes its own positives (counts may differ); all-gathers of the sizes,
        the ids and the ``[B_total, dim]`` features, then every rank applies
        the updates of the ids it owns, in rank order. ``id_group`` (a gloo group over the same
        ranks) carries the sizes and ids as host tensors, so no device-to-host copy waits for
        the device; without it they go through the bank's group on its device.
        """
        ids = _as_ids(ids)
        self._check_range(ids, "update_routed")
        if feats.dim() != 2 or feats.shape != (ids.numel(), self.dim):
            raise ValueError(f"memory bank update_routed: feats must be [{ids.numel()}, {self.dim}], "
                             f"got {tuple(feats.shape)}")
        if self.world_size == 1:
            self.update(ids, feats)
            return
        w = self.world_size
        id_device = "cpu" if id_group is not None else self.device
        id_group = id_group if id_group is not None else self.group
        size = torch.tensor([ids.numel()], dtype=torch.long, device=id_device)
        sizes = torch.empty(w, dtype=torch.long, device=id_device)
        _all_gather_single(sizes, size, group=id_group)
        most = int(sizes.max())
        id_send = torch.full((most,), -1, dtype=torch.long, device=id_device)  # padding: id -1
        id_send[: ids.numel()] = ids.to(id_device)
        feat_send = torch.zeros(most, self.dim, dtype=torch.float32, device=self.device)
        feat_send[: ids.numel()] = feats.detach().to(self.device, torch.float32)
        all_ids = torch.empty(w * most, dtype=torch.long, device=id_device)
        all_feats = torch.empty(w * most, self.dim, dtype=torch.float32, device=self.device)
        _all_gather_single(all_ids, id_send, group=id_group)
        _all_gather_single(all_feats, feat_send, group=self.group)
        all_ids = all_ids.cpu()
        keep = (all_ids >= 0) & (all_ids % w == self.rank)
        self.update(all_ids[keep], all_feats[keep.to(self.device, non_blocking=True)])

    @torch.no_grad()
    def read(self, ids) -> torch.Tensor:
        """Rows ``[len(ids), dim]`` (fp32, a copy) for global ids owned by this rank."""
        local = self._local_rows_of(ids, "read").to(self.device)
        return self.rows[local].clone()

    @torch.no_grad()
    def gather(self, ids) -> torch.Tensor:
        """Rows for any global ids, fetched from their owners. COLLECTIVE.

        Every rank of the group must call it with the same ``ids`` (in the same
        order). Each rank contributes the rows it owns among the distinct ids,
        padded to the largest per-rank count (known to every rank from
        ``ids % world_size``, so no size exchange is needed), in one all-gather.

        Args:
            ids: ``[n]`` global ids, duplicates allowed.

        Returns:
            ``[n, dim]`` fp32 rows on the bank's device, in the order of ``ids``,
            identical on every rank.
        """
        ids = _as_ids(ids)
        self._check_range(ids, "gather")  # same ids everywhere -> every rank raises alike
        if ids.numel() == 0:
            return torch.empty(0, self.dim, dtype=torch.float32, device=self.device)
        if self.world_size == 1:
            return self.rows[ids.to(self.device, non_blocking=True)].clone()
        w = self.world_size
        uniq, inverse = torch.unique(ids, return_inverse=True)  # sorted, same on all ranks
        owner = uniq % w
        counts = torch.bincount(owner, minlength=w)
        max_count = int(counts.max())
        # Within-owner position of every unique id (uniq is sorted, so the ids of
        # one owner appear in ascending order in both the sender and receivers).
        order = torch.argsort(owner, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        within = torch.empty_like(uniq)
        within[order] = torch.arange(uniq.numel()) - starts[owner[order]]
        source = owner * max_count + within  # row in the gathered buffer

        mine = uniq[owner == self.rank]
        send = torch.zeros(max_count, self.dim, dtype=torch.float32, device=self.device)
        if mine.numel():
            send[: mine.numel()] = self.rows[(mine // w).to(self.device, non_blocking=True)]
        recv = torch.empty(w * max_count, self.dim, dtype=torch.float32, device=self.device)
        _all_gather_single(recv, send, group=self.group)
        # index copies to the device without a stream sync (non_blocking; a no-op on the CPU)
        source, inverse = source.to(self.device, non_blocking=True), inverse.to(self.device, non_blocking=True)
        return recv[source][inverse]

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """This rank's shard: ``{num_examples, dim, momentum, world_size, rank,
        ids [n_local] LongTensor, rows [n_local, dim] fp32, updates [n_local] int64}``
        (CPU copies; ``updates`` counts the momentum updates each row received).

        Save the shards of all ranks; :meth:`load_state_dict` takes the list.
        """
        return {
            "num_examples": self.num_examples,
            "dim": self.dim,
            "momentum": self.momentum,
            "world_size": self.world_size,
            "rank": self.rank,
            "ids": self._owned.clone(),
            "rows": self.rows.detach().to("cpu", copy=True),
            "updates": self.updates.to("cpu", copy=True),
        }

    def _read_shard(self, k: int, sh: dict) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validate saved shard ``k``; returns its (ids, rows as CPU float32, update counts)."""
        missing = {"num_examples", "dim", "ids", "rows"} - set(sh)
        if missing:
            raise BankStateError(
                f"memory bank checkpoint: shard {k} lacks keys {sorted(missing)}; "
                f"is it a ShardedMemoryBank.state_dict()?"
            )
        if int(sh["num_examples"]) != self.num_examples or int(sh["dim"]) != self.dim:
            raise BankStateError(
                f"memory bank checkpoint: shard {k} is for num_examples={sh['num_examples']}, "
                f"dim={sh['dim']} but this bank has num_examples={self.num_examples}, "
                f"dim={self.dim}; the dataset or projection size changed since the checkpoint"
            )
        ids = _as_ids(sh["ids"], "checkpoint ids")
        rows = torch.as_tensor(sh["rows"])
        if rows.shape != (ids.numel(), self.dim):
            raise BankStateError(
                f"memory bank checkpoint: shard {k} has {ids.numel()} ids but rows of shape "
                f"{tuple(rows.shape)} (expected [{ids.numel()}, {self.dim}])"
            )
        upd = sh.get("updates")  # absent in checkpoints written before the counter existed
        updates = (torch.zeros(ids.numel(), dtype=torch.long) if upd is None
                   else torch.as_tensor(upd, dtype=torch.long).reshape(-1))
        return ids, rows.to("cpu", torch.float32), updates

    def _check_cover(self, ids: torch.Tensor, single: bool) -> None:
        """Raise unless the saved ``ids`` cover each of ``num_examples`` ids exactly once."""
        counts = torch.bincount(ids, minlength=self.num_examples)
        if not bool((counts == 1).all()):
            missing_ids = (counts == 0).nonzero().flatten()[:5].tolist()
            dup_ids = (counts > 1).nonzero().flatten()[:5].tolist()
            hint = (
                "pass the list of the shards saved by every rank"
                if single
                else "pass every rank's shard of one checkpoint, each once"
            )
            raise BankStateError(
                f"memory bank checkpoint: shards must cover each of the {self.num_examples} ids "
                f"exactly once (missing e.g. {missing_ids}, duplicated e.g. {dup_ids}); {hint}"
            )

    def _keep_owned(self, ids: torch.Tensor, rows: torch.Tensor, updates: torch.Tensor) -> None:
        """Re-shard: keep the saved rows/counters of the ids this rank owns now, in owned order."""
        pos = torch.empty(self.num_examples, dtype=torch.long)
        pos[ids] = torch.arange(ids.numel())
        self.rows = rows[pos[self._owned]].to(self.device)
        self.updates = updates[pos[self._owned]].to(self.device)

    @torch.no_grad()
    def load_state_dict(self, state: Union[dict, Sequence[dict]]) -> None:
        """Restore rows from a checkpoint, re-sharding if the world size changed.

        Args:
            state: either the list of shard dicts saved by every rank of a
                previous run (any world size; this rank keeps the ids it owns
                now), or one shard dict whose ids are exactly this rank's owned
                ids (same layout) or every id (a single-process checkpoint).

        The momentum of this bank (from the current config) is kept; the
        checkpoint's is informational. Raises :class:`BankStateError` (a
        ``ValueError``) if ``num_examples``/``dim`` differ or the shards do not
        cover every id exactly once.
        """
        single = isinstance(state, dict)
        shards: List[dict] = [state] if single else list(state)
        if not shards:
            raise BankStateError("memory bank checkpoint: empty list of shards")
        parts = [self._read_shard(k, sh) for k, sh in enumerate(shards)]
        ids, rows, updates = (torch.cat(list(t)) for t in zip(*parts))
        self._check_range(ids, "checkpoint")
        # One shard holding exactly this rank's owned ids (same layout): no need for the other ranks' shards.
        same_layout = single and torch.equal(torch.sort(ids).values, self._owned)
        if not same_layout:
            self._check_cover(ids, single)
        self._keep_owned(ids, rows, updates)

    def __repr__(self) -> str:
        return (
            f"ShardedMemoryBank(num_examples={self.num_examples}, dim={self.dim}, "
            f"momentum={self.momentum}, rank={self.rank}/{self.world_size}, "
            f"local_rows={self.num_local}, device={self.device})"
        )
