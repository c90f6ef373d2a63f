"""``training.compile``: its start-up checks and torch.compile of the engine's module."""
from __future__ import annotations

import os
import shutil
import time
from typing import Optional

import torch

from codir_ds.engine.ds_config import zero_stage
from codir_ds.engine.optim import run_device_type
from codir_ds.errors import CodirError


def check_compile(tcfg, ds: dict) -> None:
    """Start-up checks of ``training.compile`` that need the machine and the DeepSpeed JSON (the value checks
    are in the config's ``validate``). One-line errors, nothing written."""
    if not tcfg.compile:
        return
    if zero_stage(ds) == 3:
        raise CodirError("training.compile is not supported with ZeRO-3 (its parameter-gathering hooks break the "
                         "compiled graph at every submodule): use ds_configs/zero2.json or set training.compile=false")
    if ds.get("compile", {}).get("deepcompile", False):
        raise CodirError("training.compile compiles with torch.compile, not DeepSpeed's deepcompile: remove "
                         "compile.deepcompile from the DeepSpeed JSON or set training.compile=false")
    if run_device_type() == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++",
                                                                          "clang++")):
        raise CodirError("training.compile on the CPU needs a C++ compiler for TorchInductor (none of $CXX, g++, "
                         "c++, clang++ is on PATH): install one or set training.compile=false")


def compile_engine(engine, *called: Optional[torch.nn.Module]) -> float:
    """``training.compile``: torch.compile the engine's module (student + heads) in place, dynamic shapes.

    ``nn.Module.compile`` (what ``engine.compile`` calls) keeps the module object, so state-dict keys,
    checkpoints and exports carry no ``_orig_mod.`` prefix. ``dynamic=True``: finetuning pads each batch
    to its longest sequence and evaluation uses other batch sizes; static shapes would recompile for each.
    Compilation itself happens lazily in the first forward (and backward) of each mode (train / eval).
    ``called``: other models the compiled forward calls (CR-ILD's EMA student), prepared like the student.
    Returns the seconds spent here (the set-up only).
    """
    from deepspeed.accelerator import get_accelerator
    t0 = time.perf_counter()
    if get_accelerator().device_name() == "cpu":
        # Dropout through ATen's RNG, as in eager: the same masks as an eager run from the same RNG state,
        # and faster on the CPU than Inductor's own random kernels (fwd+bwd of the MiniLM 2x384 student,
        # batch 32 x 64, 2 cores: 0.40 s against 0.44 s). GPUs keep Inductor's fused (Philox) dropout.
        import torch._inductor.config as inductor_config
        inductor_config.fallback_random = True
    for module in (engine.module, *called):
        if module is not None:
            install_output_hooks(module)
    engine.compile(backend=get_accelerator().get_compile_backend(), compile_kwargs={"dynamic": True})
    return time.perf_counter() - t0


def install_output_hooks(module: torch.nn.Module) -> None:
    """Install transformers' hidden-state/attention capturing hooks now rather than in the first forward.

    transformers 5 installs them lazily, under a threading lock, in the first forward that asks for
    ``output_hidden_states``; traced by torch.compile, that lock is a graph break which stays in the
    compiled student (its forward split in several graphs). Eager behaviour is unchanged.
    """
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # transformers without lazy output hooks
        return
    for m in module.modules():
        if isinstance(m, PreTrainedModel):
            maybe_install_capturing_hooks(m)
