"""A classifier as it is served: a PyTorch (Hugging Face) directory or an ONNX directory, behind one forward.

Both kinds are checked against the task before any work (:func:`check_model_dir`): a classifier
head of the task's size, the task's label names, position embeddings that cover
``data.max_length``, every file an ONNX directory needs, ONNX Runtime installed, the weights'
sha256 against the directory's manifest. :func:`open_model` then loads it, and ``forward(batch) ->
logits [B, C]`` runs it on a batch of :class:`~codir_ds.data.collate.ClassificationCollator`.

An ONNX directory is what ``launchers/export.py --onnx`` writes: ``model.onnx`` (one file, weights
inside), ``config.json``, the tokenizer, and ``codir_onnx.json`` (precision, the source model's
parameter counts and sha256, the parity check's result).
"""
from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from codir_ds.assets import sha256_file
from codir_ds.data.tasks import TaskData
from codir_ds.errors import CodirError
from codir_ds.models.loading import load_tokenizer, model_dir, position_limit, read_manifest, verify_weights
from codir_ds.models.size import disk_bytes, parameter_counts

ONNX_FILE = "model.onnx"
ONNX_MANIFEST = "codir_onnx.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")
# what to install for ONNX export and inference (pinned in constraints.txt)
ONNX_INSTALL = "pip install -c constraints.txt onnx onnxruntime onnxscript (or pip install -e '.[deploy]')"


def is_onnx_dir(path: Path) -> bool:
    """An ONNX model directory (``launchers/export.py --onnx``'s output) rather than a PyTorch one."""
    return (path / ONNX_FILE).is_file() or (path / ONNX_MANIFEST).is_file()


