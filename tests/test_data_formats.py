"""Finetuning files beyond CSV/TSV/JSONL: Parquet files and ``datasets`` ``save_to_disk`` directories.

Same column settings and checks as the text formats; typed Parquet columns (int, float, str, bool,
nulls) and ClassLabel columns (their names become the class names, ids kept). A DatasetDict
directory's split is named by its folder (``<dir>/train``); the directory itself is refused with
its splits listed. One short in-process run trains from a Parquet file.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from codir_ds.data import load_task
from codir_ds.errors import CodirError

datasets = pytest.importorskip("datasets")
pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")

TEXTS = [f"sentence number {i} about a film" for i in range(12)]
PAIRS = [f"second text {i}" for i in range(12)]
STR_LABELS = ["pos", "neg", "neutral"] * 4


def cfg(train, val=None, **kw):
    """A data config the way codir_ds.config builds it: every attribute present."""
    base = dict(task="files", train_file=str(train), validation_file=str(val) if val is not None else None,
                text_column="text", text_pair_column=None, label_column="label", task_type="auto", glue_dir=None,
                validation_fraction=0.25, split_seed=13, max_train_examples=None, max_eval_examples=None)
    base.update(kw)
    return SimpleNamespace(**base)


def write_parquet(path: Path, columns: dict, schema=None) -> Path:
    """A plain Parquet file, as pandas / pyarrow write it (no Hugging Face metadata)."""
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


def class_label_dataset(labels, names=("positive", "negative", "neutral")):
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=list(names))})
    return datasets.Dataset.from_dict({"text": TEXTS[:len(labels)], "label": list(labels)}, features=features)


def refused(c, *fragments) -> str:
    with pytest.raises(CodirError) as info:
        load_task(c)
    msg = str(info.value)
    assert msg and "\n" not in msg and ": " in msg, msg
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in: {msg}"
    return msg


def everything(data):
    """All of a TaskData's contents, for equality across formats."""
    return (data.name, data.is_regression, data.label_names, data.metric_names,
            [(e.id, e.text, e.text_pair, e.label) for e in data.train],
            [(e.id, e.text, e.text_pair, e.label) for e in data.validation])


# --------------------------------------------------------------------------- Parquet


@pytest.mark.parametrize("labels, names", [
    (STR_LABELS, ["neg", "neutral", "pos"]),
    ([2, 10, 1] * 4, ["1", "2", "10"]),  # integer labels are classes, sorted numerically
    ([True, False] * 6, ["False", "True"]),
])
def test_parquet_classification_typed_labels(tmp_path, labels, names):
    train = write_parquet(tmp_path / "train.parquet", {"text": TEXTS, "label": labels})
    data = load_task(cfg(train))
    assert not data.is_regression and data.label_names == names and data.metric_names[0] == "accuracy"
    got = sorted((e.text, data.label_names[e.label]) for e in data.train + data.validation)
    assert got == sorted(zip(TEXTS, [str(v) for v in labels]))
    assert len(data.validation) == 3 and [e.id for e in data.train] == list(range(9))


def test_parquet_regression_floats(tmp_path):
    scores = [i / 4 for i in range(12)]
    train = write_parquet(tmp_path / "train.parquet", {"text": TEXTS, "score": scores})
    data = load_task(cfg(train, label_column="score"))
    assert data.is_regression and data.num_labels == 1 and data.metric_names == ["pearson", "spearman"]
    assert sorted(e.label for e in data.train + data.validation) == scores
    assert all(isinstance(e.label, float) for e in data.train)


def test_parquet_text_pairs_with_validation_file(tmp_path):
    train = write_parquet(tmp_path / "train.parquet", {"premise": TEXTS, "hypothesis": PAIRS, "label": STR_LABELS})
    val = write_parquet(tmp_path / "dev.parquet", {"premise": TEXTS[:3], "hypothesis": PAIRS[:3],
                                                   "label": STR_LABELS[:3]})
    data = load_task(cfg(train, val, text_column="premise", text_pair_column="hypothesis"))
    assert [(e.text, e.text_pair) for e in data.train] == list(zip(TEXTS, PAIRS))
    assert [data.label_names[e.label] for e in data.validation] == ["pos", "neg", "neutral"]


