"""Run directories: refuse to clobber an earlier run, allow an explicit resume."""
from __future__ import annotations

import shutil
import zipfile
from pathlib import Path
from typing import Optional

import yaml

from codir_ds.errors import CodirError

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
        from codir_ds.config import ExperimentConfig
        changed = _diff(_with_defaults(old, ExperimentConfig().to_dict()), cfg_dict)
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
        raise CodirError(f"--output_dir '{out}' already holds a run: pass --resume to continue it, --overwrite to "
                         f"replace it, or choose another --output_dir")
    return "fresh"


def clear_run_dir(out: Path) -> None:
    """For --overwrite: remove what an earlier run wrote (only the files codir-ds writes)."""
    for name in ("checkpoints", "tensorboard", "export", "export_large", "teacher_cache", "config.yaml", "results.json", "ds_config.json"):
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


# --------------------------------------------------------------------------- checkpoint integrity

ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes zip archives (DeepSpeed's files and codir_rank_*.pt alike)


def _archive_problem(path: Path, full: bool) -> Optional[str]:
    """Why ``path`` is not an intact torch.save archive, or None.

    Always checked: non-empty, zip magic, central directory present (a truncated file has
    none). ``full`` also verifies every member's CRC-32, which reads the whole file: torch.load
    itself does not check CRCs and would load flipped bytes as wrong numbers.
    """
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty (0 bytes)"
        with open(path, "rb") as f:
            if f.read(4) != ZIP_MAGIC:
                return "not a PyTorch archive (it does not start like one)"
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"truncated (member '{info.filename}' runs past the end of the file)"
            if full:
                bad = z.testzip()
                if bad is not None:
                    return f"corrupted (CRC mismatch in member '{bad}')"
    except zipfile.BadZipFile as e:
        return f"truncated or corrupted ({e})"
    except (OSError, EOFError, ValueError, RuntimeError) as e:  # zlib/struct errors while reading members
        return f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def damaged_checkpoint_fix(ckpt_root: Path, tag: str) -> str:
    """The fix for a damaged checkpoint ``tag``: fall back to the previous complete one, or start over."""
    from codir_ds.engine import checkpoint as ckpt

    earlier = [t for t in ckpt.complete_tags(ckpt_root) if t < tag]
    if earlier:
        return f"delete '{ckpt_root / tag}' to resume from the previous checkpoint '{earlier[-1]}'"
    return "no earlier checkpoint is left: start the run again with --overwrite"


def check_resume_checkpoint(ckpt_root: Path) -> str:
    """Before anything is started on --resume: the checkpoint to load exists and its files are intact.

    Returns its tag. Every rank checks the same files and so reaches the same verdict without
    communicating. The per-rank codir files and DeepSpeed's model states, which every rank
    loads anyway, are CRC-checked in full; the other DeepSpeed files (optimizer partitions)
    are checked for truncation only (reading the central directory), to keep the cost small.
    Nothing is modified: a damaged checkpoint is reported, never deleted.
    """
    from codir_ds.engine import checkpoint as ckpt

    tag = ckpt.latest_tag(ckpt_root)
    if tag is None:
        raise CodirError(f"--resume: no complete checkpoint under '{ckpt_root}': start a new run with --overwrite")
    tag_dir = ckpt_root / tag
    fix = damaged_checkpoint_fix(ckpt_root, tag)
    files = sorted(tag_dir.rglob("*.pt"))
    if not any(f.name.startswith("codir_rank_") for f in files):
        raise CodirError(f"--resume: checkpoint '{tag_dir}' has no codir_rank_*.pt files (incomplete, or not a "
                         f"codir-ds checkpoint): {fix}")
    if not any(f.name.endswith("model_states.pt") for f in files):
        raise CodirError(f"--resume: checkpoint '{tag_dir}' has no DeepSpeed *model_states.pt file (incomplete, or "
                         f"not a DeepSpeed checkpoint): {fix}")
    for f in files:
        problem = _archive_problem(f, full=f.name.startswith("codir_rank_") or f.name.endswith("model_states.pt"))
        if problem:
            raise CodirError(f"--resume: checkpoint file '{f}' is {problem}: {fix}")
    return tag
