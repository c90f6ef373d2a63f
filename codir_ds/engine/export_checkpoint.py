"""Export the student of any saved checkpoint of a run as a Hugging Face directory.

A finetuning run exports its best model to ``<run>/export/`` while training, a pre-training run its
last; this turns any complete checkpoint (e.g. the last one, an intermediate step, or one saved by a run
stopped before its first evaluation) into the same kind of directory, without DeepSpeed or
``torch.distributed``:

1. ``zero_to_fp32`` merges the fp32 master weights of all ranks' ZeRO 1/2/3
   partitions into one state dict (keys of the engine's
   :class:`~codir_ds.distill.heads.DistillationModule`);
2. the ``student.`` entries (the classifier; CRD projection heads are dropped) are
   loaded, strictly, into a model built from ``<run>/architecture/`` (written before training; a
   ``*ForMaskedLM`` for pre-training runs, ``*ForSequenceClassification`` for finetuning);
3. :func:`~codir_ds.models.loading.export_student` writes model, tokenizer and a
   manifest with the weights' sha256 and the checkpoint they came from.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from pathlib import Path
from typing import Optional, Union

import torch

from codir_ds.engine import checkpointing as ckpt
from codir_ds.engine.rundir import ARCHITECTURE
from codir_ds.errors import CodirError
from codir_ds.models.loading import export_student, load_tokenizer, read_manifest

STUDENT_PREFIX = "student."
# Manifest entries of <run>/export that describe the run, not the particular weights there.
_RUN_KEYS = ("task", "label_names", "method", "stage")


def _resolve_tag(ckpt_root: Path, tag: Optional[str]) -> str:
    """``tag``, checked to be a complete checkpoint, or the newest complete one."""
    available = ckpt.complete_tags(ckpt_root)
    if not available:
        raise CodirError(f"no complete checkpoint under '{ckpt_root}': the run saved none (it saves at the end and "
                         f"every training.checkpoint_every steps); train or --resume it first")
    if tag is None:
        return ckpt.latest_tag(ckpt_root)
    if tag in available:
        return tag
    listed = ", ".join(available)
    if (ckpt_root / tag).is_dir():
        raise CodirError(f"checkpoint '{ckpt_root / tag}' is incomplete (no {ckpt.COMPLETE} file: its save was "
                         f"interrupted): pick one of the complete tags: {listed}")
    raise CodirError(f"no checkpoint '{tag}' under '{ckpt_root}': available tags are {listed}")


def _check_output_dir(out: Path, run: Path, overwrite: bool) -> None:
    o, r = out.resolve(), run.resolve()
    # --overwrite replaces the whole directory: never let that be the run, a parent of it, or its checkpoints.
    if o == r or o in r.parents or o == r / "checkpoints" or r / "checkpoints" in o.parents:
        raise CodirError(f"--output_dir '{out}' would replace the run or its checkpoints: choose a new directory, "
                         f"e.g. '{run / 'export_<tag>'}'")
    check_new_output(out, overwrite)


def check_new_output(out: Path, overwrite: bool) -> None:
    """``out`` is a directory to create, or an empty one, or (``overwrite``) one to replace; never a file."""
    if out.exists() and not out.is_dir():
        raise CodirError(f"--output_dir '{out}' is a file: choose a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CodirError(f"--output_dir '{out}' already exists and is not empty: pass --overwrite to replace it, "
                         f"or choose another --output_dir")


def _step_of(tag: str) -> Optional[int]:
    """Optimizer step of a ``step_00000120``-style tag (see ``checkpoint.tag_for``)."""
    m = re.fullmatch(r"step_(\d+)", tag)
    return int(m.group(1)) if m else None


def _run_manifest(arch_dir: Path) -> dict:
    """Task / label names / method recorded by the run's own export, to carry over."""
    manifest = read_manifest(arch_dir, strict=False)
    return {k: manifest[k] for k in _RUN_KEYS if k in manifest}


def read_student_state(ckpt_root: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 student weights of checkpoint ``tag``: ``{name: tensor}`` on the CPU, ``student.`` prefix removed.

    Works for ZeRO stages 1-3 and any number of ranks: the fp32 master partitions
    of every rank are concatenated (so a bf16/fp16 run exports its full-precision
    weights, not the rounded 16-bit copies).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    chatter = io.StringIO()
    try:
        # zero_to_fp32 prints its progress on stdout/stderr; keep the launcher's output to its own lines.
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            merged = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root), tag=tag)
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, NotImplementedError) as e:
        first = str(e).splitlines()[0][:160] if str(e) else ""
        raise CodirError(f"DeepSpeed checkpoint '{ckpt_root / tag}' cannot be read ({type(e).__name__}: {first}): "
                         f"it is corrupted or not a ZeRO checkpoint; pick another --tag") from None
    student = {k[len(STUDENT_PREFIX):]: v for k, v in merged.items() if k.startswith(STUDENT_PREFIX)}
    if not student:
        raise CodirError(f"checkpoint '{ckpt_root / tag}' holds no '{STUDENT_PREFIX}*' weights: it is not a codir-ds "
                         f"checkpoint")
    return student


