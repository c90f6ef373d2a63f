"""Run directories: refuse to clobber an earlier run, allow an explicit resume."""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from codir_ds.errors import CodirError

# Keys that may change between a run and its resumption.
RESUMABLE_CHANGES = {("training", "stop_at_step"), ("logging", "progress_bar"), ("logging", "log_every"),
                     ("logging", "tensorboard")}


def _diff(old: dict, new: dict, prefix=()) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        path = prefix + (key,)
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
        changed = _diff(yaml.safe_load(saved.read_text()) or {}, cfg_dict)
        if changed:
            raise CodirError(f"--resume: the config differs from the saved run's in {', '.join(changed)}: resume "
                             f"with the same config (see {saved}) or start a new --output_dir")
        return "resume"
    if used:
        if overwrite:
            return "overwrite"
        raise CodirError(f"--output_dir '{out}' already holds a run: pass --resume to continue it, --overwrite to "
                         f"replace it, or choose another --output_dir")
    return "fresh"


def clear_run_dir(out: Path) -> None:
    """For --overwrite: remove what an earlier run wrote (only the files codir-ds writes)."""
    for name in ("checkpoints", "tensorboard", "export", "config.yaml", "results.json", "ds_config.json"):
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