def test_parquet_nulls_are_refused(tmp_path):
    texts = list(TEXTS)
    texts[1] = None
    train = write_parquet(tmp_path / "train.parquet", {"text": texts, "label": STR_LABELS})
    refused(cfg(train), "row 2", "data.train_file", str(train), "no value in column 'text'", "fill it in")
    labels = list(STR_LABELS)
    labels[4] = None
    train = write_parquet(tmp_path / "nolabel.parquet", {"text": TEXTS, "label": labels})
    refused(cfg(train), "row 5", "no label in column 'label'")


def test_parquet_missing_column_and_bad_file(tmp_path):
    train = write_parquet(tmp_path / "train.parquet", {"sentence": TEXTS, "y": STR_LABELS})
    refused(cfg(train), "data.train_file", "no column 'text'", "columns: sentence, y", "set data.text_column")
    refused(cfg(train, text_column="sentence"), "no column 'label'", "data.label_column")
    fake = tmp_path / "fake.parquet"
    fake.write_text("text,label\na,pos\n")
    refused(cfg(fake), "could not read data.train_file", "as Parquet", "fix the file's Parquet format")
    (tmp_path / "empty.parquet").write_bytes(b"")
    refused(cfg(tmp_path / "empty.parquet"), "is empty")
    empty_table = write_parquet(tmp_path / "rows0.parquet", {"text": pa.array([], pa.string()),
                                                             "label": pa.array([], pa.string())})
    refused(cfg(empty_table), "has no data rows")


def test_unsupported_extension_names_every_kind(tmp_path):
    (tmp_path / "train.xlsx").write_bytes(b"PK\x03\x04")
    refused(cfg(tmp_path / "train.xlsx"), "unsupported extension '.xlsx'", ".csv, .tsv or .jsonl", ".parquet",
            "save_to_disk directory")


# --------------------------------------------------------------------------- save_to_disk directories


def test_dataset_dict_split_folder_loads(tmp_path):
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": TEXTS, "label": STR_LABELS}),
        "validation": datasets.Dataset.from_dict({"text": TEXTS[:3], "label": ["neg", "neg", "pos"]}),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    data = load_task(cfg(tmp_path / "dd" / "train", tmp_path / "dd" / "validation"))
    assert [e.text for e in data.train] == TEXTS and data.label_names == ["neg", "neutral", "pos"]
    assert [e.label for e in data.validation] == [0, 0, 2]


def test_dataset_dict_without_split_is_refused_with_splits_and_value(tmp_path):
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": TEXTS, "label": STR_LABELS})
                               for s in ("train", "validation", "test")})
    root = tmp_path / "dd"
    dd.save_to_disk(str(root))
    refused(cfg(root), "data.train_file", str(root), "DatasetDict", "splits: train, validation, test",
            f"data.train_file={root / 'train'}")
    refused(cfg(root / "train", root), "data.validation_file", f"data.validation_file={root / 'validation'}")
    # 'dir:split' is not the syntax: the message shows the folder to use.
    refused(cfg(f"{root}:train"), "does not exist", repr(str(root / "train")))


def test_class_label_names_are_the_classes_in_id_order(tmp_path):
    ids = [0, 1, 2, 1] * 3
    dd = datasets.DatasetDict({"train": class_label_dataset(ids), "validation": class_label_dataset([2, 0])})
    dd.save_to_disk(str(tmp_path / "dd"))
    data = load_task(cfg(tmp_path / "dd" / "train", tmp_path / "dd" / "validation"))
    assert data.label_names == ["positive", "negative", "neutral"]  # not sorted: the ClassLabel's order
    assert [e.label for e in data.train] == ids and [e.label for e in data.validation] == [2, 0]
    # A class absent from the training rows is still a class (ids keep their meaning).
    class_label_dataset([0, 2] * 6).save_to_disk(str(tmp_path / "no_negative"))
    assert load_task(cfg(tmp_path / "no_negative")).label_names == ["positive", "negative", "neutral"]
    # Parquet written by datasets carries the ClassLabel too; a CSV validation file matches by name.
    class_label_dataset(ids).to_parquet(str(tmp_path / "train.parquet"))
    (tmp_path / "dev.csv").write_text("text,label\na,neutral\nb,positive\n")
    data = load_task(cfg(tmp_path / "train.parquet", tmp_path / "dev.csv"))
    assert data.label_names == ["positive", "negative", "neutral"] and [e.label for e in data.validation] == [2, 0]
    # -1 (datasets' "no label", as in GLUE test splits) is a missing label.
    class_label_dataset([0, -1] * 6).save_to_disk(str(tmp_path / "unlabelled"))
    refused(cfg(tmp_path / "unlabelled"), "row 2", "no label in column 'label'")


