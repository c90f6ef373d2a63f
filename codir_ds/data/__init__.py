"""Data: finetuning tasks, metrics and collators (plus pre-training corpora and samplers)."""

from codir_ds.data.collate import ClassificationCollator
from codir_ds.data.metrics import compute_metrics
from codir_ds.data.tasks import GLUE_TASKS, PACKAGED_TASKS, TASK_NAMES, Example, TaskData, load_task

__all__ = [
    "ClassificationCollator",
    "Example",
    "GLUE_TASKS",
    "PACKAGED_TASKS",
    "TASK_NAMES",
    "TaskData",
    "compute_metrics",
    "load_task",
]
