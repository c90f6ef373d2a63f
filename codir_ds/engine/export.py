"""The collective export of the trained student as a Hugging Face directory."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from codir_ds.models.loading import export_student


def export_engine_student(engine, tokenizer, out_dir: Path, rank: int, extra: dict) -> None:
    """Collective under ZeRO-3 (parameters are gathered); rank 0 writes the HF directory atomically."""
    import deepspeed
    student = engine.module.student
    with deepspeed.zero.GatheredParameters(list(student.parameters()), modifier_rank=None):
        if rank == 0:
            tmp = out_dir.with_name(out_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            export_student(student, tokenizer, tmp, extra)
            shutil.rmtree(out_dir, ignore_errors=True)
            os.replace(tmp, out_dir)
