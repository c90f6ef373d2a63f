"""Bad input ends with one line that names the problem and the fix, before training starts.

Every case goes through the entry point a user hits (``run_finetune`` / ``run_pretrain``
in-process, a few through the launchers) and checks three things:

- the error is a ``CodirError`` whose message is one line naming the key/file and a fix
  (the launchers print it as ``error: <line>`` and exit with status 2);
- it comes before any expensive or writing work: ``deepspeed.initialize``, the process
  group and the run-directory setup are replaced by tripwires (``guarded``), except for
  the one damaged-checkpoint case that can only show at DeepSpeed's load;
- a run directory that was already there is byte-identical afterwards, even with
  ``--overwrite`` (most cases pass it, so nothing but the bad input stands in the way).

Items: (a) config keys, (b) teacher directory, (c) teacher checksum, (d) vocabularies,
(e) data files, (f) label column, (g) unseen validation labels, (h) batch arithmetic,
(i) output directory, (j) damaged checkpoints, (k) inputs at their extremes (config values and data
properties at their limits: refused when they cannot train or be scored; the limits themselves train).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

import conftest
from conftest import REPO, TINY_TRAINING_YAML, TINY_YAML, free_port, python_launch
from codir_ds.config import load_config, save_config
from codir_ds.errors import CodirError

DS = str(REPO / "ds_configs" / "zero2.json")


# --------------------------------------------------------------------------- helpers

def snapshot(root: Path, mtimes: bool = False) -> dict:
    """Every path under ``root`` with its content hash (and mtime): equal snapshots = untouched."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_file():
            out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns if mtimes else None)
        else:
            out[rel] = "<dir>"
    return out


def one_line(info, *fragments) -> str:
    """The CodirError's message: one line, holding every fragment (the key/file and the fix)."""
    msg = str(info.value)
    assert isinstance(info.value, CodirError)
    assert msg and "\n" not in msg and "\r" not in msg, msg
    assert ": " in msg, msg  # "<problem>: <fix>"
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in: {msg}"
    return msg