def require(module: str, what: str):
    """Import ``module`` or stop with one line saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CodirError(f"{what} needs the Python package '{module}', which is not installed: {ONNX_INSTALL}") from None


def _default_label(name: str, i: int) -> bool:
    return bool(re.fullmatch(rf"LABEL_{i}", str(name)))


def _check_labels(config, task: TaskData, path: Path, what: str) -> None:
    archs = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise CodirError(f"{what} '{path}' is not a sequence classifier (architectures={archs}): pass a finetuned "
                         f"*ForSequenceClassification directory such as a run's export/ (or its ONNX export)")
    if config.num_labels != task.num_labels:
        raise CodirError(f"{what} '{path}' has a {config.num_labels}-way head but task '{task.name}' needs "
                         f"{task.num_labels} output(s) (1 for regression): evaluate it with the config of the task it "
                         f"was finetuned on (see data.task)")
    names = [config.id2label.get(i, config.id2label.get(str(i))) for i in range(config.num_labels)]
    if task.is_regression or all(_default_label(n, i) for i, n in enumerate(names)):
        return  # no label names recorded (LABEL_0, ...): nothing to compare
    if [str(n) for n in names] != [str(n) for n in task.label_names]:
        raise CodirError(f"{what} '{path}' predicts labels {names} but task '{task.name}' has {task.label_names}: "
                         f"evaluate it with the config of the task it was finetuned on (data.task, "
                         f"data.label_column)")


def _check_onnx_files(path: Path, what: str) -> dict:
    missing = [f for f in (ONNX_FILE, ONNX_MANIFEST, "config.json") if not (path / f).is_file()]
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        missing.append("a tokenizer (tokenizer.json or vocab.txt)")
    if missing:
        raise CodirError(f"ONNX directory {what} '{path}' lacks {', '.join(missing)}: re-export it with "
                         f"`python launchers/export.py --onnx --model <classifier dir> --output_dir {path} "
                         f"--overwrite`")
    try:
        manifest = json.loads((path / ONNX_MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or "sha256" not in manifest:
        raise CodirError(f"'{path / ONNX_MANIFEST}' is not a codir-ds ONNX manifest: re-export the directory with "
                         f"launchers/export.py --onnx")
    return manifest


def check_model_dir(spec: str, task: TaskData, max_length: int, what: str = "--model") -> Path:
    """Every check of a served model that needs no forward pass; returns its directory. Reads config and
    manifest, hashes the weights; loads no model."""
    from transformers import AutoConfig

    path = Path(spec)
    if path.is_dir() and is_onnx_dir(path):
        manifest = _check_onnx_files(path, what)
        require("onnxruntime", f"{what} '{path}' (an ONNX model)")
    else:
        path = model_dir(spec, what)
        manifest = None
    config = AutoConfig.from_pretrained(str(path))
    _check_labels(config, task, path, what)
    limit = position_limit(config)
    if max_length > limit:
        raise CodirError(f"{what} '{path}' has {limit} positions, fewer than data.max_length {max_length}: set "
                         f"data.max_length <= {limit} (--set data.max_length={limit})")
    if manifest is not None:
        digest = sha256_file(path / ONNX_FILE)
        if digest != manifest["sha256"]:
            raise CodirError(f"'{path / ONNX_FILE}' fails its checksum (sha256 {digest[:12]}…, {ONNX_MANIFEST} says "
                             f"{manifest['sha256'][:12]}…): it was changed after export; re-export it")
    else:
        verify_weights(path, None, what)
    trained_on = read_manifest(path, strict=False).get("task") if manifest is None else manifest.get("task")
    if trained_on is not None and trained_on != task.name:
        print(f"warning: {what} '{path}' was finetuned on task '{trained_on}', evaluating on '{task.name}'",
              file=sys.stderr, flush=True)
    return path


@dataclass
class ServedModel:
    """A loaded classifier: ``forward(batch) -> logits [B, C]`` (fp32, on the CPU for ONNX Runtime)."""
    path: Path
    backend: str                    # "pytorch" or "onnxruntime"
    precision: str                  # "fp32" or "int8 (dynamic)"
    device: str                     # "cpu" / "cuda"
    params: dict                    # parameter_counts of the (source) model
    disk_bytes: int
    tokenizer: object
    forward: Callable[[dict], torch.Tensor] = field(repr=False)

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}"


INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(model: torch.nn.Module) -> list[str]:
    """The inputs of :data:`INPUTS` that ``model.forward`` takes (DistilBERT-style models take no segment ids)."""
    params = inspect.signature(model.forward).parameters
    return [n for n in INPUTS if n in params]


def torch_forward(model: torch.nn.Module, device: torch.device) -> Callable[[dict], torch.Tensor]:
    """``forward(batch) -> fp32 logits`` of a PyTorch classifier, with the inputs it takes, without autograd."""
    names = model_inputs(model)

    @torch.inference_mode()
    def forward(batch: dict) -> torch.Tensor:
        return model(**{n: batch[n].to(device) for n in names if n in batch}).logits.float()

    return forward


def onnx_session(path: Path, threads: int):
    """An ONNX Runtime CPU session of ``path`` with ``threads`` intra-op threads (one inter-op thread)."""
    ort = require("onnxruntime", f"'{path}'")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_forward(session) -> Callable[[dict], torch.Tensor]:
    """``forward(batch)`` over an ONNX Runtime session: the inputs it declares, as int64 arrays."""
    names = [i.name for i in session.get_inputs()]

    def forward(batch: dict) -> torch.Tensor:
        feed = {n: batch[n].cpu().numpy().astype("int64") for n in names}
        return torch.from_numpy(session.run(None, feed)[0]).float()

    return forward


def open_model(path: Path, device: str = "cpu", threads: Optional[int] = None) -> ServedModel:
    """Load a directory that :func:`check_model_dir` accepted. PyTorch models run in fp32, ``eval()`` mode,
    on ``device``; ONNX models on ONNX Runtime's CPU provider with ``threads`` intra-op threads."""
    from transformers import AutoModelForSequenceClassification

    threads = threads or torch.get_num_threads()
    tokenizer = load_tokenizer(path)
    if is_onnx_dir(path):
        manifest = json.loads((path / ONNX_MANIFEST).read_text())
        return ServedModel(path, "onnxruntime", manifest.get("precision", "fp32"), "cpu", manifest["params"],
                           disk_bytes(path), tokenizer, onnx_forward(onnx_session(path / ONNX_FILE, threads)))
    model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32)
    model.to(torch.device(device)).eval()
    return ServedModel(path, "pytorch", "fp32", device, parameter_counts(model), disk_bytes(path), tokenizer,
                       torch_forward(model, torch.device(device)))
