"""Named sections of a training step.

Each part of a step runs under :func:`section`: a ``torch.profiler.record_function`` range (so a torch profiler
trace shows it by name) that an installed timer (:func:`install_timer`) also times. The recipes' step uses
``teacher_forward`` (:class:`~codir_ds.engine.teacher.TeacherStep`), ``student_forward_backward`` (the engine's
forward, the method's loss, backward), ``optimizer_step`` (``engine.step()``) and each component's own section
(:mod:`codir_ds.distill.components`: ``crd_and_bank``, ``ema_update``, ``teacher_cache``). ``bench/throughput.py``
reads its time breakdown from them. Without a timer a section costs one ``record_function`` (microseconds).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from torch.profiler import record_function

STEP_SECTIONS = {"teacher_forward": "the frozen teacher's forward (or the teacher cache's rows)",
                 "student_forward_backward": "the engine's forward, the method's loss and the engine's backward",
                 "optimizer_step": "engine.step(): gradient reduction and, at an accumulation boundary, the "
                                   "optimizer step"}

_timer = None


def install_timer(timer) -> None:
    """Time every section from now on: ``timer(name)`` returns a context manager around the section's work
    (None removes it)."""
    global _timer
    _timer = timer


@contextmanager
def section(name: str):
    """Run the block as the profiler range ``name``, timed by the installed timer when there is one."""
    with record_function(name), (_timer(name) if _timer is not None else nullcontext()):
        yield
