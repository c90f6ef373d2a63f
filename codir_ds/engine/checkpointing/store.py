"""Writing, publishing, pruning and loading checkpoints: tag and rank-file names, RNG states, atomic
writes, ``COMPLETE``/``latest``. ``UNIVERSAL_SUFFIX`` lives here because finding complete tags and pruning
must tell universal conversions apart (:mod:`.universal` converts).

The per-rank files (``codir_rank_*.pt``) hold plain data only (:func:`plain_data`) and are loaded with
``torch.load(weights_only=True)``: a file planted in a run directory cannot run code on a rank that resumes.
"""
from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from codir_ds.engine.faults import maybe_fault
from codir_ds.errors import CodirError


LATEST = "latest"
COMPLETE = "COMPLETE"
UNIVERSAL_SUFFIX = "_universal"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"codir_rank_{rank:05d}.pt"


def rng_state() -> dict:
    """This process's RNG states as plain data: NumPy's ``("MT19937", keys, pos, has_gauss, cached_gaussian)``
    keeps its 624 keys as an int64 tensor (not an ndarray), so the rank file loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_PLAIN_LEAVES = (torch.Tensor, torch.Size, bool, int, float, str, bytes, type(None), torch.dtype, torch.device)


def plain_data(obj, where: str = "rank state"):
    """``obj`` as the plain data ``torch.load(weights_only=True)`` accepts: tensors, numbers, str, bytes, None,
    dtypes and devices in dicts, lists and tuples. NumPy arrays become tensors (uint16/uint32 as int64), NumPy
    scalars Python numbers, dict subclasses and named tuples dicts and tuples. Anything else raises ``TypeError``
    (a state_dict that is not plain data would make the checkpoint unloadable)."""
    if isinstance(obj, np.ndarray):  # uint16/uint32 widened: torch supports few operations on them
        return torch.from_numpy(obj.astype(np.int64) if obj.dtype in (np.uint16, np.uint32) else obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, _PLAIN_LEAVES):
        return obj
    if isinstance(obj, dict):
        return {plain_data(k, where): plain_data(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [plain_data(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}: a codir-ds rank file holds "
                    f"plain data only (tensors, numbers, str, None in dicts, lists and tuples)")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_checkpoint(engine, ckpt_root: Path, step: int, client_state: dict, rank_state: dict, rank: int,
                    keep: int, extra_engines: Optional[dict] = None) -> Path:
    """Collective: every rank calls it. Returns the tag folder.

    ``extra_engines`` (``{name: engine}``, CTCD's second model) are saved as DeepSpeed tags
    ``<tag folder>/<name>/``, so they are published, pruned and resumed with the main engine.
    """
    tag = tag_for(step)
    tag_dir = ckpt_root / tag
    if rank == 0 and tag_dir.exists():  # a half-written save of this step from a crashed run
        shutil.rmtree(tag_dir)
    _barrier()
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state=client_state, save_latest=False)
    for name, other in (extra_engines or {}).items():
        other.save_checkpoint(str(tag_dir), tag=name, save_latest=False)
    _atomic_torch_save(plain_data(rank_state), rank_file(tag_dir, rank))
    maybe_fault("save", step, rank)
    _barrier()
    if rank == 0:
        _atomic_write_text(tag_dir / COMPLETE, "ok\n")
        _atomic_write_text(ckpt_root / LATEST, tag + "\n")
        prune(ckpt_root, keep)
    _barrier()
    return tag_dir


def complete_tags(ckpt_root: Path) -> list[str]:
    """Tags of the checkpoints that finished saving (universal conversions excluded), oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p.name for p in ckpt_root.iterdir()
                  if p.is_dir() and (p / COMPLETE).is_file() and not p.name.endswith(UNIVERSAL_SUFFIX))