def launcher_error(proc, *fragments) -> str:
    """A launcher refused: exit status 2, exactly one ``error:`` line (the last), no traceback."""
    assert proc.returncode == 2, (f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\n"
                                  f"STDERR:\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    for frag in fragments:
        assert frag in errors[0], f"{frag!r} not in: {errors[0]}"
    return errors[0]


def finetune(config: Path, out: Path, *overrides: str, ds: str = DS, resume: bool = False, overwrite: bool = True):
    """What launchers/finetune.py does: load the config (with --set overrides), then run."""
    from codir_ds.recipes import run_finetune
    return run_finetune(load_config(str(config), list(overrides)), ds, str(out), resume=resume, overwrite=overwrite)


def pretrain(config: Path, out: Path, *overrides: str, overwrite: bool = True):
    from codir_ds.recipes import run_pretrain
    return run_pretrain(load_config(str(config), list(overrides)), DS, str(out), overwrite=overwrite)


def refused(call, *fragments) -> str:
    with pytest.raises(CodirError) as info:
        call()
    return one_line(info, *fragments)


@pytest.fixture()
def guarded(monkeypatch, single_process_env):
    """Tripwires on everything that must not be reached when the input is bad."""
    import deepspeed
    import codir_ds.recipes.base as recipe_base

    def tripwire(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"{name} was reached: bad input must be refused before it")
        return fail

    monkeypatch.setattr(deepspeed, "initialize", tripwire("deepspeed.initialize"))
    monkeypatch.setattr(recipe_base, "init_distributed", tripwire("init_distributed"))
    monkeypatch.setattr(recipe_base, "open_run_dir", tripwire("open_run_dir"))


@pytest.fixture()
def old_run(tmp_path, tiny_config):
    """A run directory of an earlier, different run; yields it and checks it is untouched at the end."""
    run = tmp_path / "old_run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    save_config(load_config(str(tiny_config), ["training.lr=5e-4"]), run / "config.yaml")
    (run / "results.json").write_text('{"final": {"accuracy": 0.5}}\n')
    (run / "ds_config.json").write_text('{"train_batch_size": 8}\n')
    (run / "checkpoints" / "latest").write_text("step_00000002\n")
    (run / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 weights")
    (run / "notes.txt").write_text("the user's own file\n")
    before = snapshot(run, mtimes=True)
    yield run
    assert snapshot(run, mtimes=True) == before, "the existing run directory was modified"


def write(path: Path, data) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


GOOD_CSV = "text,label\n" + "".join(f"a {'good' if i % 2 else 'bad'} film number {i},{'pos' if i % 2 else 'neg'}\n"
                                    for i in range(24))


def files_args(train: Path, val: Path | None = None, **extra: str) -> list[str]:
    args = ["data.task=files", f"data.train_file={train}"]
    if val is not None:
        args.append(f"data.validation_file={val}")
    return args + [f"data.{k}={v}" for k, v in extra.items()]


# --------------------------------------------------------------------------- (a) config keys

def test_a_unknown_or_mistyped_config_keys(tmp_path, tiny_config, old_run, guarded):
    refused(lambda: finetune(tiny_config, old_run, "method.num_negative=8"),
            "unknown config key 'method.num_negative'", "did you mean 'method.num_negatives'")
    refused(lambda: finetune(tiny_config, old_run, "trainig.lr=1e-4"), "unknown config key 'trainig'", "'training'")
    refused(lambda: finetune(tiny_config, old_run, "training.max_steps=six"),
            "config key 'training.max_steps' must be an integer", "'six'", "--set training.max_steps=")
    typo = write(tmp_path / "typo.yaml", tiny_config.read_text().replace("  projection_dim:", "  projection_dims:"))
    refused(lambda: finetune(typo, old_run), "unknown config key 'method.projection_dims'",
            "did you mean 'method.projection_dim'")


def test_a_deepspeed_json_typos_are_refused_before_the_engine(tmp_path, tiny_config, old_run, guarded):
    good = json.loads(Path(DS).read_text())
    cases = [({"train_micro_batch_size_per_gu": 2}, "'train_micro_batch_size_per_gu'",
              "did you mean 'train_micro_batch_size_per_gpu'"),
             ({"zero_optimization": {**good["zero_optimization"], "stag": 2}}, "unknown key 'zero_optimization.stag'",
              "fix it"),
             ({"zero_optimization": {"stage": "two"}}, "'zero_optimization.stage'", "fix it")]
    for extra, *fragments in cases:
        ds = write(tmp_path / "ds.json", json.dumps({**good, **extra}))
        refused(lambda: finetune(tiny_config, old_run, ds=str(ds)), str(ds), *fragments)


def test_a_launcher_prints_one_error_line_and_exits_2(tiny_config, old_run):
    proc = python_launch("launchers/finetune.py", ["--deepspeed_config", DS, "--config", str(tiny_config),
                                                   "--output_dir", str(old_run), "--overwrite",
                                                   "--set", "training.learning_rate=1e-4"])
    launcher_error(proc, "error: unknown config key 'training.learning_rate'", "'training.lr'")


# --------------------------------------------------------------------------- (b) teacher directory

def test_b_missing_teacher_directory(tmp_path, tiny_config, tiny_teacher, old_run, guarded):
    missing = tmp_path / "no_such_teacher"
    refused(lambda: finetune(tiny_config, old_run, f"model.teacher={missing}"),
            "model.teacher", str(missing), "does not exist", "point model.teacher at")
    a_file = write(tmp_path / "teacher.bin", b"weights")
    refused(lambda: finetune(tiny_config, old_run, f"model.teacher={a_file}"), str(a_file), "not a directory")
    empty = tmp_path / "empty_teacher"
    empty.mkdir()
    refused(lambda: finetune(tiny_config, old_run, f"model.teacher={empty}"), str(empty), "no config.json",
            "save_pretrained")


def test_b_missing_teacher_directory_pretrain(tmp_path, pre_yaml, old_run, guarded):
    refused(lambda: pretrain(pre_yaml, old_run, f"model.teacher={tmp_path / 'gone'}"),
            "model.teacher", "gone", "does not exist")


# --------------------------------------------------------------------------- (c) teacher checksum

def test_c_teacher_checksum_mismatch(tmp_path, tiny_config, tiny_teacher, old_run, guarded):
    msg = refused(lambda: finetune(tiny_config, old_run, "model.teacher_sha256=" + "ab" * 32),
                  "model.teacher", "fail the checksum", "model.teacher_sha256", "ab" * 32)
    actual = hashlib.sha256((tiny_teacher / "model.safetensors").read_bytes()).hexdigest()
    assert actual in msg  # the fix can be applied as written
    # A flipped byte in the weights fails the digest recorded at export.
    bad = tmp_path / "bad_teacher"
    shutil.copytree(tiny_teacher, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-3] ^= 0x10
    (bad / "model.safetensors").write_bytes(bytes(data))
    refused(lambda: finetune(tiny_config, old_run, f"model.teacher={bad}"),
            str(bad / "model.safetensors"), "fail the checksum", "codir_export.json", "re-export")


def test_c_teacher_checksum_mismatch_pretrain(pre_yaml, old_run, guarded):
    refused(lambda: pretrain(pre_yaml, old_run, "model.teacher_sha256=" + "ab" * 32),
            "fail the checksum", "model.teacher_sha256")


# --------------------------------------------------------------------------- (d) vocabularies

@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory) -> Path:
    """A tokenizer directory with a vocabulary other than MiniLM's (the tiny teachers')."""
    from transformers import BertTokenizer
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "bad", "film"]
    vocab = tmp_path_factory.mktemp("tok") / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    out = vocab.parent / "tokenizer"
    BertTokenizer(vocab_file=str(vocab)).save_pretrained(str(out))
    return out


def test_d_teacher_student_vocabulary_mismatch(tiny_config, tiny_teacher, other_tokenizer, old_run, guarded):
    refused(lambda: finetune(tiny_config, old_run, f"model.tokenizer={other_tokenizer}"),
            "model.teacher", str(tiny_teacher), "different tokenizer vocabulary", "(30522 tokens)",
            "set model.tokenizer")
    # The student initialised from a model of another vocabulary (no teacher: method ce).
    refused(lambda: finetune(tiny_config, old_run, f"model.tokenizer={other_tokenizer}", "method.name=ce",
                             "model.teacher=null", f"model.student_init={tiny_teacher}"),
            "model.student_init", "different tokenizer vocabulary", "share one vocabulary")


def test_d_vocabulary_mismatch_pretrain(pre_yaml, other_tokenizer, old_run, guarded):
    refused(lambda: pretrain(pre_yaml, old_run, f"model.tokenizer={other_tokenizer}"),
            "model.teacher", "different tokenizer vocabulary")


# --------------------------------------------------------------------------- (e) data files