def test_single_dataset_dir_and_plain_dir(tmp_path):
    datasets.Dataset.from_dict({"text": TEXTS, "label": STR_LABELS}).save_to_disk(str(tmp_path / "single"))
    data = load_task(cfg(tmp_path / "single"))
    assert len(data.train) + len(data.validation) == 12 and data.label_names == ["neg", "neutral", "pos"]
    (tmp_path / "plain").mkdir()
    refused(cfg(tmp_path / "plain"), "data.train_file", "is not a file", "save_to_disk directory")


# --------------------------------------------------------------------------- one data set, every format


@pytest.mark.parametrize("with_validation", [False, True])
def test_csv_parquet_and_dir_give_identical_task_data(tmp_path, with_validation):
    rows = {"text": TEXTS, "pair": PAIRS, "label": STR_LABELS}
    dev = {k: v[:4] for k, v in rows.items()}
    for name, table in (("train", rows), ("dev", dev)):
        with open(tmp_path / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(table)
            w.writerows(zip(*table.values()))
        write_parquet(tmp_path / f"{name}.parquet", table)
        datasets.Dataset.from_dict(table).save_to_disk(str(tmp_path / "dd" / name))
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "dev"]}))

    def load(train, dev_path):
        return everything(load_task(cfg(train, dev_path if with_validation else None, text_pair_column="pair")))

    from_csv = load(tmp_path / "train.csv", tmp_path / "dev.csv")
    assert load(tmp_path / "train.parquet", tmp_path / "dev.parquet") == from_csv
    assert load(tmp_path / "dd" / "train", tmp_path / "dd" / "dev") == from_csv


def test_supplementary_reads_parquet_and_dirs(tmp_path):
    from codir_ds.data.tasks import load_supplementary
    train = write_parquet(tmp_path / "train.parquet", {"text": TEXTS, "label": STR_LABELS})
    task = load_task(cfg(train))
    extra = write_parquet(tmp_path / "extra.parquet", {"text": ["x one", "x two"]})
    got = load_supplementary(SimpleNamespace(**vars(cfg(train)), supplementary=str(extra)), task)
    assert [(e.id, e.text) for e in got] == [(-1, "x one"), (-2, "x two")]
    datasets.DatasetDict({"unsupervised": datasets.Dataset.from_dict({"text": ["y"]})}).save_to_disk(
        str(tmp_path / "dd"))
    got = load_supplementary(SimpleNamespace(**vars(cfg(train)), supplementary=str(tmp_path / "dd" / "unsupervised")),
                             task)
    assert [e.text for e in got] == ["y"]
    with pytest.raises(CodirError, match=r"data.supplementary=.*unsupervised"):
        load_supplementary(SimpleNamespace(**vars(cfg(train)), supplementary=str(tmp_path / "dd")), task)


# --------------------------------------------------------------------------- end to end


def test_finetune_trains_from_a_parquet_file(tmp_path, tiny_config, single_process_env):
    """Two steps of the finetune recipe on a Parquet file with a ClassLabel column: the export names its classes."""
    from codir_ds.config import load_config
    from codir_ds.recipes import run_finetune
    from conftest import REPO

    ids = [0, 1] * 20
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["terrible", "great"])})
    texts = [f"a {'great' if y else 'terrible'} film, take {i}" for i, y in enumerate(ids)]
    datasets.Dataset.from_dict({"text": texts, "label": ids}, features=features).to_parquet(
        str(tmp_path / "train.parquet"))
    sets = ["data.task=files", f"data.train_file={tmp_path / 'train.parquet'}", "training.max_steps=2",
            "method.name=kd"]
    results = run_finetune(load_config(str(tiny_config), sets), str(REPO / "ds_configs" / "zero2.json"),
                           str(tmp_path / "run"))
    assert results["steps"] == 2 and set(results["final"]) == {"accuracy", "f1"}
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "run" / "export").glob("*.json")]
    assert any(m.get("label_names") == ["terrible", "great"] for m in manifests), manifests
