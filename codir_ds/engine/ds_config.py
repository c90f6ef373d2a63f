"""The DeepSpeed JSON: read, adapt to the machine, and check the batch arithmetic.

The JSON describes the engine (batch sizes, precision, ZeRO); the experiment YAML
may override the batch sizes for small runs (``training.train_batch_size``,
``training.micro_batch_size``). Optimizer and learning-rate schedule come from the
YAML, so an ``optimizer``/``scheduler`` block in the JSON is refused.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from codir_ds.errors import CodirError


def read_ds_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise CodirError(f"--deepspeed_config '{path}' does not exist: pass a DeepSpeed JSON such as ds_configs/zero2.json")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CodirError(f"--deepspeed_config '{path}' is not valid JSON (line {e.lineno}: {e.msg}): fix the file") from None
    if not isinstance(cfg, dict):
        raise CodirError(f"--deepspeed_config '{path}' must hold a JSON object")
    for block in ("optimizer", "scheduler"):
        if block in cfg:
            raise CodirError(f"--deepspeed_config '{path}' has an '{block}' block: codir-ds builds the optimizer and "
                             f"lr schedule from the experiment YAML (training.lr, training.warmup_ratio); remove it")
    return cfg


def resolve_batch(ds: dict, world_size: int, train_batch_size: Optional[int] = None,
                  micro_batch_size: Optional[int] = None) -> tuple[int, int, int]:
    """Return ``(train_batch_size, micro_batch_per_rank, grad_accumulation)``, checked.

    Any two of the three determine the third (``train = micro * accum * world``).
    YAML overrides replace the JSON's values: both sizes -> accumulation derived;
    ``train_batch_size`` alone -> accumulation 1, micro derived; micro alone -> the
    JSON's train_batch_size with accumulation derived. A mismatch is explained in one line.
    """
    train, micro, accum = (ds.get("train_batch_size"), ds.get("train_micro_batch_size_per_gpu"),
                           ds.get("gradient_accumulation_steps"))
    if train_batch_size is not None and micro_batch_size is not None:
        train, micro, accum = train_batch_size, micro_batch_size, None   # accumulation derived
    elif train_batch_size is not None:
        train, micro, accum = train_batch_size, None, 1                   # micro = train / world
    elif micro_batch_size is not None:
        micro, accum = micro_batch_size, None                             # accumulation derived
    for name, v in (("train_batch_size", train), ("train_micro_batch_size_per_gpu", micro),
                    ("gradient_accumulation_steps", accum)):
        if v is not None and (not isinstance(v, int) or v <= 0):
            raise CodirError(f"DeepSpeed {name} must be a positive integer, got {v!r}")
    if train is None and micro is None:
        raise CodirError("the DeepSpeed config sets neither train_batch_size nor train_micro_batch_size_per_gpu: "
                         "set one (or training.train_batch_size in the YAML)")
    if train is None:
        accum = accum or 1
        train = micro * accum * world_size
    elif micro is None:
        accum = accum or 1
        if train % (accum * world_size):
            raise CodirError(f"train_batch_size {train} is not divisible by gradient_accumulation_steps {accum} x "
                             f"world size {world_size}: choose a multiple of {accum * world_size}")
        micro = train // (accum * world_size)
    elif accum is None:
        if train % (micro * world_size):
            raise CodirError(f"train_batch_size {train} is not divisible by micro batch {micro} x world size "
                             f"{world_size}: choose a multiple of {micro * world_size} or change the micro batch")
        accum = train // (micro * world_size)
    if train != micro * accum * world_size:
        raise CodirError(f"batch arithmetic does not hold: train_batch_size {train} != micro {micro} x accumulation "
                         f"{accum} x world size {world_size} = {micro * accum * world_size}; fix one of them "
                         f"(or drop gradient_accumulation_steps to let it be derived)")
    return train, micro, accum


def fp16_supported() -> bool:
    from deepspeed.accelerator import get_accelerator
    return bool(get_accelerator().is_fp16_supported())


def prepare_ds_config(ds: dict, world_size: int, training_cfg) -> tuple[dict, torch.dtype, Optional[str]]:
    """Adapt the JSON to this machine; return ``(config, compute dtype, one-line warning or None)``."""
    ds = json.loads(json.dumps(ds))  # deep copy
    train, micro, accum = resolve_batch(ds, world_size, training_cfg.train_batch_size, training_cfg.micro_batch_size)
    ds["train_batch_size"] = train
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accum
    warning = None
    fp16 = ds.get("fp16", {}).get("enabled", False)
    bf16 = ds.get("bf16", {}).get("enabled", False)
    if fp16 and bf16:
        raise CodirError("the DeepSpeed config enables both fp16 and bf16: enable one")
    if fp16 and not fp16_supported():
        ds["fp16"] = {"enabled": False}
        fallback = training_cfg.fp16_fallback
        if fallback == "bf16":
            ds["bf16"] = {"enabled": True}
            bf16 = True
        warning = (f"fp16 is not supported on this accelerator: training in {fallback} instead "
                   f"(training.fp16_fallback={fallback})")
        fp16 = False
    dtype = torch.float16 if fp16 else torch.bfloat16 if bf16 else torch.float32
    ds.setdefault("steps_per_print", 10 ** 9)  # our own progress bar and TensorBoard do the reporting
    return ds, dtype, warning
