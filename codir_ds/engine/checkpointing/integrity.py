"""Checkpoint integrity before a resume: the checkpoint to load exists and its files are intact archives;
damage is reported with its fix, never repaired or deleted."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Optional

from codir_ds.engine.checkpointing.store import damaged_checkpoint_fix, latest_tag
from codir_ds.errors import CodirError


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


def check_resume_checkpoint(ckpt_root: Path) -> str:
    """Before anything is started on --resume: the checkpoint to load exists and its files are intact.

    Returns its tag. Every rank checks the same files and so reaches the same verdict without
    communicating. The per-rank codir files and DeepSpeed's model states, which every rank
    loads anyway, are CRC-checked in full; the other DeepSpeed files (optimizer partitions)
    are checked for truncation only (reading the central directory), to keep the cost small.
    Nothing is modified: a damaged checkpoint is reported, never deleted.
    """
    tag = latest_tag(ckpt_root)
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
