"""Run directories: refuse to clobber an earlier run, allow an explicit resume, set one up on every rank."""
from __future__ import annotations

import dataclasses

import copy
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import yaml

from codir_ds.config import ExperimentConfig, save_config
from codir_ds.engine.checkpointing.integrity import check_resume_checkpoint
from codir_ds.errors import CodirError

# Each trained model's config.json, tokenizer and run manifest, written before training (export reads it).
ARCHITECTURE = "architecture"
# Keys that may change between a run and its resumption.
RESUMABLE_CHANGES = {("training", "stop_at_step"), ("logging", "progress_bar"), ("logging", "log_every"),
                     ("logging", "tensorboard"),
                     # speed only: the same optimizer state and the same model either way
                     ("training", "compile"), ("training", "optimizer_impl")}


def _with_defaults(saved: dict, defaults: dict) -> dict:
    """``saved`` with the keys it lacks (added to the config after it was written) at their defaults."""
    out = dict(defaults)
    for key, value in saved.items():
        out[key] = _with_defaults(value, defaults[key]) if isinstance(value, dict) and \
            isinstance(defaults.get(key), dict) else value
    return out


def _diff(old: dict, new: dict, prefix=()) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        path = prefix + (key,)
        if prefix == ("method",) and key not in new:
            continue  # an option the run's method does not read (older runs saved every method's options)
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, path)
        elif a != b and path not in RESUMABLE_CHANGES:
            out.append(".".join(path))
    return out


def check_run_dir(out: Path, cfg_dict: dict, resume: bool, overwrite: bool) -> str:
    """Decide what to do with ``out``: 'fresh', 'resume' or 'overwrite'. Touches nothing."""
    if resume and overwrite:
        raise CodirError("--resume and --overwrite contradict each other: pass one")
    if out.exists() and not out.is_dir():
        raise CodirError(f"--output_dir '{out}' is a file: choose a directory")
    used = out.is_dir() and any(out.iterdir())
    if resume:
        saved = out / "config.yaml"
        if not saved.is_file():
            raise CodirError(f"--resume: '{out}' holds no run (no config.yaml): drop --resume to start a new run")
        try:
            old = yaml.safe_load(saved.read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise CodirError(f"--resume: the saved config '{saved}' cannot be read ({type(e).__name__}): restore it "
                             f"or start the run again with --overwrite") from None
        if not isinstance(old, dict):
            raise CodirError(f"--resume: the saved config '{saved}' is not a mapping: restore it or start the run "
                             f"again with --overwrite")
        changed = _diff(_with_defaults(old, dataclasses.asdict(ExperimentConfig())), cfg_dict)
        if changed:
            raise CodirError(f"--resume: the config differs from the saved run's in {', '.join(changed)}: resume "
                             f"with the same config (see {saved}) or start a new --output_dir")
        if (out / "results.json").is_file():
            raise CodirError(f"--resume: the run in '{out}' has finished (results.json exists), there is nothing to "
                             f"continue: pass --overwrite to run it again, or choose another --output_dir")
        check_resume_checkpoint(out / "checkpoints")
        return "resume"
    if used:
        if overwrite:
            return "overwrite"
        if not (out / "config.yaml").is_file() and not (out / "checkpoints").is_dir():
            raise CodirError(f"--output_dir '{out}' is not empty and holds no codir-ds run: choose a new or empty "
                             f"--output_dir (or pass --overwrite to write the run next to its files)")
        if (out / "results.json").is_file():
            raise CodirError(f"--output_dir '{out}' already holds a finished run (results.json exists): pass "
                             f"--overwrite to run it again, or choose another --output_dir")
        raise CodirError(f"--output_dir '{out}' already holds a run: pass --resume to continue it, --overwrite to "
                         f"replace it, or choose another --output_dir")
    return "fresh"


def clear_run_dir(out: Path) -> None:
    """For --overwrite: remove what an earlier run wrote (only the files codir-ds writes)."""
    for name in ("checkpoints", "tensorboard", "export", "export_large", ARCHITECTURE, ARCHITECTURE + "_large",
                 "teacher_cache", "config.yaml", "results.json", "ds_config.json"):
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def open_run_dir(run_dir: Path, mode: str, cfg: ExperimentConfig, ds: dict, rank: int,
                 warning: Optional[str]) -> None:
    """Rank 0 creates (or clears, with --overwrite) the run directory and records the config. Collective."""
    if rank == 0:
        if warning:
            print(f"warning: {warning}", flush=True)
        if mode == "overwrite":
            clear_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if mode != "resume":
            save_config(cfg, run_dir / "config.yaml")
        (run_dir / "ds_config.json").write_text(json.dumps(ds, indent=2))
    # Every rank must see the same run directory: checkpoints are written by all ranks and
    # published by rank 0, so a node-local --output_dir would lose shards silently.
    token = [os.urandom(8).hex() if rank == 0 else None]  # not the seeded RNGs
    dist.broadcast_object_list(token, src=0)
    marker = run_dir / f".codir_shared_check_{token[0]}"
    if rank == 0:
        marker.write_text(token[0])
    dist.barrier()
    deadline = time.monotonic() + 15.0  # network filesystems may show a new file late
    while not marker.is_file() and time.monotonic() < deadline:
        time.sleep(0.25)
    from deepspeed.accelerator import get_accelerator
    ok = torch.tensor([1 if marker.is_file() else 0], device=get_accelerator().current_device_name())
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if rank == 0:
        marker.unlink(missing_ok=True)
    if not int(ok):
        raise CodirError(f"--output_dir '{run_dir}' is not on a filesystem shared by every node: put it on shared "
                         f"storage (every rank writes its checkpoint files there)")


def write_architecture(model, tokenizer, out: Path, manifest: dict) -> None:
    """A model's ``config.json``, its tokenizer and ``manifest`` (as the export manifest, no weights) in ``out``,
    written beside it and renamed into place: what export needs to rebuild a checkpoint's model."""
    from codir_ds.models.loading import EXPORT_MANIFEST
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]  # what save_pretrained records, and export builds
    config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
