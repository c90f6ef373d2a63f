"""Deployment: parameter counts, the ONNX export (fp32 and int8, loaded and run against PyTorch), the side-by-side
report's fields and ratios, evaluate.py's table, and the one-line errors for bad models.

One tiny 2-layer classifier (label names of movie_snippets) is exported to ONNX once per module; latencies are
measured with a few repeats only to check the report's arithmetic, never compared with a threshold.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import REPO, python_launch
from test_front_door import _ok
from test_launchers_eval_export import _assert_one_line_error, launch_inprocess
from codir_ds.config import load_config
from codir_ds.data.collate import ClassificationCollator
from codir_ds.data.tasks import load_task
from codir_ds.deploy import onnx_export
from codir_ds.deploy.report import LatencySpec, build_report, latency_stats, render_markdown
from codir_ds.models.size import counts_from_config, parameter_counts, size_comparison

SHIPPED = "configs/fine_movie_snippets_cpu.yaml"
SMALL = ["data.max_train_examples=16", "data.max_eval_examples=40", "data.max_length=24"]


def _tiny_classifier(out: Path, label_names=("negative", "positive"), max_positions: int = 512, seed: int = 0):
    from codir_ds.assets import minilm_dir
    from codir_ds.models.loading import build_student, export_student, load_tokenizer
    tok = load_tokenizer(minilm_dir())
    torch.manual_seed(seed)
    cfg = SimpleNamespace(init_from=None, student_init=None, student_init_layers=None, student_layers=2,
                          student_hidden=32, student_heads=2, student_intermediate=64, dropout=0.1)
    model = build_student(cfg, num_labels=len(label_names), is_regression=False, tokenizer=tok,
                          label_names=list(label_names))
    if max_positions != 512:
        model.config.max_position_embeddings = max_positions
    export_student(model, tok, out, {"task": "movie_snippets"})
    return out


@pytest.fixture(scope="module")
def task():
    return load_task(load_config(SHIPPED, SMALL, evaluation=True).data)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    return _tiny_classifier(tmp_path_factory.mktemp("deploy") / "export")


@pytest.fixture(scope="module")
def onnx_dirs(classifier, task) -> list[Path]:
    return onnx_export.export_onnx(classifier, classifier.with_name("export_onnx"), task, 24, quantize="int8")


# --------------------------------------------------------------------------- sizes

def test_parameter_counts_match_a_hand_computation(classifier):
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(str(classifier))
    V, P, T, H, I, L, C = 30522, 512, 2, 32, 64, 2, 2
    embeddings = V * H + P * H + T * H + 2 * H                     # word, position, segment, LayerNorm
    layer = 4 * (H * H + H) + 2 * H + (H * I + I) + (I * H + H) + 2 * H  # attention, its LN, FFN, its LN
    head = (H * H + H) + (H * C + C)                                # pooler, classifier
    counts = parameter_counts(model)
    assert counts == {"total": embeddings + L * layer + head, "embeddings": embeddings,
                      "non_embedding": L * layer + head}
    assert counts_from_config(classifier) == counts  # from config.json alone, on the meta device


def test_size_comparison_says_how_much_smaller():
    text = size_comparison({"total": 10_000_000, "non_embedding": 2_000_000},
                           {"total": 25_000_000, "non_embedding": 12_000_000})
    assert text == ("student 10.0M parameters (teacher 25.0M: 2.5x fewer; without embeddings 2.0M vs 12.0M)")
    assert size_comparison({"total": 10, "non_embedding": 5}, None) == "student 10 parameters"


# --------------------------------------------------------------------------- ONNX export

def _pytorch_logits(model_dir: Path, batches) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                token_type_ids=b["token_type_ids"]).logits for b in batches])


def test_onnx_fp32_and_int8_load_run_and_match_pytorch(classifier, onnx_dirs, task):
    import onnxruntime as ort
    from transformers import AutoTokenizer
    fp32, int8 = onnx_dirs
    assert fp32.name == "export_onnx" and int8.name == "export_onnx_int8"
    # an independent check on examples the export's own check did not use (the training split)
    collator = ClassificationCollator(AutoTokenizer.from_pretrained(str(fp32)), 24, False)
    batches = [collator(task.train[i:i + 8]) for i in range(0, len(task.train), 8)]
    reference = _pytorch_logits(classifier, batches)
    outputs = {}
    for d in onnx_dirs:
        assert {"model.onnx", "config.json", "codir_onnx.json", "tokenizer.json"} <= {f.name for f in d.iterdir()}
        session = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        outputs[d] = torch.from_numpy(np.concatenate([session.run(None, {n: b[n].numpy() for n in names})[0]
                                                      for b in batches]))
    torch.testing.assert_close(outputs[fp32], reference, atol=onnx_export.FP32_ATOL, rtol=0)
    assert (outputs[int8].argmax(-1) == reference.argmax(-1)).float().mean() >= onnx_export.INT8_MIN_AGREEMENT
    assert not torch.equal(outputs[int8], outputs[fp32])  # quantized for real
    manifests = [json.loads((d / "codir_onnx.json").read_text()) for d in onnx_dirs]
    assert [m["precision"] for m in manifests] == ["fp32", "int8 (dynamic)"]
    for m in manifests:
        assert m["parity"]["passed"] and m["parity"]["examples"] == 40 and m["task"] == "movie_snippets"
        assert m["params"] == counts_from_config(classifier)
    assert manifests[0]["parity"]["max_abs_logit_diff"] <= onnx_export.FP32_ATOL
    assert (int8 / "model.onnx").stat().st_size < 0.6 * (fp32 / "model.onnx").stat().st_size


@pytest.mark.parametrize("what", ["fp32", "int8"])
def test_a_failing_parity_check_writes_nothing(classifier, task, tmp_path, monkeypatch, what):
    from codir_ds.errors import CodirError
    if what == "fp32":
        monkeypatch.setattr(onnx_export, "FP32_ATOL", -1.0)
    else:
        monkeypatch.setattr(onnx_export, "INT8_MIN_AGREEMENT", 1.01)
        monkeypatch.setattr(onnx_export, "INT8_ATOL", -1.0)
    out = tmp_path / "onnx"
    with pytest.raises(CodirError) as info:
        onnx_export.export_onnx(classifier, out, task, 24, quantize="int8")
    assert "fails its check" in str(info.value) and "nothing was written" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the report

def test_int8_rule_accepts_flips_only_where_the_model_is_undecided():
    reference = torch.tensor([[0.00, 0.01], [0.02, 0.00], [-3.0, 3.0], [2.0, -2.0]])
    near = reference + torch.tensor([[0.02, -0.02], [-0.03, 0.0], [0.0, 0.0], [0.0, 0.0]])  # two near-ties flip
    result = onnx_export._parity(reference, near, "int8", regression=False)
    assert result["prediction_agreement"] == 0.5 and result["passed"]  # within INT8_ATOL
    broken = reference.flip(-1)  # every logit off by as much as they vary
    assert not onnx_export._parity(reference, broken, "int8", regression=False)["passed"]
    assert not onnx_export._parity(reference, near, "fp32", regression=False)["passed"]


def test_latency_stats_are_the_median_and_95th_percentile():
    times = [t / 1000 for t in range(1, 21)]  # 1..20 ms
    stats = latency_stats(times, batch_size=4)
    assert stats["median_ms"] == pytest.approx(10.5) and stats["repeats"] == 20
    assert stats["p95_ms"] == pytest.approx(19.05)  # linear interpolation between 19 and 20 ms
    assert stats["examples_per_s"] == pytest.approx(4 / 0.0105, abs=0.1)


def test_report_fields_and_ratios(classifier, onnx_dirs, task):
    report = build_report([f"pt={classifier}", str(onnx_dirs[0]), f"int8={onnx_dirs[1]}"], task, "validation", 24,
                          16, LatencySpec((1, 4), warmup=1, repeats=3), progress=lambda line: None)
    assert report["num_examples"] == 40 and report["main_metric"] == "accuracy" and report["max_length"] == 24
    assert {"cpu", "threads", "torch", "onnxruntime", "device"} <= set(report["environment"])
    pt, fp32, int8 = report["models"]
    assert [r["name"] for r in report["models"]] == ["pt", "export_onnx", "int8"]
    assert [(r["backend"], r["precision"]) for r in report["models"]] == [
        ("pytorch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8 (dynamic)")]
    assert pt["params"] == fp32["params"] == int8["params"] == counts_from_config(classifier)
    assert fp32["metrics"] == pt["metrics"]  # same predictions within 1e-4 on every logit
    assert int8["disk_bytes"] < fp32["disk_bytes"]
    assert pt["vs_reference"] is None
    for row in (fp32, int8):
        assert set(row["latency"]) == {"1", "4"}
        for bs, lat in row["latency"].items():
            assert lat["repeats"] == 3 and 0 < lat["median_ms"] <= lat["p95_ms"]
            assert row["vs_reference"]["speedup"][bs] == pytest.approx(
                pt["latency"][bs]["median_ms"] / lat["median_ms"], abs=0.01)
        assert row["vs_reference"]["params_ratio"] == row["vs_reference"]["non_embedding_params_ratio"] == 1.0
        assert row["vs_reference"]["metric_kept"] == pytest.approx(row["metrics"]["accuracy"]
                                                                   / pt["metrics"]["accuracy"], abs=1e-4)
    table = render_markdown(report)
    assert "| pt | pytorch fp32 |" in table and "| int8 | onnxruntime int8 (dynamic) |" in table
    assert "b1 ms (median / p95)" in table and "speed-up b4" in table and "accuracy kept" in table


def test_report_on_the_test_split(classifier, task):
    report = build_report([str(classifier)], task, "test", 24, 16, LatencySpec(repeats=0), progress=lambda line: None)
    assert report["split"] == "test" and report["num_examples"] == len(task.test) == 40
    assert "test split (40 examples)" in render_markdown(report)
    from codir_ds.errors import CodirError
    with pytest.raises(CodirError, match="test split of task 'movie_snippets' is empty"):
        build_report([str(classifier)], load_task(load_config(SHIPPED, SMALL + ["data.test_fraction=0"],
                                                              evaluation=True).data), "test", 24, 16,
                     LatencySpec(repeats=0))


def test_evaluate_prints_the_table_and_writes_json_and_markdown(classifier, onnx_dirs, tmp_path):
    sets = [x for s in SMALL for x in ("--set", s)]
    args = ["--config", SHIPPED, *sets, "--model", f"teacher={classifier}", "--model", f"int8={onnx_dirs[1]}",
            "--repeats", "2", "--warmup", "1", "--latency_batch_sizes", "1", "2", "--threads", "1"]
    proc = _ok(python_launch("launchers/evaluate.py", args + ["--output", str(tmp_path / "r.json")]))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["environment"]["threads"] == 1 and report["latency_spec"]["batch_sizes"] == [1, 2]
    assert proc.stdout.strip() == render_markdown(report)
    assert "[report] teacher (pytorch fp32)" in proc.stderr
    proc = _ok(python_launch("launchers/evaluate.py", args + ["--output", str(tmp_path / "r.md"), "--repeats", "0"]))
    assert (tmp_path / "r.md").read_text().strip() == proc.stdout.strip()
    assert "ms (median" not in proc.stdout  # --repeats 0: metrics and sizes only


# --------------------------------------------------------------------------- bad input

def _evaluate_error(capsys, *models, extra=()):
    args = ["--config", SHIPPED, *[x for s in SMALL for x in ("--set", s)], *extra]
    for m in models:
        args += ["--model", str(m)]
    code, out, err = launch_inprocess("launchers/evaluate.py", args, capsys)
    assert "[report]" not in err  # refused before the first model was measured
    return _assert_one_line_error(code, err)


def test_a_masked_lm_is_not_a_classifier(classifier, tiny_mlm_teacher, capsys):
    line = _evaluate_error(capsys, classifier, tiny_mlm_teacher)
    assert "is not a sequence classifier" in line and "export/" in line


def test_an_onnx_directory_with_a_file_missing(onnx_dirs, classifier, tmp_path, capsys):
    for missing, named in (("model.onnx", "model.onnx"), ("tokenizer.json", "a tokenizer"),
                           ("codir_onnx.json", "codir_onnx.json")):
        broken = tmp_path / f"no_{missing}"
        shutil.copytree(onnx_dirs[0], broken)
        for f in [missing] + (["vocab.txt"] if missing == "tokenizer.json" else []):
            (broken / f).unlink(missing_ok=True)
        line = _evaluate_error(capsys, classifier, broken)
        assert f"lacks {named}" in line and "launchers/export.py --onnx" in line, line


def test_positions_shorter_than_max_length(tmp_path, capsys):
    short = _tiny_classifier(tmp_path / "short", max_positions=16)
    line = _evaluate_error(capsys, short)
    assert "has 16 positions, fewer than data.max_length 24" in line and "data.max_length=16" in line


def test_a_label_set_other_than_the_tasks(tmp_path, capsys):
    other = _tiny_classifier(tmp_path / "other", label_names=("neg", "pos"))
    line = _evaluate_error(capsys, other)
    assert "['neg', 'pos']" in line and "['negative', 'positive']" in line


def test_onnx_without_the_runtime_installed(onnx_dirs, classifier, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    line = _evaluate_error(capsys, onnx_dirs[0])
    assert "needs the Python package 'onnxruntime'" in line and "pip install" in line
    out = tmp_path / "never"
    code, _, err = launch_inprocess("launchers/export.py", ["--onnx", "--model", str(classifier), "--config", SHIPPED,
                                                            "--output_dir", str(out)], capsys)
    assert "'onnxruntime'" in _assert_one_line_error(code, err) and not out.exists()


def test_export_argument_errors(classifier, onnx_dirs, capsys):
    for args, says in ((["--model", str(classifier)], "only apply to an ONNX export"),
                       (["--onnx"], "pass either --model DIR"),
                       (["--onnx", "--model", str(classifier), "--tag", "step_1"], "drop them"),
                       (["--onnx", "--model", str(classifier), "--config", SHIPPED], "already exists"),
                       (["--onnx", "--model", str(onnx_dirs[0]), "--config", SHIPPED, "--output_dir",
                         str(classifier.with_name("again"))], "already an ONNX directory")):
        code, _, err = launch_inprocess("launchers/export.py", args, capsys)
        assert says in _assert_one_line_error(code, err), (args, err)


def test_export_without_a_task_asks_for_config(tmp_path, capsys):
    lone = _tiny_classifier(tmp_path / "lone")
    code, _, err = launch_inprocess("launchers/export.py", ["--onnx", "--model", str(lone)], capsys)
    assert "pass --config YAML" in _assert_one_line_error(code, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lone"]


# --------------------------------------------------------------------------- a schedule too short to train

def test_short_schedule_warning_names_steps_examples_and_the_fix():
    from codir_ds.recipes.finetune import MIN_STEPS, short_schedule_warning
    cfg = SimpleNamespace(training=SimpleNamespace(max_steps=0, epochs=2.0))
    # the 300-row CSV a new user tried: 10 steps per epoch at batch 32, 2 epochs -> 20 steps
    text = short_schedule_warning(20, 300, cfg, 32, 10)
    assert text.startswith("warning: this run makes only 20 optimizer steps (300 training examples, batch 32, "
                           "2 epoch(s) of 10 step(s))")
    assert f"--set training.epochs={MIN_STEPS // 10} gives {MIN_STEPS} steps" in text
    assert short_schedule_warning(MIN_STEPS, 300, cfg, 32, 10) is None
    cfg.training.max_steps = 6
    assert "training.max_steps=6" in short_schedule_warning(6, 300, cfg, 32, 10)
