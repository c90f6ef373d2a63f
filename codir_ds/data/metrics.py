"""Evaluation metrics of the finetuning tasks (GLUE conventions), in numpy/scipy.

``compute_metrics(metric_names, preds, labels)`` returns ``{name: float}`` for
the names a :class:`~codir_ds.data.tasks.TaskData` lists in ``metric_names``.

Undefined values are reported as 0.0 rather than NaN (F1 with no positives in
predictions or labels, MCC or a correlation when one side is constant): such
a model carries no signal, and a NaN would silently break best-checkpoint
selection, where every comparison with NaN is False.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from codir_ds.errors import CodirError


def _confusion(preds: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Confusion matrix ``C[true, pred]`` over the classes seen in labels or preds, and those classes."""
    classes, inverse = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    n = len(labels)
    true_idx, pred_idx = inverse[:n], inverse[n:]
    cm = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(cm, (true_idx, pred_idx), 1.0)
    return cm, classes


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of exact matches."""
    return float(np.mean(preds == labels))


def f1(preds: np.ndarray, labels: np.ndarray) -> float:
    """F1 of class 1 when all classes are in {0, 1} (GLUE's MRPC/QQP F1); macro F1 otherwise.

    Macro F1 averages over the classes present in labels or preds (as sklearn does).
    """
    if np.all(np.isin(labels, (0, 1))) and np.all(np.isin(preds, (0, 1))):
        tp = float(np.sum((preds == 1) & (labels == 1)))
        fp = float(np.sum((preds == 1) & (labels == 0)))
        fn = float(np.sum((preds == 0) & (labels == 1)))
        return _f1(tp, fp, fn)
    cm, _ = _confusion(preds, labels)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    return float(np.mean([_f1(a, b, c) for a, b, c in zip(tp, fp, fn)]))


def _f1(tp: float, fp: float, fn: float) -> float:
    # 2PR/(P+R) simplified; 0 when the class never occurs in labels or preds.
    denom = 2.0 * tp + fp + fn
    return 2.0 * tp / denom if denom > 0 else 0.0


def mcc(preds: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation coefficient (multi-class form of Gorodkin 2004; the usual one for 2 classes)."""
    cm, _ = _confusion(preds, labels)
    t = cm.sum(axis=1)  # times each class truly occurred
    p = cm.sum(axis=0)  # times each class was predicted
    c = np.trace(cm)
    s = cm.sum()
    cov_tp = c * s - t @ p
    cov_pp = s * s - p @ p
    cov_tt = s * s - t @ t
    denom = np.sqrt(cov_pp * cov_tt)
    return float(cov_tp / denom) if denom > 0 else 0.0


def _is_constant(x: np.ndarray) -> bool:
    return bool(np.all(x == x[0]))


def pearson(preds: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation of predicted and gold scores."""
    if len(preds) < 2 or _is_constant(preds) or _is_constant(labels):
        return 0.0
    from scipy import stats  # here: importing scipy.stats costs every rank about a second at start-up
    return float(stats.pearsonr(preds.astype(np.float64), labels.astype(np.float64))[0])


def spearman(preds: np.ndarray, labels: np.ndarray) -> float:
    """Spearman rank correlation of predicted and gold scores (ties get average ranks)."""
    if len(preds) < 2 or _is_constant(preds) or _is_constant(labels):
        return 0.0
    from scipy import stats
    return float(stats.spearmanr(preds.astype(np.float64), labels.astype(np.float64))[0])


# {tag: (written by, what it is)} of every evaluation metric (docs/running.md's tag reference).
EVAL_TAGS = {
    "eval/accuracy": ("finetuning on a classification task", "validation accuracy"),
    "eval/f1": ("finetuning on a classification task", "validation F1 (binary: of class 1; else macro)"),
    "eval/mcc": ("finetuning on CoLA", "validation Matthews correlation"),
    "eval/pearson": ("finetuning on a regression task", "validation Pearson correlation"),
    "eval/spearman": ("finetuning on a regression task", "validation Spearman correlation"),
    "eval/mlm_loss": ("pre-training", "held-out masked-LM loss"),
    "eval/mlm_accuracy": ("pre-training", "held-out masked-LM accuracy"),
    "eval/perplexity": ("pre-training", "held-out perplexity"),
    "eval/masked_tokens": ("pre-training", "the number of masked tokens scored"),
    "eval/large_<name>": ("`ctcd`", "each `eval/<name>` above for the larger model (`eval/<name>` is the student's)"),
}

METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "mcc": mcc,
    "pearson": pearson,
    "spearman": spearman,
}


def _as_1d(x, name: str) -> np.ndarray:
    """Accept lists, numpy arrays or (CPU/GPU) torch tensors; ``[N, 1]`` regression outputs are flattened."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D ([N] class ids or scores), got shape {arr.shape}")
    return arr


def compute_metrics(metric_names: Sequence[str], preds, labels) -> dict[str, float]:
    """Compute the named metrics.

    preds: ``[N]`` predicted class ids (classification) or scores (regression; ``[N, 1]`` is accepted).
    labels: ``[N]`` gold class ids or scores.
    Returns ``{name: value}`` in the order of ``metric_names``.
    """
    unknown = [m for m in metric_names if m not in METRICS]
    if unknown:
        raise CodirError(f"unknown metric(s) {', '.join(map(repr, unknown))}: use names from {', '.join(METRICS)}")
    p = _as_1d(preds, "preds")
    y = _as_1d(labels, "labels")
    if p.shape != y.shape:
        raise ValueError(f"preds and labels differ in length: {p.shape[0]} vs {y.shape[0]}")
    if p.size == 0:
        raise ValueError("cannot compute metrics on zero examples")
    return {name: METRICS[name](p, y) for name in metric_names}