def _build_from_architecture(arch_dir: Path, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An fp32 model of ``arch_dir``'s config holding exactly ``state`` (strict load): a masked LM for a
    pre-training run, a sequence classifier for a finetuning run."""
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(str(arch_dir))
    masked_lm = any(a.endswith("ForMaskedLM") for a in config.architectures or [])
    auto = AutoModelForMaskedLM if masked_lm else AutoModelForSequenceClassification
    model = auto.from_config(config, dtype=torch.float32)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
        problem = ", ".join(f"{len(keys)} {what} key(s), e.g. {sorted(keys)[0]}"
                            for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
    except RuntimeError as e:  # shape mismatches
        problem = " ".join(str(e).split("\n")[-1].split())[:200]
    if problem:  # the checkpoint is of another architecture
        raise CodirError(f"the checkpoint's student does not match the {type(model).__name__} of "
                         f"'{arch_dir}/config.json' ({problem}): export from the run the checkpoint belongs to")
    return model.eval()


def _architecture_dir(run: Path, large: bool) -> Path:
    """``<run>/architecture`` (written before training); runs of older versions have only ``export/``."""
    suffix = "_large" if large else ""
    arch = run / (ARCHITECTURE + suffix)
    return arch if (arch / "config.json").is_file() else run / ("export" + suffix)


def export_from_checkpoint(run_dir: Union[str, Path], tag: Optional[str] = None,
                           output_dir: Union[str, Path, None] = None, overwrite: bool = False,
                           large: bool = False) -> Path:
    """Write checkpoint ``tag`` of run ``run_dir`` (finetuning or pre-training) as a Hugging Face directory.

    ``tag`` defaults to the newest complete checkpoint, ``output_dir`` to
    ``<run_dir>/export_<tag>``. The run's ``architecture/`` directory (``export/`` for runs of older
    versions) supplies the architecture (``config.json``), the tokenizer, and the task / label names /
    stage / method recorded in the new manifest, next to ``tag``, ``step`` and the
    checkpoint path. The directory appears atomically (written beside it, then
    renamed), so an interrupted export never leaves a half-written model.

    ``large``: a CTCD run's larger model instead (DeepSpeed tag ``<tag>/large``, architecture
    from ``<run_dir>/architecture_large``, default output ``<run_dir>/export_<tag>_large``).
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise CodirError(f"--run_dir '{run}' does not exist: pass a run directory (the --output_dir of "
                         f"launchers/finetune.py or launchers/pretrain.py)")
    ckpt_root = run / "checkpoints"
    tag = _resolve_tag(ckpt_root, tag)
    arch_dir = _architecture_dir(run, large)
    state_root, state_tag = (ckpt_root / tag, "large") if large else (ckpt_root, tag)
    if large and not (state_root / state_tag).is_dir():
        raise CodirError(f"checkpoint '{ckpt_root / tag}' holds no larger model (no large/ folder): --large exports "
                         f"the larger model of a method.name=ctcd run; drop --large for the student")
    if not (arch_dir / "config.json").is_file():
        raise CodirError(f"'{arch_dir}' has no config.json to take the student's architecture from: the run was "
                         f"written by a codir-ds version without architecture/ and has not exported yet; "
                         f"--resume the run until its first evaluation")
    out = Path(output_dir) if output_dir is not None else run / f"export_{tag}{'_large' if large else ''}"
    _check_output_dir(out, run, overwrite)

    # Everything that reads arch_dir happens before writing, so --output_dir <run>/export --overwrite is safe.
    model = _build_from_architecture(arch_dir, read_student_state(state_root, state_tag))
    tokenizer = load_tokenizer(arch_dir)
    extra = {**_run_manifest(arch_dir), "tag": tag, "step": _step_of(tag),
             "checkpoint": str((ckpt_root / tag).resolve())}

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():  # left by an interrupted export
        shutil.rmtree(tmp)
    export_student(model, tokenizer, tmp, extra)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
