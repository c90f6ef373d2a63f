"""The pipelines' deployment step: ONNX exports of finetuned models, then the side-by-side report against the
teacher (what ``scripts/demo.sh`` prints after its table and ``bench/deploy_cost.py`` records).

The same code as ``launchers/export.py --onnx`` and ``launchers/evaluate.py``; an ONNX export is reused when
it was made from the same weights (its ``codir_onnx.json`` holds the source's sha256), so a re-run of a
pipeline measures again without exporting again.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from codir_ds.data.tasks import TaskData
from codir_ds.deploy.onnx_export import export_onnx, int8_dir
from codir_ds.deploy.report import LatencySpec, build_report
from codir_ds.deploy.served import ONNX_MANIFEST
from codir_ds.models.loading import read_manifest


def _made_from(onnx_dir: Path, source: Path) -> bool:
    try:
        made = json.loads((onnx_dir / ONNX_MANIFEST).read_text()).get("source_sha256")
    except (OSError, ValueError):
        return False
    return made is not None and made == read_manifest(source, strict=False).get("sha256")


def onnx_exports(source: Path, out: Path, task: TaskData, max_length: int, progress=print) -> tuple[Path, Path]:
    """``(fp32 dir, int8 dir)`` of ``source`` under ``out`` (``out`` and ``out_int8``), exported unless both
    were already made from these weights."""
    if not (_made_from(out, source) and _made_from(int8_dir(out), source)):
        progress(f"[deploy] exporting {source} to ONNX (fp32, int8) and checking it against PyTorch")
        export_onnx(source, out, task, max_length, quantize="int8", overwrite=True)
    return out, int8_dir(out)


def cost_report(models: Sequence[tuple[str, Path]], task: TaskData, max_length: int, work_dir: Path,
                batch_size: int = 128, onnx_fp32: bool = False, spec: LatencySpec = LatencySpec(),
                threads: Optional[int] = None, progress=print) -> dict:
    """Report ``models`` (``(name, PyTorch classifier dir)``, the reference first) in PyTorch fp32 and ONNX
    Runtime int8 (and ONNX fp32 with ``onnx_fp32``) on the CPU, on the task's validation split. The ONNX
    exports go to ``work_dir/<name>_onnx[_int8]``."""
    specs = []
    for name, source in models:
        fp32, int8 = onnx_exports(source, work_dir / f"{name}_onnx", task, max_length, progress)
        specs += [f"{name}={source}"] + ([f"{name} onnx={fp32}"] if onnx_fp32 else []) + [f"{name} int8={int8}"]
    return build_report(specs, task, "validation", max_length, batch_size, spec, "cpu", threads, progress)
