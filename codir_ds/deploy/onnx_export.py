"""Export a finetuned classifier to ONNX, check it against PyTorch, and quantize it to int8.

The graph comes from ``torch.onnx.export`` (the dynamo exporter, dynamic batch and sequence
axes, weights inside the one ``model.onnx`` file); int8 is ONNX Runtime's dynamic quantization
(``onnxruntime.quantization.quantize_dynamic``: int8 weights with one scale per output channel,
activations quantized at run time).
No graph is written by hand.

Every export checks itself on real examples of the task (validation split) before it is kept:

- fp32: ONNX Runtime's logits equal PyTorch's within ``FP32_ATOL`` (absolute, on every logit);
- int8: quantization changes the logits by design, so the check is on what a user gets: the
  predicted class agrees with PyTorch's on at least ``INT8_MIN_AGREEMENT`` of the examples, or
  every logit is within ``INT8_ATOL`` of PyTorch's (then a prediction can only flip where the model
  itself is undecided, its two top logits closer than ``2 * INT8_ATOL``: an undertrained model
  whose logits all lie near the boundary); regression: the largest difference of the output is at
  most ``INT8_REGRESSION_ATOL``. A broken graph changes the logits by as much as they vary.

A failing check is one ``error:`` line and nothing is written; the output appears atomically.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from codir_ds.assets import sha256_file
from codir_ds.data.collate import ClassificationCollator
from codir_ds.data.tasks import Example, TaskData
from codir_ds.deploy.served import (ONNX_FILE, ONNX_MANIFEST, model_inputs, onnx_forward, onnx_session, require,
                                    torch_forward)
from codir_ds.engine.export_checkpoint import check_new_output
from codir_ds.errors import CodirError
from codir_ds.models.loading import load_tokenizer, read_manifest
from codir_ds.models.size import parameter_counts

FP32_ATOL = 1e-4
INT8_MIN_AGREEMENT = 0.95
INT8_ATOL = 0.05
INT8_REGRESSION_ATOL = 0.25
CHECK_EXAMPLES = 128
OPSET = 18


def int8_dir(out_dir: Path) -> Path:
    """Where ``--quantize int8`` writes the quantized model: beside ``out_dir``, suffix ``_int8``."""
    return out_dir.with_name(out_dir.name + "_int8")


def check_output_dir(out: Path, source: Path, overwrite: bool) -> None:
    """``out`` must not be (or contain) the source model, and must be new or empty unless ``overwrite``."""
    o, s = out.resolve(), source.resolve()
    if o == s or o in s.parents:
        raise CodirError(f"--output_dir '{out}' would replace the model it exports from: choose a new directory, "
                         f"e.g. '{source}_onnx'")
    check_new_output(out, overwrite)


def _export_graph(model: torch.nn.Module, batch: dict, names: list[str], path: Path) -> None:
    """``torch.onnx.export`` with dynamic batch and sequence axes; its progress chatter is kept quiet."""
    batch_dim, seq_dim = torch.export.Dim("batch"), torch.export.Dim("sequence", max=4096)
    chatter, onnx_log = io.StringIO(), logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # e.g. "torchvision is not installed. Skipping torchvision::nms"
    with contextlib.redirect_stdout(chatter), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (), str(path), kwargs={n: batch[n] for n in names}, input_names=names,
                              output_names=["logits"], dynamic_shapes={n: {0: batch_dim, 1: seq_dim} for n in names},
                              opset_version=OPSET, dynamo=True, external_data=False, optimize=True)
        except Exception as e:  # the exporter raises many types; one line with the first line of its message
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise CodirError(f"torch.onnx.export failed for {type(model).__name__} ({type(e).__name__}: {first}): "
                             f"this architecture is not exportable with torch {torch.__version__}'s exporter") from None
        finally:
            onnx_log.setLevel(level)


def _check_batches(examples: Sequence[Example], collator: ClassificationCollator, batch_size: int = 16):
    """Batches of real examples padded to their longest, so the check covers several sequence lengths."""
    return [collator(list(examples[i:i + batch_size])) for i in range(0, len(examples), batch_size)]


def _logits(forward, batches) -> torch.Tensor:
    return torch.cat([forward(b) for b in batches])


def _parity(reference: torch.Tensor, ours: torch.Tensor, precision: str, regression: bool) -> dict:
    diff = float((reference - ours).abs().max())
    out = {"examples": int(reference.shape[0]), "max_abs_logit_diff": diff}
    if not regression:
        out["prediction_agreement"] = float((reference.argmax(-1) == ours.argmax(-1)).float().mean())
    if precision == "fp32":
        out.update(passed=diff <= FP32_ATOL, rule=f"max |logit difference| <= {FP32_ATOL}")
    elif regression:
        out.update(passed=diff <= INT8_REGRESSION_ATOL, rule=f"max |output difference| <= {INT8_REGRESSION_ATOL}")
    else:
        out.update(passed=out["prediction_agreement"] >= INT8_MIN_AGREEMENT or diff <= INT8_ATOL,
                   rule=f"prediction agreement >= {INT8_MIN_AGREEMENT} or max |logit difference| <= {INT8_ATOL}")
    return out


def _write_dir(tmp: Path, model_file: Path, config, tokenizer, manifest: dict) -> None:
    tmp.mkdir(parents=True)
    if model_file != tmp / ONNX_FILE:
        shutil.move(str(model_file), tmp / ONNX_FILE)
    config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / ONNX_MANIFEST).write_text(json.dumps({**manifest, "sha256": sha256_file(tmp / ONNX_FILE)}, indent=2))


def _publish(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _quantize(src: Path, dst: Path) -> None:
    quantization = require("onnxruntime.quantization", "--quantize int8")
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's advice to pre-process goes to the root logger
    # per_channel: one scale per output channel of each weight. Per-tensor scales flipped 3.9 % of the finetuned
    # MiniLM teacher's predictions on 512 movie_snippets training sentences, per-channel 1.8 % (the 2-layer
    # student: 1.8 % and 1.0 %), at the same file size (docs/running.md).
    quantization.quantize_dynamic(str(src), str(dst), weight_type=quantization.QuantType.QInt8, per_channel=True)


def export_onnx(source: Path, out: Path, task: TaskData, max_length: int, quantize: Optional[str] = None,
                overwrite: bool = False, threads: Optional[int] = None) -> list[Path]:
    """Write ``source`` (a checked ``*ForSequenceClassification`` directory) as ONNX to ``out`` and, with
    ``quantize="int8"``, its int8 version to ``out + "_int8"``; returns the directories written.

    The check uses the first ``CHECK_EXAMPLES`` validation examples of ``task`` (the training split when
    the task has no validation examples), tokenised by the source's tokenizer to ``max_length``.
    """
    from transformers import AutoModelForSequenceClassification

    require("onnx", "--onnx")
    require("onnxscript", "--onnx (torch.onnx's exporter)")
    ort = require("onnxruntime", "--onnx (the parity check)")
    outs = [out] + ([int8_dir(out)] if quantize == "int8" else [])
    for o in outs:
        check_output_dir(o, source, overwrite)
    examples = (task.validation or task.train)[:CHECK_EXAMPLES]
    tokenizer = load_tokenizer(source)
    collator = ClassificationCollator(tokenizer, max_length, task.is_regression)
    model = AutoModelForSequenceClassification.from_pretrained(str(source), dtype=torch.float32).eval()
    names = model_inputs(model)
    batches = _check_batches(examples, collator)
    reference = _logits(torch_forward(model, torch.device("cpu")), batches)
    base = {"format": "onnx", "source": str(source.resolve()), "params": parameter_counts(model),
            "task": task.name, "label_names": task.label_names, "max_length": max_length, "opset": OPSET,
            "torch": torch.__version__, "onnxruntime": ort.__version__,
            **{k: v for k, v in read_manifest(source, strict=False).items() if k in ("method", "step", "sha256")}}
    base["source_sha256"] = base.pop("sha256", None)
    work = out.with_name(out.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    written: list[tuple[Path, Path]] = []
    try:
        example = collator(list(examples[:2]) if len(examples) >= 2 else list(examples) * 2)
        _export_graph(model, example, names, work / ONNX_FILE)
        if quantize == "int8":
            _quantize(work / ONNX_FILE, work / "int8.onnx")
        for o, file, precision in zip(outs, (work / ONNX_FILE, work / "int8.onnx"), ("fp32", "int8 (dynamic)")):
            forward = onnx_forward(onnx_session(file, threads or torch.get_num_threads()))
            parity = _parity(reference, _logits(forward, batches), precision.split()[0], task.is_regression)
            if not parity["passed"]:
                raise CodirError(f"the {precision} ONNX export of '{source}' fails its check on {parity['examples']} "
                                 f"real examples ({parity['rule']}; measured max difference "
                                 f"{parity['max_abs_logit_diff']:.3g}, agreement "
                                 f"{parity.get('prediction_agreement', float('nan')):.3f}): nothing was written; "
                                 f"keep the PyTorch model{' or drop --quantize' if precision != 'fp32' else ''}")
            tmp = o.with_name(o.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            _write_dir(tmp, file, model.config, tokenizer, {**base, "precision": precision, "parity": parity})
            written.append((tmp, o))
        for tmp, o in written:
            _publish(tmp, o)
    finally:  # a failed check leaves nothing behind
        for tmp in [work, *(t for t, _ in written)]:
            shutil.rmtree(tmp, ignore_errors=True)
    return outs
