"""The memory bank a method's :class:`~codir_ds.distill.methods.base.BankSpec` asks for, with its lifecycle in a run.

The recipes build one :class:`MemoryBankComponent` when the method has a bank and call it at fixed points of a
step, without knowing what it does::

    bank.start_step(step, batches)                   # COLLECTIVE, once per optimizer step: the step's negatives
    bank.loss_inputs(ids)                            # per micro step: {"negatives": ...} for the loss
    bank.after_micro_step(ids, out)                  # holds the positives' projected features out["h_s"]
    bank.after_optimizer_step(applied, stage)        # their momentum updates (Eq. 5), if the step was applied
    bank.scalars()                                   # COLLECTIVE, at log steps: bank/never_updated

Finetuning draws negatives per class (or per anchor) from examples of other labels (``labels``); pre-training
uses the rows of the global mini-batch (``labels=None``). The rows themselves (``bank.bank``, a
:class:`~codir_ds.distill.memory_bank.ShardedMemoryBank`) are saved per rank by the run checkpoint and
re-sharded on resume. It is a :class:`~codir_ds.distill.components.Component`; its work runs under the
profiler section ``crd_and_bank``.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from codir_ds.distill.components import Component, RunContext
from codir_ds.distill.memory_bank import ShardedMemoryBank
from codir_ds.distill.methods.base import BankSpec, ContrastSpec
from codir_ds.distill.negatives import (BatchNegatives, ClassNegativeRows, LabelNegativeSampler, batch_negatives,
                                        self_mask)
from codir_ds.engine.distributed import host_group


class MemoryBankComponent(Component):
    """A sharded memory bank of projected student features and the negatives a method reads from it.

    Stateful and sharded: every checkpoint holds each rank's rows (:meth:`state_dict`), and a resume loads every
    rank's (:meth:`load_shards`), re-sharding them to another number of ranks (``codir_ds.engine.checkpointing``).
    """
    name = "bank"
    section = "crd_and_bank"
    stateful = True
    sharded = True
    tags = {"bank/never_updated": "fraction of all bank rows that no momentum update has reached yet (still their "
                                  "initial rows)"}

    def __init__(self, spec: BankSpec, contrast: ContrastSpec, num_train: int, seed: int, device, world: int,
                 deterministic: bool = False, labels: Optional[torch.Tensor] = None):
        self.spec, self.seed, self.device, self.world = spec, seed, device, world
        self.num_train, self.deterministic = num_train, deterministic
        self.bank = ShardedMemoryBank(num_train, contrast.projection_dim, spec.momentum, seed=seed,
                                      normalize_features=spec.normalize).to(device)
        self.labels = labels
        self.sampler = LabelNegativeSampler(labels, spec.num_negatives, seed=seed) if labels is not None else None
        per_anchor = labels is None or spec.finetune_negatives == "anchor"
        self.ids_group = host_group() if per_anchor else None  # step ids travel host to host (NCCL)
        self.pending: list = []
        self.step_rows = None  # this optimizer step's negatives (step_negatives), read per micro-batch
        self.warm_start_seconds: Optional[float] = None  # bank_init=student's pass, when it ran

    # ------------------------------------------------------------------ one optimizer step
    def start_step(self, step: int, batches: list) -> None:
        """This step's negatives, shared by its micro steps. COLLECTIVE."""
        self.step_rows = self.step_negatives(step, batches)

    def loss_inputs(self, ids: torch.Tensor) -> dict:
        """The negatives of the micro-batch's anchors ``ids``."""
        return {"negatives": self.step_rows.for_batch(ids)}

    def step_negatives(self, step: int, batches):
        """The negatives of optimizer step ``step`` (``batches``: this rank's ``(epoch, ids)`` micro-batches), each
        micro-batch's through ``.for_batch(ids)``. COLLECTIVE. Finetuning: ``[C, K, m]`` per-class sets or K rows
        per anchor of the global step; pre-training: the global mini-batch's rows."""
        local = torch.cat([ids for _, ids in batches])
        if self.labels is None:
            cand_ids = self.negative_ids(local, step)
            return StepBatchNegatives(self.bank.gather(cand_ids), cand_ids.to(self.device, non_blocking=True))
        if self.spec.finetune_negatives == "anchor":
            return self.sampler.anchor_negatives(self.bank, step, local, self.world, self.device, self.ids_group)
        return ClassNegativeRows(self.sampler.class_negatives(self.bank, step), self.labels)

    def negative_ids(self, local_ids: torch.Tensor, step: int) -> torch.Tensor:
        """Pre-training: ids (host) of the global mini-batch whose rows are the step's negatives (with
        ``pretrain_negatives=bank`` also rows of other blocks, up to K + 1 candidates). COLLECTIVE."""
        fill = self.num_train if self.spec.pretrain_negatives == "bank" else 0
        return batch_negatives(local_ids, self.spec.num_negatives, self.seed, step, self.world, self.device,
                               self.ids_group, fill_from=fill)

    def after_micro_step(self, ids: torch.Tensor, out: dict) -> None:
        """The positives' projected features ``out["h_s"]``, held for the momentum update after the optimizer step."""
        self.pending.append((ids, out["h_s"].detach()))

    def after_optimizer_step(self, applied: bool, stage: str = "train") -> None:
        """The held positives' momentum updates (Eq. 5). A step the engine skipped (fp16 overflow, non-finite
        gradients) leaves the bank untouched too. ``training.deterministic`` (ranks train on ids they do not own)
        sends each update to the owner rank; this is collective."""
        if applied:
            if self.deterministic:
                self.bank.update_routed(torch.cat([ids for ids, _ in self.pending]),
                                        torch.cat([f for _, f in self.pending]), id_group=host_group())
            else:
                for ids, feats in self.pending:  # host ids: the bank checks them without a device sync
                    self.bank.update(ids, feats)
        self.pending.clear()

    def state_dict(self) -> dict:
        """This rank's rows, their ids and update counts."""
        return self.bank.state_dict()

    def load_shards(self, states: list) -> None:
        """Every saved rank's :meth:`state_dict`, re-sharded to this run's ranks."""
        self.bank.load_state_dict(states)

    def scalars(self) -> dict:
        """Logged at log steps. COLLECTIVE."""
        return {"bank/never_updated": never_updated_fraction(self.bank)}

    def results(self) -> dict:
        return {"bank_warm_start_seconds": self.warm_start_seconds} if self.warm_start_seconds is not None else {}

    # ------------------------------------------------------------------ before step 0
    def prepare(self, run: RunContext) -> None:
        """``bank_init=student`` on a new run: the warm start from the student's projected features, in eval mode
        (a resumed run has its rows from the checkpoint)."""
        if run.resumed or self.spec.init != "student":
            return
        with run.eval_mode():
            self.warm_start(run.student_features, run.batch_size)
        run.log(f"bank warm start: {self.num_train} rows from the student's projected features "
                f"({self.bank.num_local} on this rank) in {self.warm_start_seconds} s")

    def warm_start(self, features: Callable[[torch.Tensor], torch.Tensor], batch_size: int) -> None:
        """``bank_init=student``: every rank fills the rows it owns with ``features(ids)`` (the student's projected
        features, no communication). Called on new runs only: a resumed run has its bank from the checkpoint."""
        if self.spec.init != "student":
            return
        t0 = time.perf_counter()
        with torch.no_grad():
            for ids in self.bank.owned_ids().split(batch_size):
                self.bank.set_rows(ids, features(ids))
        self.warm_start_seconds = round(time.perf_counter() - t0, 2)


class StepBatchNegatives:
    """Pre-training: one step's candidate rows, each micro-batch's anchors masked out of its own negatives."""

    def __init__(self, candidates: torch.Tensor, cand_ids: torch.Tensor):
        self.candidates, self.cand_ids = candidates, cand_ids

    def for_batch(self, ids: torch.Tensor) -> BatchNegatives:
        return BatchNegatives(self.candidates, self_mask(ids, self.cand_ids))


def never_updated_fraction(bank) -> float:
    """Fraction of all bank rows that no momentum update has reached yet (collective: sums every shard)."""
    counts = torch.tensor([float((bank.updates == 0).sum()), float(bank.num_local)], device=bank.device)
    if dist.is_available() and dist.is_initialized() and bank.world_size > 1:
        dist.all_reduce(counts, group=bank.group)
    return float(counts[0] / counts[1].clamp_min(1.0))