def prune(ckpt_root: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` complete checkpoints, and stale incomplete ones."""
    tags = complete_tags(ckpt_root)
    newest = tags[-1] if tags else None
    for old in tags[:-keep] if keep > 0 else []:
        (ckpt_root / old / COMPLETE).unlink(missing_ok=True)  # never a half-deleted "complete" checkpoint
        shutil.rmtree(ckpt_root / old, ignore_errors=True)
    tags = set(complete_tags(ckpt_root))
    for p in ckpt_root.iterdir():
        if not (p.is_dir() and p.name.startswith("step_") and newest and p.name < newest):
            continue
        base = p.name.split(UNIVERSAL_SUFFIX)[0]
        if p.name not in tags and base not in tags:  # incomplete saves and conversions of pruned tags
            shutil.rmtree(p, ignore_errors=True)


def latest_tag(ckpt_root: Path) -> Optional[str]:
    """The newest checkpoint that finished saving, or None."""
    f = ckpt_root / LATEST
    if f.is_file():
        tag = f.read_text().strip()
        if (ckpt_root / tag / COMPLETE).is_file():
            return tag
    tags = complete_tags(ckpt_root)
    return tags[-1] if tags else None


def damaged_checkpoint_fix(ckpt_root: Path, tag: str) -> str:
    """The fix for a damaged checkpoint ``tag``: fall back to the previous complete one, or start over."""
    earlier = [t for t in complete_tags(ckpt_root) if t < tag]
    if earlier:
        return f"delete '{ckpt_root / tag}' to resume from the previous checkpoint '{earlier[-1]}'"
    return "no earlier checkpoint is left: start the run again with --overwrite"


def _fix(tag_dir: Path) -> str:
    if tag_dir.parent.name.startswith("step_"):  # an extra engine's tag inside a step folder
        tag_dir = tag_dir.parent
    base = tag_dir.name.split(UNIVERSAL_SUFFIX)[0]
    return damaged_checkpoint_fix(tag_dir.parent, base)


def _unsafe_globals(f: Path) -> list[str]:
    """The pickled classes/functions in ``f`` that ``weights_only`` loading refuses, found by reading the
    pickle's opcodes (nothing is unpickled); [] when there are none or the file cannot be scanned."""
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
    try:
        return sorted(scan(str(f))) if scan is not None else []
    except Exception:  # not a readable archive: torch.load reports it
        return []


def _unsafe_file_error(f: Path, tag_dir: Path, names: list[str]) -> CodirError:
    """One line for a rank file holding objects other than plain data (never unpickled)."""
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    held = f" ({shown})" if shown else ""
    if names and all(n.startswith("numpy.") for n in names):
        return CodirError(f"checkpoint file '{f}' holds pickled NumPy objects{held}, which loading with "
                          f"weights_only=True refuses (an earlier codir-ds version pickled the NumPy RNG state): "
                          f"resume from a checkpoint written by this version, finish the run with the version that "
                          f"wrote it, or start again with --overwrite")
    return CodirError(f"checkpoint file '{f}' holds objects other than a codir-ds checkpoint's plain data{held}, "
                      f"refused for safety since loading it could run code; the file must come from a trusted "
                      f"codir-ds run: {_fix(tag_dir)}")


def check_rank_files(tag_dir: Path) -> None:
    """Refuse, before anything is started, rank files that ``weights_only`` loading would refuse (their
    pickles are scanned, not loaded)."""
    for f in sorted(tag_dir.glob("codir_rank_*.pt")):
        names = _unsafe_globals(f)
        if names:
            raise _unsafe_file_error(f, tag_dir, names)


def _load_rank_file(f: Path, tag_dir: Path) -> dict:
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        names = _unsafe_globals(f)
        if names or (isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower()):
            raise _unsafe_file_error(f, tag_dir, names) from None
        raise CodirError(f"checkpoint file '{f}' cannot be read ({type(e).__name__}): it is truncated or "
                         f"corrupted; {_fix(tag_dir)}") from None  # truncated or corrupted pickle/zip


def load_rank_states(tag_dir: Path, world_size: int) -> list[dict]:
    """Every rank's state file of a checkpoint (all are needed to re-shard the bank and sampler), loaded with
    ``weights_only=True``: a file holding anything but plain data is refused, never unpickled."""
    files = sorted(tag_dir.glob("codir_rank_*.pt"))
    if not files:
        raise CodirError(f"checkpoint '{tag_dir}' has no codir_rank_*.pt files: it is incomplete or not a codir-ds "
                         f"checkpoint; remove it or resume from another")
    states = [_load_rank_file(f, tag_dir) for f in files]
    saved_world = states[0].get("world_size")
    if len(states) != saved_world:
        raise CodirError(f"checkpoint '{tag_dir}' has {len(states)} rank files but was written by {saved_world} "
                         f"ranks: it is incomplete; {_fix(tag_dir)}")
    return states


def load_checkpoint(engine, ckpt_root: Path, tag: str) -> dict:
    """Load DeepSpeed state for ``tag``; returns its client state."""
    try:
        path, client_state = engine.load_checkpoint(str(ckpt_root), tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as e:
        detail = str(e).splitlines()[0] if str(e) else ""
        detail = detail if len(detail) <= 160 else detail[:160].rsplit(" ", 1)[0] + " ..."
        raise CodirError(f"DeepSpeed checkpoint '{ckpt_root / tag}' cannot be loaded ({type(e).__name__}: "
                         f"{detail}): {_fix(ckpt_root / tag)}") from None
    if path is None:
        raise CodirError(f"DeepSpeed checkpoint '{ckpt_root / tag}' cannot be loaded: {_fix(ckpt_root / tag)}")
    return client_state or {}
