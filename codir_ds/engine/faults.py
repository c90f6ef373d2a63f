"""Fault injection for tests and preemption drills: SIGKILL one rank at a chosen point.

Set ``CODIR_DS_FAULT=<point>:<step>:<rank>`` in the environment of a run:

- ``step:S:R``  rank R kills itself right after optimizer step S (before any checkpoint of S);
- ``save:S:R``  rank R kills itself while saving checkpoint S: after the DeepSpeed files and its
  own state file are written, before the checkpoint is published (``COMPLETE``/``latest``).

The kill is a real ``SIGKILL`` (no cleanup, no Python exception handling), as when a node
dies or the scheduler preempts the job. Unset, this module does nothing.
"""
from __future__ import annotations

import os
import signal

from codir_ds.errors import CodirError

ENV = "CODIR_DS_FAULT"
POINTS = ("step", "save")


def _parse(spec: str) -> tuple[str, int, int]:
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] not in POINTS or not parts[1].isdigit() or not parts[2].isdigit():
        raise CodirError(f"{ENV}={spec!r} is not '<point>:<step>:<rank>' with point in {', '.join(POINTS)}: "
                         f"e.g. {ENV}=step:5:1, or unset it")
    return parts[0], int(parts[1]), int(parts[2])


def check_fault_spec() -> None:
    """Validate ``$CODIR_DS_FAULT`` up front (a typo would otherwise silently inject nothing)."""
    spec = os.environ.get(ENV)
    if spec:
        _parse(spec)


def maybe_fault(point: str, step: int, rank: int) -> None:
    """SIGKILL this process if ``$CODIR_DS_FAULT`` names this point, step and rank."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    if _parse(spec) == (point, int(step), int(rank)):
        print(f"{ENV}: killing rank {rank} at {point} {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
