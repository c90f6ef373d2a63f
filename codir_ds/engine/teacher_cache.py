"""Teacher-output cache for finetuning: later epochs read the frozen teacher's outputs from disk.

In finetuning the teacher is frozen, in eval mode (no dropout) and sees the same tokens of an
example in every epoch, so its logits and pooled layer features are a function of the example
id. With ``training.teacher_cache`` each rank keeps, in memory-mapped files under
``<run>/teacher_cache/``, the outputs of the examples it has trained on: a micro-batch whose
examples are all cached skips the teacher forward; any miss runs the teacher and fills the
rows. Files per rank (``N`` = training examples)::

    rank_00000.logits.f32     [N, C]        float32, teacher logits
    rank_00000.features.f32   [N, Lt*d_t]   float32, pooled features (codir only)
    rank_00000.filled.u8      [N]           1 once the row holds the teacher's outputs
    meta.json                 what the rows depend on (teacher checksum, layers, pooling, max_length)

A rank caches the ids it trains on: in the default sampling mode those are the ids it owns
(id % world), so the rows are disjoint across ranks; in ``training.deterministic`` mode every
rank may meet every id, and rows are duplicated. Cached and uncached runs agree up to
floating-point differences from padding (a batch is padded to its longest example; outputs at
real tokens depend on the padding only through rounding).

Only the methods whose teacher outputs are per-example vectors use it (``kd``, ``codir``);
intermediate-layer methods need whole hidden-state sequences and always run the teacher.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from codir_ds.distill.components import Component
from codir_ds.distill.methods.base import TeacherOutput

CACHE_DIR = "teacher_cache"


class TeacherCache(Component):
    """This rank's memory-mapped teacher outputs, keyed by training-example id (a component: flushed before every
    checkpoint, its hit and miss counts in results.json; the recipe's teacher step calls ``lookup`` / ``store``)."""
    name = "teacher_cache"
    section = "teacher_cache"

    def __init__(self, root: Path, rank: int, num_examples: int, logit_dim: int, feature_dim: Optional[int],
                 meta: dict):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        meta_path = self.root / "meta.json"
        stale = meta_path.is_file() and json.loads(meta_path.read_text()) != meta
        prefix = self.root / f"rank_{rank:05d}"
        if stale:  # another teacher or input setting: start empty (this rank's files only)
            for suffix in (".logits.f32", ".features.f32", ".filled.u8"):
                prefix.with_name(prefix.name + suffix).unlink(missing_ok=True)
        self.num_examples = num_examples
        self.logits = self._open(prefix, ".logits.f32", np.float32, (num_examples, logit_dim))
        self.features = (self._open(prefix, ".features.f32", np.float32, (num_examples, feature_dim))
                         if feature_dim else None)
        self.filled = self._open(prefix, ".filled.u8", np.uint8, (num_examples,))
        if rank == 0:
            tmp = meta_path.with_name("meta.json.tmp")
            tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
            tmp.replace(meta_path)
        self.hits = self.misses = 0

    @staticmethod
    def _open(prefix: Path, suffix: str, dtype, shape) -> np.memmap:
        path = prefix.with_name(prefix.name + suffix)
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if not path.is_file() or path.stat().st_size != nbytes:
            with open(path, "wb") as f:  # sparse: untouched rows take no disk space
                f.truncate(nbytes)
        return np.memmap(path, dtype=dtype, mode="r+", shape=shape)

    def lookup(self, ids: torch.Tensor, device) -> Optional[TeacherOutput]:
        """The cached outputs of ``ids`` (a micro-batch), or None unless every one is cached."""
        idx = ids.numpy()
        if not self.filled[idx].all():
            self.misses += 1
            return None
        self.hits += 1
        logits = torch.from_numpy(np.ascontiguousarray(self.logits[idx])).to(device, non_blocking=True)
        feats = (torch.from_numpy(np.ascontiguousarray(self.features[idx])).to(device, non_blocking=True)
                 if self.features is not None else None)
        return TeacherOutput(logits=logits, features=feats)

    def store(self, ids: torch.Tensor, out: TeacherOutput) -> None:
        """Write a teacher forward's outputs for ``ids`` (a device-to-host copy)."""
        idx = ids.numpy()
        self.logits[idx] = out.logits.detach().float().cpu().numpy()
        if self.features is not None:
            self.features[idx] = out.features.detach().float().cpu().numpy()
        self.filled[idx] = 1

    def flush(self) -> None:
        for arr in (self.logits, self.features, self.filled):
            if arr is not None:
                arr.flush()

    def before_save(self) -> None:
        self.flush()

    def results(self) -> dict:
        """This rank's (rank 0's in results.json) counts: micro-batches served from the cache, disk used."""
        return {"teacher_cache": {"hit_batches": self.hits, "miss_batches": self.misses,
                                  "disk_bytes_rank0": self.disk_bytes()}}

    def disk_bytes(self) -> int:
        """Bytes this rank's files occupy on disk (sparse files: the rows written so far)."""
        total = 0
        for arr in (self.logits, self.features, self.filled):
            if arr is not None:
                total += Path(arr.filename).stat().st_blocks * 512
        return total