BAD_FILES = {
    # name: (content, fragments of the message)
    "empty.csv": (b"", ("is empty", "put a header row")),
    "header_only.csv": (b"text,label\n", ("no data rows", "add examples")),
    "garbage.csv": (bytes(range(256)) * 8, ("not a text file", "NUL byte on line 1", "save it as UTF-8")),
    "latin1.jsonl": ('{"text": "caf\xe9", "label": "pos"}\n'.encode("latin-1"),
                     ("not UTF-8 text", "line 1", "re-save it as UTF-8")),
    "latin1.csv": (("text,label\na film,pos\nun caf\xe9,neg\n" * 4).encode("latin-1"),
                   ("not UTF-8 text", "line 3", "re-save it as UTF-8")),
    "utf16.csv": ("text,label\na,pos\nb,neg\n".encode("utf-16"), ("not a text file", "UTF-16")),
    "fields.csv": (b"text,label\na film,pos\nb,neg,extra,more\nc,pos\n",
                   ("could not read", "as CSV", "line 3", "fix the file's CSV format")),
    "quote.csv": (b'text,label\n"an unterminated quote,pos\nb,neg\n', ("as CSV", "fix the file's CSV format")),
    "bad.jsonl": (b'{"text": "a", "label": "pos"}\n{"text": "b", "label": \n',
                  ("as JSONL", "line 2 is not valid JSON", "fix the file's JSONL format")),
    "lists.jsonl": (b'["a", "pos"]\n["b", "neg"]\n', ("line 1 is a JSON list", "fix the file's JSONL format")),
    "train.xlsx": (b"PK\x03\x04 not a table", ("unsupported extension '.xlsx'", ".csv, .tsv or .jsonl")),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
@pytest.mark.parametrize("key", ["train_file", "validation_file"])
def test_e_unreadable_data_file(tmp_path, tiny_config, old_run, guarded, name, key):
    content, fragments = BAD_FILES[name]
    good = write(tmp_path / "good.csv", GOOD_CSV)
    bad = write(tmp_path / name, content)
    train, val = (bad, good) if key == "train_file" else (good, bad)
    refused(lambda: finetune(tiny_config, old_run, *files_args(train, val)), f"data.{key}", str(bad), *fragments)


def test_e_missing_data_files(tmp_path, tiny_config, old_run, guarded):
    good = write(tmp_path / "good.csv", GOOD_CSV)
    gone = tmp_path / "gone.csv"
    refused(lambda: finetune(tiny_config, old_run, *files_args(gone)),
            "data.train_file", str(gone), "does not exist", "set data.train_file")
    refused(lambda: finetune(tiny_config, old_run, *files_args(good, gone)),
            "data.validation_file", str(gone), "does not exist", "set data.validation_file")
    refused(lambda: finetune(tiny_config, old_run, *files_args(tmp_path)), "data.train_file", "is not a file")
    refused(lambda: finetune(tiny_config, old_run, "data.task=files"), "data.task=files needs data.train_file")
    refused(lambda: finetune(tiny_config, old_run, f"data.train_file={good}"),
            "data.train_file is set but data.task is 'movie_snippets'", "set data.task=files")


def test_e_unreadable_permissions(tmp_path, tiny_config, old_run, guarded, monkeypatch):
    locked = write(tmp_path / "locked.csv", GOOD_CSV)
    real_access = os.access
    # root reads anything, so the denial is simulated where chmod cannot show it
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real_access(p, mode, **kw))
    refused(lambda: finetune(tiny_config, old_run, *files_args(locked)),
            "data.train_file", str(locked), "not readable", "fix its permissions")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_e_chmod_000(tmp_path, tiny_config, old_run, guarded):
    locked = write(tmp_path / "locked.csv", GOOD_CSV)
    locked.chmod(0)
    try:
        refused(lambda: finetune(tiny_config, old_run, *files_args(locked)), str(locked), "not readable")
    finally:
        locked.chmod(0o644)


def test_e_bad_corpus_files_pretrain(tmp_path, pre_yaml, old_run, guarded):
    gone = tmp_path / "gone.txt"
    refused(lambda: pretrain(pre_yaml, old_run, f"corpus.sources=[{gone}]"),
            "corpus source", str(gone), "does not exist", "fix corpus.sources")
    empty = write(tmp_path / "empty.txt", b"")
    refused(lambda: pretrain(pre_yaml, old_run, f"corpus.sources=[{empty}]"), str(empty), "is empty",
            "remove it from corpus.sources")
    latin1 = write(tmp_path / "latin1.txt", ("un caf\xe9 noir\n" * 50).encode("latin-1"))
    refused(lambda: pretrain(pre_yaml, old_run, f"corpus.sources=[{latin1}]", f"corpus.cache_dir={tmp_path / 'c'}"),
            str(latin1), "save it as UTF-8")
    bad = write(tmp_path / "bad.jsonl", b'{"text": "a"}\n{"text": \n')
    refused(lambda: pretrain(pre_yaml, old_run, f"corpus.sources=[{bad}]", f"corpus.cache_dir={tmp_path / 'c'}"),
            str(bad), "JSON")


# --------------------------------------------------------------------------- (f) label column

