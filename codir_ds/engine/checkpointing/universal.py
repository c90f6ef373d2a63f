"""Resuming on another number of ranks: how many ranks wrote a checkpoint, whether its optimizer state is
ZeRO-partitioned, and DeepSpeed's universal-checkpoint conversion."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from codir_ds.engine.checkpointing.store import COMPLETE, UNIVERSAL_SUFFIX, _atomic_write_text
from codir_ds.errors import CodirError


def saved_world_size(tag_dir: Path) -> int:
    """Number of ranks that wrote checkpoint ``tag_dir`` (one per-rank state file each)."""
    return len(list(tag_dir.glob("codir_rank_*.pt")))


def is_zero_checkpoint(tag_dir: Path) -> bool:
    """True when the optimizer state is partitioned over ranks (ZeRO stage >= 1)."""
    return any(tag_dir.glob("*optim_states.pt"))


# DeepSpeed's checkpoint layouts: stage 0 keeps the optimizer state in the model file, stages 1 and 2 share one
# partitioned layout, stage 3 also partitions the parameters. A checkpoint loads only into an engine of its layout.
_LAYOUTS = {0: "ZeRO stage 0", 1: "ZeRO stage 1 or 2", 3: "ZeRO stage 3"}


def zero_layout(stage: int) -> int:
    """The checkpoint layout of a ZeRO stage: 0, 1 (stages 1 and 2) or 3."""
    return 0 if stage <= 0 else 1 if stage < 3 else 3


def saved_zero_layout(tag_dir: Path) -> int:
    """The layout checkpoint ``tag_dir`` was written in (its main engine's files)."""
    if any(tag_dir.glob("zero_pp_rank_*_model_states.pt")):
        return 3
    return 1 if is_zero_checkpoint(tag_dir) else 0


def check_zero_stage(tag_dir: Path, stage: int, ds_path: str) -> None:
    """Refuse, in one line, resuming checkpoint ``tag_dir`` with a DeepSpeed JSON of another layout (DeepSpeed
    would fail deep in the engine's load, or ask for files that were never written)."""
    saved = saved_zero_layout(tag_dir)
    if saved != zero_layout(stage):
        record = tag_dir.parent.parent / "ds_config.json"
        raise CodirError(f"--resume: checkpoint '{tag_dir}' was written with {_LAYOUTS[saved]} but --deepspeed_config "
                         f"'{ds_path}' asks for ZeRO stage {stage}: resume with a DeepSpeed JSON of "
                         f"{_LAYOUTS[saved]} (the run's last one is '{record}')")


def convert_to_universal(ckpt_root: Path, tag: str, out_root: Optional[Path] = None) -> str:
    """DeepSpeed's universal-checkpoint conversion of ``tag``; returns the universal tag.

    Runs ``python -m deepspeed.checkpoint.ds_to_universal`` into ``<tag>_universal.tmp``
    and publishes it with one rename, so a crash never leaves a half-converted folder
    under the final name. An earlier finished conversion is reused. The result goes to
    ``out_root`` (default ``ckpt_root``): an extra engine's tag ``<step>/<name>`` is converted
    into ``<step>_universal/``, never into the published step folder itself.
    """
    import subprocess
    import sys
    out_root = ckpt_root if out_root is None else out_root
    out_tag = tag + UNIVERSAL_SUFFIX
    final = out_root / out_tag
    if (final / COMPLETE).is_file():
        return out_tag
    tmp = out_root / (out_tag + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    source = ckpt_root / tag
    view = None
    if any(p.is_dir() for p in source.iterdir()):
        # The converter walks sub-folders and would count an extra engine's files (CTCD's large/)
        # as this engine's: it reads a folder of links to the top-level files instead.
        view = out_root / (out_tag + ".input")
        shutil.rmtree(view, ignore_errors=True)
        view.mkdir(parents=True)
        for f in source.iterdir():
            if f.is_file():
                (view / f.name).symlink_to(f.resolve())
        source = view
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
           "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "2",
           "--num_merge_workers", "1"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        if view is not None:
            shutil.rmtree(view, ignore_errors=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        shutil.rmtree(tmp, ignore_errors=True)
        raise CodirError(f"converting checkpoint '{ckpt_root / tag}' to DeepSpeed's universal format for a new "
                         f"number of ranks failed ({last}): resume with the original number of ranks")
    (out_root / "latest_universal").unlink(missing_ok=True)  # written by the converter; codir-ds uses its own
    _atomic_write_text(tmp / COMPLETE, "ok\n")
    os.replace(tmp, final)
    return out_tag
