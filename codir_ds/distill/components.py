"""What a method needs beside the engine, as components with one small lifecycle.

A recipe holds the run's components in order (:attr:`Recipe.components`) and calls each at fixed points,
without knowing what it is::

    once the run is set up       prepare(run)                         run: a RunContext (new or resumed run,
                                                                     the student's features, batch size, log)
    at the start of a step       start_step(step, batches)            COLLECTIVE where a component gathers
    into the student's forward   forward_inputs()                     extra keyword inputs of the engine
    into the method's loss       loss_inputs(ids)                     fields of LossInputs for micro-batch ids
    after every micro step       after_micro_step(ids, out)          ids: the micro-batch's example ids,
                                                                     out: the engine's output dict
    after every optimizer step   after_optimizer_step(applied, stage)   applied: the engine did not skip it
    at log steps                 scalars()                            COLLECTIVE where a component sums ranks
    before a checkpoint          before_save()
    in every checkpoint          state_dict() / load_state_dict()     this rank's file (None: nothing to save)
    at the end                   results()                            entries of results.json

Each call runs under the step section :attr:`Component.section` (:func:`codir_ds.engine.sections.section`, a
``torch.profiler.record_function`` range), which
``bench/throughput.py`` and any torch profiler trace show. The memory bank
(:class:`~codir_ds.distill.bank_component.MemoryBankComponent`), CR-ILD's EMA copy (:class:`EMAComponent`) and
the teacher cache (:class:`~codir_ds.engine.teacher_cache.TeacherCache`) are components.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch

from codir_ds.engine.sections import section


@dataclass
class RunContext:
    """What a component may use once the run is set up (models, engines, checkpoint restored)."""
    resumed: bool                                   # restored from a checkpoint (its components' states loaded)
    student_features: Callable[[torch.Tensor], torch.Tensor]  # training ids -> [B, m] projected student features
    eval_mode: Callable[[], ContextManager]         # the trained models in eval mode inside the block
    batch_size: int                                 # examples per inference batch (training.eval_batch_size)
    log: Callable[[str], None] = print              # rank 0's start-up lines (no-op on other ranks)


class Component:
    """Base of the components: every hook does nothing unless overridden."""
    name: str = ""      # the key of its state in the checkpoint's per-rank file
    section: str = ""   # the profiler section of its work
    stateful: bool = False  # its state_dict() goes into every checkpoint
    sharded: bool = False   # its state is one shard per rank, re-sharded on resume (load_shards, not load_state_dict)
    tags: dict = {}     # TensorBoard tags its scalars() write: {tag: what it is} (docs/running.md's tag reference)

    def prepare(self, run: RunContext) -> None:
        """Once, after the models, the engines and (on ``--resume``) the checkpoint are loaded, before training."""

    def start_step(self, step: int, batches: list) -> None:
        """Before the first micro step of optimizer step ``step`` (``batches``: this rank's ``(epoch, ids)``)."""

    def forward_inputs(self) -> dict:
        """Keyword inputs this component adds to the student's forward (e.g. a model that provides targets)."""
        return {}

    def loss_inputs(self, ids: torch.Tensor) -> dict:
        """Fields of :class:`~codir_ds.distill.methods.base.LossInputs` for the micro-batch ``ids`` (e.g. negatives)."""
        return {}

    def after_micro_step(self, ids: torch.Tensor, out: dict) -> None:
        """After a micro step's backward and ``engine.step()`` (gradient accumulation boundary or not)."""

    def after_optimizer_step(self, applied: bool, stage: str) -> None:
        """After the optimizer step: ``applied`` False when the engine skipped it (non-finite gradients)."""

    def scalars(self) -> dict:
        """Values logged at log steps (TensorBoard tags as keys)."""
        return {}

    def before_save(self) -> None:
        """Before every checkpoint (flush what the checkpoint must find on disk)."""

    def state_dict(self) -> Optional[dict]:
        """This rank's state for the checkpoint (None: the component keeps nothing)."""
        return None

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output on ``--resume``."""

    def results(self) -> dict:
        """Entries of results.json."""
        return {}


class Components:
    """A run's components in the order they were added, each hook called on every one under its section."""

    def __init__(self):
        self.items: list[Component] = []

    def add(self, component: Component) -> Component:
        self.items.append(component)
        return component

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def prepare(self, run: RunContext) -> None:
        for c in self.items:
            c.prepare(run)

    def start_step(self, step: int, batches: list) -> None:
        for c in self.items:
            with section(c.section):
                c.start_step(step, batches)

    def forward_inputs(self) -> dict:
        out: dict = {}
        for c in self.items:
            out.update(c.forward_inputs())
        return out

    def loss_inputs(self, ids: torch.Tensor) -> dict:
        out: dict = {}
        for c in self.items:
            with section(c.section):
                out.update(c.loss_inputs(ids))
        return out

    def after_micro_step(self, ids: torch.Tensor, out: dict) -> None:
        for c in self.items:
            with section(c.section):
                c.after_micro_step(ids, out)

    def after_optimizer_step(self, applied: bool, stage: str) -> None:
        for c in self.items:
            with section(c.section):
                c.after_optimizer_step(applied, stage)

    def scalars(self) -> dict:
        out: dict = {}
        for c in self.items:
            out.update(c.scalars())
        return out

    def before_save(self) -> None:
        for c in self.items:
            c.before_save()

    def results(self) -> dict:
        out: dict = {}
        for c in self.items:
            out.update(c.results())
        return out

    def stateful(self) -> dict:
        """``{name: component}`` of those whose state goes into the per-rank checkpoint files."""
        return {c.name: c for c in self.items if c.stateful}


class EMAComponent(Component):
    """Exponential moving average of the student's weights (CR-ILD's optional consistency targets).

    Every rank holds the same copy (data-parallel weights are identical after a step); it is updated after each
    applied optimizer step of the stages where ``active(stage)`` holds, and saved in the per-rank checkpoint
    files.
    """
    name = "ema"
    section = "ema_update"
    stateful = True

    def __init__(self, student: torch.nn.Module, decay: float, source: Optional[Callable[[], torch.nn.Module]] = None,
                 active: Callable[[str], bool] = lambda stage: True):
        self.decay = decay
        self.model = copy.deepcopy(student).requires_grad_(False)
        self.source = source or (lambda: student)  # the trained student (the engine's module.student)
        self.active = active

    @torch.no_grad()
    def update(self, student: torch.nn.Module) -> None:
        for e, p in zip(self.model.parameters(), student.parameters(), strict=True):
            e.mul_(self.decay).add_(p.detach().to(e.dtype), alpha=1.0 - self.decay)

    def forward_inputs(self) -> dict:
        return {"clean_model": self.model}  # the consistency targets come from this copy, not the student

    def after_optimizer_step(self, applied: bool, stage: str) -> None:
        if applied and self.active(stage):
            self.update(self.source())

    def state_dict(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