def test_f_missing_label_column(tmp_path, tiny_config, old_run, guarded):
    no_label = write(tmp_path / "train.csv", GOOD_CSV.replace("text,label", "text,sentiment", 1))
    refused(lambda: finetune(tiny_config, old_run, *files_args(no_label)),
            "data.train_file", str(no_label), "no column 'label'", "columns: text, sentiment",
            "set data.label_column")
    good = write(tmp_path / "good.csv", GOOD_CSV)
    refused(lambda: finetune(tiny_config, old_run, *files_args(good, no_label)),
            "data.validation_file", "no column 'label'", "give it the columns of data.train_file")
    refused(lambda: finetune(tiny_config, old_run, *files_args(good, label_column="y")),
            "no column 'y'", "set data.label_column")
    blank = write(tmp_path / "blank.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", "label": null}\n')
    refused(lambda: finetune(tiny_config, old_run, *files_args(blank)), "row 2", "no label in column 'label'",
            "fill it in")


# --------------------------------------------------------------------------- (g) unseen validation labels

def test_g_validation_labels_unseen_in_training(tmp_path, tiny_config, old_run, guarded):
    good = write(tmp_path / "train.csv", GOOD_CSV)
    val = write(tmp_path / "dev.csv", "text,label\nfine,pos\nso so,mixed\nawful,angry\nmeh,mixed\n")
    refused(lambda: finetune(tiny_config, old_run, *files_args(good, val)),
            "data.validation_file", str(val), "labels not in data.train_file", "'angry', 'mixed'",
            "add examples of these labels to the training file")


def test_g_glue_validation_label_outside_the_task(tmp_path, tiny_config, old_run, guarded):
    """Built-in tasks fix their classes: a dev label outside them is refused with its line."""
    sst = tmp_path / "glue" / "SST-2"
    sst.mkdir(parents=True)
    write(sst / "train.tsv", "sentence\tlabel\n" + "".join(f"film {i}\t{i % 2}\n" for i in range(24)))
    write(sst / "dev.tsv", "sentence\tlabel\ngood\t1\nvery good\t2\n")
    refused(lambda: finetune(tiny_config, old_run, "data.task=sst2", f"data.glue_dir={tmp_path / 'glue'}"),
            "line 3", str(sst / "dev.tsv"), "label '2'", "expected one of 0, 1", "fix that line")


# --------------------------------------------------------------------------- (h) batch arithmetic

def test_h_batch_sizes_from_the_yaml(tiny_config, old_run, guarded, monkeypatch):
    refused(lambda: finetune(tiny_config, old_run, "training.train_batch_size=10", "training.micro_batch_size=4"),
            "train_batch_size 10 (training.train_batch_size)", "micro batch 4 (training.micro_batch_size)",
            "world size 1", "choose a multiple of 4")
    refused(lambda: finetune(tiny_config, old_run, "training.micro_batch_size=0"),
            "training.micro_batch_size", "> 0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # what `deepspeed --num_gpus 2` sets; refused before any process group
    refused(lambda: finetune(tiny_config, old_run, "training.train_batch_size=6", "training.micro_batch_size=2"),
            "train_batch_size 6", "x world size 2", "choose a multiple of 4")
    refused(lambda: finetune(tiny_config, old_run, "training.train_batch_size=7", "training.micro_batch_size=null"),
            "train_batch_size 7 (training.train_batch_size)", "world size 2", "to a multiple of 2")


def test_h_batch_sizes_from_the_deepspeed_json(tmp_path, tiny_config, old_run, guarded):
    no_yaml_batch = ["training.train_batch_size=null", "training.micro_batch_size=null"]
    ds = write(tmp_path / "ds.json", json.dumps({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4}))
    refused(lambda: finetune(tiny_config, old_run, *no_yaml_batch, ds=str(ds)),
            "train_batch_size 10 (train_batch_size in the DeepSpeed JSON)",
            "micro batch 4 (train_micro_batch_size_per_gpu in the DeepSpeed JSON)", "choose a multiple of 4")
    ds = write(tmp_path / "ds.json", json.dumps({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2,
                                                 "gradient_accumulation_steps": 3}))
    refused(lambda: finetune(tiny_config, old_run, *no_yaml_batch, ds=str(ds)),
            "train_batch_size 8 != micro 2 x accumulation 3 x world size 1 = 6", "fix one of them")
    ds = write(tmp_path / "ds.json", json.dumps({"train_batch_size": 8, "train_micro_batch_size_per_gpu": "2"}))
    refused(lambda: finetune(tiny_config, old_run, *no_yaml_batch, ds=str(ds)),
            "train_micro_batch_size_per_gpu in the DeepSpeed JSON must be a positive integer", "'2'")
    # More ranks x micro batch than training examples.
    refused(lambda: finetune(tiny_config, old_run, "data.max_train_examples=4", "training.train_batch_size=8",
                             "training.micro_batch_size=8"),
            "4 examples", "fewer than one global micro-batch", "lower the batch size or add data")


# --------------------------------------------------------------------------- (i) output directory

def test_i_output_directory_holding_another_run(tmp_path, tiny_config, old_run, guarded):
    # a finished run: --resume would have nothing to continue, so it is not suggested
    msg = refused(lambda: finetune(tiny_config, old_run, overwrite=False),
                  str(old_run), "already holds a finished run", "--overwrite", "another --output_dir")
    assert "--resume" not in msg
    unfinished = tmp_path / "unfinished"
    shutil.copytree(old_run, unfinished)
    (unfinished / "results.json").unlink()
    refused(lambda: finetune(tiny_config, unfinished, overwrite=False),
            str(unfinished), "already holds a run", "--resume", "--overwrite", "another --output_dir")
    refused(lambda: finetune(tiny_config, old_run, overwrite=False, resume=True),
            "--resume", "differs from the saved run's in training.lr", "same config")
    refused(lambda: finetune(tiny_config, old_run, overwrite=True, resume=True), "contradict", "pass one")
    same = tmp_path / "same_config"
    shutil.copytree(old_run, same)
    save_config(load_config(str(tiny_config)), same / "config.yaml")
    refused(lambda: finetune(tiny_config, same, overwrite=False, resume=True),
            "has finished (results.json exists)", "--overwrite")
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine\n")
    refused(lambda: finetune(tiny_config, stray, overwrite=False), "is not empty and holds no codir-ds run",
            "choose a new or empty --output_dir")
    refused(lambda: finetune(tiny_config, stray, overwrite=False, resume=True), "holds no run (no config.yaml)",
            "drop --resume")
    assert (stray / "notes.txt").read_text() == "mine\n" and len(list(stray.iterdir())) == 1
    a_file = write(tmp_path / "out.txt", "x")
    refused(lambda: finetune(tiny_config, a_file, overwrite=True), "is a file", "choose a directory")


def test_i_pretrain_refuses_an_output_directory_holding_another_run(pre_yaml, old_run, guarded):
    refused(lambda: pretrain(pre_yaml, old_run, overwrite=False), "already holds a finished run", "--overwrite")


# --------------------------------------------------------------------------- (j) damaged checkpoints

@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_teacher):
    """A real 1-rank run stopped at step 4 (checkpoints at steps 2 and 4), as a preempted job leaves it."""
    from codir_ds.recipes import run_finetune
    root = tmp_path_factory.mktemp("stopped")
    config = write(root / "tiny.yaml", TINY_YAML.format(teacher=tiny_teacher))
    overrides = ["training.checkpoint_every=2", "training.stop_at_step=4"]
    if conftest._SINGLE_PROCESS_PORT is None:  # the process group the single_process_env fixture shares
        conftest._SINGLE_PROCESS_PORT = str(free_port())
    with pytest.MonkeyPatch.context() as mp:
        for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=conftest._SINGLE_PROCESS_PORT).items():
            mp.setenv(k, v)
        out = run_finetune(load_config(str(config), overrides), DS, str(root / "run"))
    assert out == {"stopped_at_step": 4}
    ckpts = root / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000004" and (ckpts / "step_00000002").is_dir()
    return config, overrides, root / "run"


