"""One-line config value checks shared by the experiment config and the method configs.

Each raises :class:`~codir_ds.errors.CodirError` with the key, the allowed values and the fix.
"""
from __future__ import annotations

import math
from typing import Any

from codir_ds.errors import CodirError


def fix(key: str) -> str:
    """The fix clause of a bad-value message."""
    return f"fix it in the YAML or with --set {key}=..."


def choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise CodirError(f"config key '{key}' must be one of {', '.join(map(str, allowed))}; got {value!r}: "
                         f"{fix(key)}")


def positive(key: str, value, allow_zero: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise CodirError(f"config key '{key}' must be a finite number {'>= 0' if allow_zero else '> 0'}, "
                         f"got {value!r}: {fix(key)}")


def in_range(key: str, value, ok: bool, allowed: str) -> None:
    """``ok`` says whether ``value`` lies in ``allowed`` (written as an interval, e.g. "[0, 1)")."""
    if not ok:
        raise CodirError(f"config key '{key}' must be in {allowed}, got {value}: {fix(key)}")


def layers(key: str, value) -> None:
    """``"all"``, ``"last"`` or a non-empty list of layer indices >= 0."""
    if isinstance(value, str):
        if value not in ("all", "last"):
            raise CodirError(f"config key '{key}' must be 'all', 'last' or a list of layer indices, got {value!r}: "
                             f"{fix(key)}")
    elif not value or any(v < 0 for v in value):
        raise CodirError(f"config key '{key}' must be 'all' or a non-empty list of layer indices >= 0, got {value!r}: "
                         f"{fix(key)}")


def fits_global_batch(n: int, what: str, ds: dict, deterministic: bool, unit: str = "examples") -> None:
    """``training.deterministic`` cuts each epoch's one shuffle into whole global batches: ``n`` must fill one."""
    if deterministic and n < ds["train_batch_size"]:
        raise CodirError(f"{what} has {n} {unit}, fewer than one global batch of {ds['train_batch_size']} "
                         f"(training.deterministic trains on whole global batches): lower the batch size, add data "
                         f"or set training.deterministic=false")
