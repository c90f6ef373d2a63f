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


def zero_stage(ds: dict) -> int:
    """The ZeRO stage DeepSpeed reads from ``ds``: ``zero_optimization.stage`` (0 without the block; the deprecated
    ``"zero_optimization": true`` is stage 1, as DeepSpeed reads it)."""
    zero = ds.get("zero_optimization")
    if isinstance(zero, bool):
        return int(zero)
    return int((zero or {}).get("stage", 0))


def read_ds_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise CodirError(f"--deepspeed_config '{path}' does not exist: pass a DeepSpeed JSON such as ds_configs/zero2.json")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CodirError(f"--deepspeed_config '{path}' is not valid JSON (line {e.lineno}: {e.msg}): fix the file") from None
    if not isinstance(cfg, dict):
        raise CodirError(f"--deepspeed_config '{path}' must hold a JSON object: see ds_configs/zero2.json")
    for block in ("optimizer", "scheduler"):
        if block in cfg:
            raise CodirError(f"--deepspeed_config '{path}' has an '{block}' block: codir-ds builds the optimizer and "
                             f"lr schedule from the experiment YAML (training.lr, training.warmup_ratio); remove it")
    check_deepspeed_keys(cfg, path)
    return cfg


# DeepSpeed's pydantic config models -> where their block sits in the JSON (for error messages).
_BLOCKS = {"DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedFP16Config": "fp16", "DeepSpeedBF16Config": "bf16",
           "DeepSpeedActivationCheckpointingConfig": "activation_checkpointing",
           "DeepSpeedFlopsProfilerConfig": "flops_profiler", "DeepSpeedCommsConfig": "comms_logger",
           "TensorBoardConfig": "tensorboard", "WandbConfig": "wandb", "CSVConfig": "csv_monitor",
           "CompileConfig": "compile", "DeepSpeedAIOConfig": "aio"}


def _batch_neutral(ds: dict) -> dict:
    """A copy whose batch settings DeepSpeed accepts in this process (codir-ds checks the real ones).

    DeepSpeed checks them against the world size of torch.distributed when it is running: one
    micro-batch of one example on every rank.
    """
    import torch.distributed as dist
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    out = dict(ds)
    out.update(train_batch_size=world, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    return out


def check_deepspeed_keys(ds: dict, path: str) -> None:
    """Refuse, in one line, what DeepSpeed would refuse only inside ``deepspeed.initialize`` (after the
    expensive start-up), and near-miss spellings of top-level keys, which DeepSpeed silently ignores.

    DeepSpeed's own config parser runs on a copy (batch sizes neutralised: codir-ds checks those);
    the top-level keys it knows are its key constants plus every key the parser looks up.
    """
    import difflib

    import deepspeed.runtime.constants as constants
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    known = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str)}
    known |= {"optimizer", "scheduler", "zero_optimization", "activation_checkpointing", "flops_profiler",
              "autotuning", "aio", "compile", "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger",
              "checkpoint", "data_efficiency", "elasticity", "pipeline", "amp", "compression_training"}

    class Recording(dict):  # records the keys DeepSpeedConfig asks for
        def get(self, key, *default):
            known.add(key)
            return super().get(key, *default)

        def __getitem__(self, key):
            known.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            known.add(key)
            return super().__contains__(key)

    try:
        DeepSpeedConfig(Recording(_batch_neutral(ds)))
    except ValidationError as e:
        err = e.errors()[0] if e.errors() else {}
        block = _BLOCKS.get(e.title, e.title)
        where = ".".join([block, *map(str, err.get("loc", ()))])
        what = (f"an unknown key '{where}'" if err.get("type") == "extra_forbidden"
                else f"a bad value {err.get('input')!r} for '{where}' ({err.get('msg', 'invalid')})")
        raise CodirError(f"--deepspeed_config '{path}' has {what}: fix it (see the DeepSpeed configuration "
                         f"documentation)") from None
    except Exception as e:  # noqa: BLE001 - DeepSpeed's own sanity checks: assertions, type errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CodirError(f"--deepspeed_config '{path}' is refused by DeepSpeed ({type(e).__name__}: {first[:200]}): "
                         f"fix the file") from None
    for key in ds:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.85)
            if close:
                raise CodirError(f"--deepspeed_config '{path}' has the unknown key '{key}', which DeepSpeed would "
                                 f"ignore: did you mean '{close[0]}'? fix the spelling")


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
    src = {"train": "train_batch_size in the DeepSpeed JSON",  # where each value comes from, for messages
           "micro": "train_micro_batch_size_per_gpu in the DeepSpeed JSON",
           "accum": "gradient_accumulation_steps in the DeepSpeed JSON"}
    if train_batch_size is not None and micro_batch_size is not None:
        train, micro, accum = train_batch_size, micro_batch_size, None   # accumulation derived
        src.update(train="training.train_batch_size", micro="training.micro_batch_size")
    elif train_batch_size is not None:
        train, micro, accum = train_batch_size, None, 1                   # micro = train / world
        src.update(train="training.train_batch_size")
    elif micro_batch_size is not None:
        micro, accum = micro_batch_size, None                             # accumulation derived
        src.update(micro="training.micro_batch_size")
    for name, v in (("train", train), ("micro", micro), ("accum", accum)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise CodirError(f"{src[name]} must be a positive integer, got {v!r}: fix that value")
    if train is None and micro is None:
        raise CodirError("the DeepSpeed config sets neither train_batch_size nor train_micro_batch_size_per_gpu: "
                         "set one (or training.train_batch_size in the YAML)")
    if train is None:
        accum = accum or 1
        train = micro * accum * world_size
    elif micro is None:
        accum = accum or 1
        if train % (accum * world_size):
            raise CodirError(f"train_batch_size {train} ({src['train']}) is not divisible by "
                             f"gradient_accumulation_steps {accum} x world size {world_size}: set {src['train']} to a "
                             f"multiple of {accum * world_size}")
        micro = train // (accum * world_size)
    elif accum is None:
        if train % (micro * world_size):
            raise CodirError(f"train_batch_size {train} ({src['train']}) is not divisible by micro batch {micro} "
                             f"({src['micro']}) x world size {world_size}: choose a multiple of {micro * world_size} "
                             f"or change the micro batch")
        accum = train // (micro * world_size)
    if train != micro * accum * world_size:
        raise CodirError(f"batch arithmetic of the DeepSpeed JSON does not hold: train_batch_size {train} != micro "
                         f"{micro} x accumulation {accum} x world size {world_size} = {micro * accum * world_size}; "
                         f"fix one of them (or drop gradient_accumulation_steps to let it be derived)")
    return train, micro, accum


def fp16_supported() -> bool:
    """Whether runs on this machine train in fp16 when the DeepSpeed JSON asks for it.

    Never on the CPU: DeepSpeed's CPU accelerator reports fp16 on CPUs with AVX512-FP16 (oneDNN),
    but loss-scaled fp16 training there is several times slower than fp32 and skips its first steps
    while the loss scale settles; the JSON's fp16 becomes ``training.fp16_fallback`` instead, on every
    CPU alike. On other accelerators, what the accelerator reports.
    """
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return False
    return bool(acc.is_fp16_supported())


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