def _copy(stopped_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(stopped_run[2], run)
    return run


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _resume(stopped_run, run: Path):
    config, overrides, _ = stopped_run
    return lambda: finetune(config, run, *overrides, resume=True, overwrite=False)


@pytest.mark.parametrize("victim, damage, fragments", [
    ("codir_rank_00000.pt", "truncate", ("truncated or corrupted",)),
    ("mp_rank_00_model_states.pt", "truncate", ("truncated or corrupted",)),
    ("mp_rank_00_model_states.pt", "flip", ("CRC mismatch",)),
    ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "truncate", ("truncated or corrupted",)),
    ("codir_rank_00000.pt", "empty", ("empty (0 bytes)",)),
])
def test_j_damaged_checkpoint_is_refused_before_the_engine(stopped_run, tmp_path, guarded, victim, damage, fragments):
    run = _copy(stopped_run, tmp_path)
    tag = run / "checkpoints" / "step_00000004"
    target = tag / victim
    assert target.is_file(), sorted(p.name for p in tag.iterdir())
    if damage == "truncate":
        _truncate(target)
    elif damage == "empty":
        target.write_bytes(b"")
    else:  # one flipped byte in the middle: still a loadable archive, torch.load would not notice
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    before = snapshot(run, mtimes=True)
    refused(_resume(stopped_run, run), "--resume", str(target), *fragments,
            f"delete '{tag}' to resume from the previous checkpoint 'step_00000002'")
    assert snapshot(run, mtimes=True) == before


