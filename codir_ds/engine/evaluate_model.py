"""Evaluate an exported Hugging Face classifier on a task split, in one process.

This is what ``launchers/evaluate.py`` runs: no DeepSpeed engine and no
``torch.distributed``; the model is a plain ``*ForSequenceClassification``
directory (a run's ``export/``, ``launchers/export.py``'s output, or any
directory written by ``save_pretrained``). Batching, prediction and metrics are
the ones the trainer uses (:mod:`codir_ds.engine.evaluation`), so the numbers
match the run's ``results.json`` for the same model and config.
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Union

import torch

from codir_ds.config import ExperimentConfig
from codir_ds.data.collate import ClassificationCollator
from codir_ds.data.tasks import load_task
from codir_ds.engine.evaluation import evaluate
from codir_ds.errors import CodirError
from codir_ds.models.loading import load_tokenizer, model_dir, read_manifest, verify_weights

SPLITS = ("validation", "train")


def _check_classifier(config, num_labels: int, task_name: str, path: Path) -> None:
    """The directory must hold a trained classification head of the task's size.

    ``from_pretrained`` would otherwise silently add a randomly initialised head to a
    bare encoder, or resize nothing and fail later with a shape error.
    """
    archs = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise CodirError(f"--model '{path}' is not a sequence classifier (architectures={archs}): pass a finetuned "
                         f"*ForSequenceClassification directory such as a run's export/")
    if config.num_labels != num_labels:
        raise CodirError(f"--model '{path}' has a {config.num_labels}-way head but task '{task_name}' needs "
                         f"{num_labels} output(s) (1 for regression): evaluate it with the config of the task it was "
                         f"finetuned on (see data.task)")


def _forward_fn(model: torch.nn.Module):
    """``forward(batch) -> logits [B, C]`` for :func:`evaluate`.

    Segment ids are passed only to models whose ``forward`` takes them (DistilBERT's
    does not); BERT-style models get the same inputs as during training.
    """
    takes_segments = "token_type_ids" in inspect.signature(model.forward).parameters

    def forward(batch: dict) -> torch.Tensor:
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if takes_segments:
            kwargs["token_type_ids"] = batch.get("token_type_ids")
        return model(**kwargs).logits

    return forward


def evaluate_model_dir(model_dir_path: Union[str, Path], cfg: ExperimentConfig, split: str = "validation",
                       batch_size: int = 64) -> dict[str, float]:
    """Metrics of the classifier in ``model_dir_path`` on ``split`` of ``cfg.data``'s task.

    Checks, before any forward pass: the weights' sha256 against the directory's
    codir-ds manifest (when it has one), that the model is a sequence classifier, and
    that its head has ``task.num_labels`` outputs. The model runs in fp32, in
    ``eval()`` mode, on the GPU when there is one. Inputs are tokenised with the
    model directory's own tokenizer, truncated to ``cfg.data.max_length`` tokens, in
    batches of ``batch_size`` examples.

    Returns ``{metric: value}`` for ``task.metric_names`` (e.g. ``accuracy`` and
    ``f1`` in [0, 1]; ``pearson``/``spearman`` for regression), the main metric first.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if split not in SPLITS:
        raise CodirError(f"--split must be one of {', '.join(SPLITS)}; got {split!r}")
    if batch_size < 1:
        raise CodirError(f"--batch_size must be >= 1; got {batch_size}")
    path = model_dir(str(model_dir_path), "--model")
    task = load_task(cfg.data)
    examples = task.validation if split == "validation" else task.train
    if not examples:
        raise CodirError(f"the {split} split of task '{task.name}' is empty: pick the other --split or check data.*")
    _check_classifier(AutoConfig.from_pretrained(str(path)), task.num_labels, task.name, path)
    verify_weights(path, None, "--model")
    # verify_weights has already rejected an unreadable manifest that matters
    trained_on = read_manifest(path, strict=False).get("task")
    if trained_on is not None and trained_on != task.name:
        # Legitimate for transfer experiments with the same label set, so only a warning.
        print(f"warning: --model '{path}' was finetuned on task '{trained_on}', evaluating on '{task.name}'",
              file=sys.stderr, flush=True)

    tokenizer = load_tokenizer(path)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()  # eval(): no dropout, so the result is deterministic
    collator = ClassificationCollator(tokenizer, cfg.data.max_length, task.is_regression)
    return evaluate(_forward_fn(model), examples, collator, batch_size, device, task.metric_names)