def test_j_last_checkpoint_damaged_with_no_earlier_one(stopped_run, tmp_path, guarded):
    run = _copy(stopped_run, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_00000002")
    _truncate(run / "checkpoints" / "step_00000004" / "codir_rank_00000.pt")
    before = snapshot(run, mtimes=True)
    refused(_resume(stopped_run, run), "codir_rank_00000.pt", "no earlier checkpoint is left", "--overwrite")
    assert snapshot(run, mtimes=True) == before


def test_j_resume_without_a_complete_checkpoint(stopped_run, tmp_path, guarded):
    run = _copy(stopped_run, tmp_path)
    for tag in ("step_00000002", "step_00000004"):
        (run / "checkpoints" / tag / "COMPLETE").unlink()  # as a crash mid-save leaves them
    before = snapshot(run, mtimes=True)
    refused(_resume(stopped_run, run), "--resume: no complete checkpoint", "--overwrite")
    assert snapshot(run, mtimes=True) == before


def test_j_checkpoint_that_fails_at_deepspeed_load_leaves_the_run_intact(stopped_run, tmp_path, single_process_env):
    """An intact archive with the wrong content passes the cheap checks and fails in engine.load_checkpoint."""
    run = _copy(stopped_run, tmp_path)
    tag = run / "checkpoints" / "step_00000004"
    torch.save({"not": "optimizer state"}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    before = snapshot(run)
    refused(_resume(stopped_run, run), "DeepSpeed checkpoint", str(tag), f"delete '{tag}'", "step_00000002")
    assert snapshot(run) == before  # same files, same bytes: nothing deleted, rewritten or added


def test_j_intact_checkpoint_passes_the_checks_and_resumes(stopped_run, tmp_path, single_process_env):
    """The control: the same checks accept DeepSpeed's and codir-ds's real files."""
    from codir_ds.engine.checkpointing import check_resume_checkpoint
    run = _copy(stopped_run, tmp_path)
    assert check_resume_checkpoint(run / "checkpoints") == "step_00000004"
    results = _resume(stopped_run, run)()
    assert results["steps"] == 6 and (run / "results.json").is_file()


@pytest.mark.parametrize("stage", [0, 3])
def test_j_resume_with_another_zero_layout_is_refused_before_the_engine(stopped_run, tmp_path, guarded, stage):
    """The stopped run wrote ZeRO-2 checkpoints; a stage-0 or stage-3 JSON cannot load them (DeepSpeed would fail in
    its load with a traceback, or ask for files never written)."""
    run = _copy(stopped_run, tmp_path)
    ds = json.loads(Path(DS).read_text())
    ds["zero_optimization"] = {"stage": stage}
    other = write(tmp_path / f"zero{stage}.json", json.dumps(ds))
    before = snapshot(run, mtimes=True)
    config, overrides, _ = stopped_run
    with pytest.raises(CodirError) as info:
        finetune(config, run, *overrides, ds=str(other), resume=True, overwrite=False)
    one_line(info, "--resume", "step_00000004", "written with ZeRO stage 1 or 2", f"asks for ZeRO stage {stage}",
             str(run / "ds_config.json"))
    assert snapshot(run, mtimes=True) == before


@pytest.mark.parametrize("json_file", ["zero1.json", "the run's ds_config.json"])
def test_j_resume_with_a_json_of_the_same_layout_finishes(stopped_run, tmp_path, single_process_env, json_file):
    """Stages 1 and 2 share a checkpoint layout; the run's recorded JSON resumes it too."""
    run = _copy(stopped_run, tmp_path)
    ds = str(REPO / "ds_configs" / json_file) if json_file.endswith("zero1.json") else str(run / "ds_config.json")
    config, overrides, _ = stopped_run
    results = finetune(config, run, *overrides, ds=ds, resume=True, overwrite=False)
    assert results["steps"] == 6


def test_j_launcher_on_a_truncated_checkpoint(stopped_run, tmp_path):
    run = _copy(stopped_run, tmp_path)
    _truncate(run / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt", keep=0.9)
    before = snapshot(run, mtimes=True)
    config, overrides, _ = stopped_run
    args = ["--deepspeed_config", DS, "--config", str(config), "--output_dir", str(run), "--resume"]
    for o in overrides:
        args += ["--set", o]
    launcher_error(python_launch("launchers/finetune.py", args), "error: --resume", "mp_rank_00_model_states.pt",
                   "delete")
    assert snapshot(run, mtimes=True) == before


# --------------------------------------------------------------------------- pretrain config

PRE_YAML = """
name: tiny_pre
model:
  teacher: {teacher}
  student_layers: 1
  student_hidden: 32
  student_heads: 2
  student_intermediate: 64
corpus:
  sources: [{corpus}]
  block_size: 32
  validation_blocks: 16
  cache_dir: {cache}
method:
  name: codir
  alpha_kd: 0.1
  num_negatives: 5
  projection_dim: 16
""" + TINY_TRAINING_YAML


@pytest.fixture(scope="module")
def pre_yaml(tmp_path_factory, tiny_mlm_teacher, corpus_file) -> Path:
    root = tmp_path_factory.mktemp("pre")
    return write(root / "pre.yaml", PRE_YAML.format(teacher=tiny_mlm_teacher, corpus=corpus_file,
                                                    cache=root / "cache"))


# --------------------------------------------------------------------------- (k) inputs at their extremes

def rows_csv(labels, texts=None) -> str:
    """A ``text,label`` CSV with one row per label (texts: ``film number i`` unless given)."""
    texts = texts or [f"film number {i}" for i in range(len(labels))]
    return "text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(texts, labels))


def rows_jsonl(texts, labels, pairs=None) -> str:
    out = []
    for i, (t, y) in enumerate(zip(texts, labels)):
        row = {"text": t, "label": y, **({"pair": pairs[i]} if pairs is not None else {})}
        out.append(json.dumps(row, ensure_ascii=False) + "\n")
    return "".join(out)


def passes_the_checks(call) -> None:
    """A borderline-but-valid input gets through every check to the process group (``guarded``'s tripwire)."""
    with pytest.raises(AssertionError, match="init_distributed was reached"):
        call()


@pytest.fixture(scope="module")
def short_teacher(tmp_path_factory) -> Path:
    """A tiny BERT classifier whose position embeddings hold only 64 tokens."""
    from transformers import BertConfig, BertForSequenceClassification
    from codir_ds.assets import minilm_dir
    from codir_ds.models.loading import export_student, load_tokenizer
    tok = load_tokenizer(minilm_dir())
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64,
                                                     max_position_embeddings=64, num_labels=2))
    out = tmp_path_factory.mktemp("short_teacher") / "export"
    export_student(model, tok, out)
    return out


NO_TEACHER = ["method.name=ce", "model.teacher=null"]  # + model.tokenizer=<tiny teacher>

K_CONFIG_VALUES = {
    # --set: fragments of the message. Each of these crashed, hung or trained on NaN before.
    "logging.log_every=0": ("'logging.log_every'", "> 0"),            # ZeroDivisionError after the engine
    "logging.log_every=-1": ("'logging.log_every'", "> 0"),
    "training.weight_decay=.nan": ("'training.weight_decay'", ">= 0"),  # NaN loss from step 1
    "training.weight_decay=-1": ("'training.weight_decay'", ">= 0"),
    "training.adam_eps=0": ("'training.adam_eps'", "> 0"),            # 0/0 on untouched weights: NaN loss
    "training.adam_eps=-1": ("'training.adam_eps'", "> 0"),           # torch ValueError
    "training.seed=-1": ("'training.seed'", "[0, 2**53)"),            # numpy ValueError in pre-training masking
    "training.seed=1180591620717411303424": ("'training.seed'", "[0, 2**53)"),  # torch overflow
    "model.dropout=1.0": ("'model.dropout'", "[0, 1)"),              # every activation dropped
    "model.dropout=-0.1": ("'model.dropout'", "[0, 1)"),             # torch ValueError
    "model.student_intermediate=0": ("'model.student_intermediate'", "> 0"),
    "model.student_intermediate=-4": ("'model.student_intermediate'", "> 0"),
}


@pytest.mark.parametrize("setting", sorted(K_CONFIG_VALUES))
def test_k_config_values_at_their_extremes(tiny_config, old_run, guarded, setting):
    key = setting.split("=")[0]
    refused(lambda: finetune(tiny_config, old_run, setting), *K_CONFIG_VALUES[setting], f"--set {key}=")


def test_k_attention_layer_map_of_embeddings_only(tiny_config, old_run, guarded):
    """tinybert's attention-map term over pairs of embedding layers only (IndexError after the engine)."""
    refused(lambda: finetune(tiny_config, old_run, "method.name=tinybert", "method.layer_map=[[0,0]]"),
            "method.layer_map [[0, 0]] maps only the embeddings", "no attention maps", "method.alpha_attention=0")


K_DATA = {
    # name: (train file content, validation file content, extra --set, fragments). Suffix: the file format.
    "one_class.csv": (rows_csv(["pos"] * 12), rows_csv(["pos"] * 4), [],
                      ("every training example of data.train_file", "has label 'pos'", "at least 2 classes")),
    "constant_target.csv": (rows_csv(["0.5"] * 12), rows_csv(["0.5", "1.5"]), ["data.task_type=regression"],
                            ("every training target", "is 0.5", "nothing to fit")),
    "constant_val_target.csv": (rows_csv([f"{i / 4}" for i in range(12)]), rows_csv(["0.5"] * 3),
                                ["data.task_type=regression"],
                                ("every validation target of data.validation_file", "correlations are undefined",
                                 "data.max_eval_examples")),
    "nan_target.csv": (rows_csv([f"{i / 4}" if i != 3 else "nan" for i in range(12)]), rows_csv(["0.5", "1.5"]),
                       ["data.task_type=regression"], ("row 4 of data.train_file", "'nan'", "not a finite number")),
    "inf_target.csv": (rows_csv([f"{i / 4}" if i != 5 else "-inf" for i in range(12)]), rows_csv(["0.5", "1.5"]),
                       ["data.task_type=regression"], ("row 6 of data.train_file", "not a finite number")),
    "huge_target.csv": (rows_csv([f"{i / 4}" if i != 0 else "1e300" for i in range(12)]), rows_csv(["0.5", "1.5"]),
                        ["data.task_type=regression"], ("row 1", "1e+300", "rescale the targets")),
    "nan_val_target.csv": (rows_csv([f"{i / 4}" for i in range(12)]), rows_csv(["0.5", "nan"]),
                           ["data.task_type=regression"], ("row 2 of data.validation_file", "not a finite number")),
    "one_bin.csv": (rows_csv([f"{i / 4}" for i in range(12)]), rows_csv(["0.5", "1.5"]),
                    ["data.task_type=regression", "method.regression_bins=1"],
                    ("method.regression_bins=1", "into one bin", "CRD has no negatives")),
    "empty_texts.jsonl": (rows_jsonl([""] * 12, ["pos", "neg"] * 6), rows_jsonl(["a", "b"], ["pos", "neg"]), [],
                          ("every training text", "empty or whitespace", "data.text_column")),
    "blank_texts.jsonl": (rows_jsonl([" \t", "\u200b\ufeff", "\n"] * 4, ["pos", "neg"] * 6),
                          rows_jsonl(["a", "b"], ["pos", "neg"]), [], ("every training text", "empty or whitespace")),
    "blank_val_texts.jsonl": (rows_jsonl([f"film {i}" for i in range(12)], ["pos", "neg"] * 6),
                              rows_jsonl(["", "  "], ["pos", "neg"]), [],
                              ("every validation text of data.validation_file", "empty or whitespace")),
    "max_length_2.csv": (GOOD_CSV, GOOD_CSV, ["data.max_length=2"],
                         ("data.max_length 2 leaves no room for text", "set data.max_length >= 3")),
    "max_length_4_pairs.jsonl": (rows_jsonl([f"film {i}" for i in range(12)], ["pos", "neg"] * 6, ["x"] * 12),
                                 rows_jsonl(["a", "b"], ["pos", "neg"], ["x", "y"]),
                                 ["data.max_length=4", "data.text_pair_column=pair"],
                                 ("data.max_length 4", "3 special tokens per text pair", ">= 5")),
    "max_length_513.csv": (GOOD_CSV, GOOD_CSV, ["data.max_length=513"],
                           ("data.max_length 513 exceeds the 512 positions of model.teacher", "<= 512")),
    "deterministic.csv": (GOOD_CSV, GOOD_CSV, ["data.max_train_examples=6", "training.deterministic=true"],
                          ("6 examples, fewer than one global batch of 8", "training.deterministic=false")),
}


K_DATA_WITH_TEACHER = {"one_bin.csv", "max_length_513.csv"}  # the others run method ce, without a teacher


@pytest.mark.parametrize("name", sorted(K_DATA))
def test_k_data_at_their_extremes(tmp_path, tiny_config, tiny_teacher, old_run, guarded, name):
    train_text, val_text, extra, fragments = K_DATA[name]
    suffix = Path(name).suffix
    train = write(tmp_path / f"train{suffix}", train_text)
    val = write(tmp_path / f"val{suffix}", val_text)
    teacherless = [] if name in K_DATA_WITH_TEACHER else [*NO_TEACHER, f"model.tokenizer={tiny_teacher}"]
    refused(lambda: finetune(tiny_config, old_run, *files_args(train, val), *extra, *teacherless), *fragments)


def test_k_packaged_task_cut_to_one_class(tiny_config, old_run, guarded):
    """max_train_examples=2 of movie_snippets happens to leave two negatives (LabelNegativeSampler crashed)."""
    refused(lambda: finetune(tiny_config, old_run, "data.max_train_examples=2"),
            "every training example of task movie_snippets has label 'negative'", "data.max_train_examples")


def test_k_max_length_beyond_the_position_embeddings(tiny_config, short_teacher, old_run, guarded):
    """Crashed in the first forward (RuntimeError: tensor sizes) after the engine had started."""
    refused(lambda: finetune(tiny_config, old_run, f"model.teacher={short_teacher}", "data.max_length=65"),
            f"data.max_length 65 exceeds the 64 positions of model.teacher '{short_teacher}'", "<= 64",
            "truncated")
    refused(lambda: finetune(tiny_config, old_run, *NO_TEACHER, f"model.student_init={short_teacher}",
                             "data.max_length=65"),
            "64 positions of model.student_init", "<= 64")
    refused(lambda: finetune(tiny_config, old_run, *NO_TEACHER, f"model.tokenizer={short_teacher}",
                             "data.max_length=600"),
            "600 exceeds the 512 positions of the student built from model.student_*")


def test_k_pretraining_at_its_extremes(tmp_path, pre_yaml, old_run, guarded):
    cache = f"corpus.cache_dir={tmp_path / 'cache'}"
    refused(lambda: pretrain(pre_yaml, old_run, "method.mlm_probability=1e-4"),
            "masks fewer than one token per optimizer step", "raise method.mlm_probability")
    refused(lambda: pretrain(pre_yaml, old_run, "training.train_batch_size=1", "training.micro_batch_size=1"),
            "method.name=codir contrasts each block with the other blocks of its global batch", "at least 2")
    specials = write(tmp_path / "specials.txt", "[MASK] [CLS] [SEP]\n" * 300)
    refused(lambda: pretrain(pre_yaml, old_run, f"corpus.sources=[{specials}]", cache),
            "holds only special tokens", "never masked", "ordinary text")
    refused(lambda: pretrain(pre_yaml, old_run, "corpus.max_documents=3", "corpus.validation_blocks=1",
                             "training.deterministic=true", cache),
            "training blocks, fewer than one global batch of 8")
    refused(lambda: pretrain(pre_yaml, old_run, "logging.log_every=0"), "'logging.log_every'")


def test_k_borderline_values_pass_the_checks(tmp_path, tiny_config, tiny_teacher, pre_yaml, old_run, guarded):
    """The limits themselves are accepted: nothing is refused that can train."""
    tok = f"model.tokenizer={tiny_teacher}"
    passes_the_checks(lambda: finetune(tiny_config, old_run, "data.max_length=512"))
    passes_the_checks(lambda: finetune(tiny_config, old_run, "data.max_length=3", "training.seed=9007199254740991",
                                       "model.dropout=0", "training.weight_decay=0", "logging.log_every=1000"))
    two = write(tmp_path / "two.csv", rows_csv(["0.5", "0.75"] * 6))  # two distinct targets, in both splits
    passes_the_checks(lambda: finetune(tiny_config, old_run, *files_args(two, two), "data.task_type=regression",
                                       *NO_TEACHER, tok))
    some_blank = write(tmp_path / "some_blank.jsonl", rows_jsonl(["", " ", "a film"] * 4, ["pos", "neg"] * 6))
    passes_the_checks(lambda: finetune(tiny_config, old_run, *files_args(some_blank, some_blank), *NO_TEACHER, tok))
    passes_the_checks(lambda: pretrain(pre_yaml, old_run, "method.mlm_probability=0.005"))  # 1.2 masked per step


def test_k_one_row_per_class_of_long_and_emoji_texts_trains(tmp_path, tiny_config, single_process_env):
    """Borderline but valid, in one tiny codir run: one training row per class (the bank and the class
    negatives hold one example each), a text far longer than data.max_length (truncated), emoji and
    non-Latin text, and a blank validation text."""
    from codir_ds.recipes import run_finetune
    train = write(tmp_path / "train.jsonl", rows_jsonl(["a long film " * 3000, "😀🎬🔥 東京 café ☕"],
                                                       ["pos", "neg"]))
    val = write(tmp_path / "val.jsonl", rows_jsonl(["", "naïve 🎞️ Ελληνικά"], ["pos", "neg"]))
    cfg = load_config(str(tiny_config), [*files_args(train, val), "training.max_steps=1"])
    results = run_finetune(cfg, DS, str(tmp_path / "run"), overwrite=True)
    assert results["steps"] == 1 and results["num_train_examples"] == 2
    assert all(math.isfinite(v) for v in results["final"].values()), results["final"]
