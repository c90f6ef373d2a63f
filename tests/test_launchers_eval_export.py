"""launchers/evaluate.py and launchers/export.py on a real (tiny) finetuning run.

One single-process ZeRO-2 finetune (6 steps, checkpoints at steps 3 and 6) is shared
by the module. The success paths run the launchers as subprocesses, like a user;
the error paths and the extra export run them in-process (``runpy``, same argv and
exit status) because every subprocess pays ~5 s of imports on a 2-core machine.
"""
from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY_YAML, python_launch

DS = str(REPO / "ds_configs" / "zero2.json")


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory, tiny_teacher) -> Path:
    path = tmp_path_factory.mktemp("eval_export_cfg") / "tiny.yaml"
    path.write_text(TINY_YAML.format(teacher=tiny_teacher))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_yaml) -> Path:
    """A finished 6-step codir run with complete checkpoints step_00000003 and step_00000006."""
    out = tmp_path_factory.mktemp("eval_export") / "run"
    proc = python_launch("launchers/finetune.py", ["--deepspeed_config", DS, "--config", str(tiny_yaml),
                                                   "--set", "training.checkpoint_every=3", "--output_dir", str(out)])
    _ok(proc)
    (out.parent / "launch.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    return out


def launch_inprocess(script: str, args: list[str], capsys) -> tuple[int, str, str]:
    """Run a launcher's ``__main__`` in this process: ``(exit status, stdout, stderr)``."""
    with mock.patch.object(sys, "argv", [str(REPO / script), *args]), \
            mock.patch.object(sys, "path", list(sys.path)), mock.patch.dict("os.environ"):
        with pytest.raises(SystemExit) as info:
            runpy.run_path(str(REPO / script), run_name="__main__")
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def _assert_one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


# --------------------------------------------------------------------------- evaluate


def test_evaluate_export_matches_best_metrics_of_the_run(run, tiny_yaml, tmp_path):
    results = json.loads((run / "results.json").read_text())
    best = {k: v for k, v in results["best"].items() if k != "step"}
    out_file = tmp_path / "report.json"
    proc = python_launch("launchers/evaluate.py", ["--model", str(run / "export"), "--config", str(tiny_yaml),
                                                   "--output", str(out_file), "--repeats", "0"])
    _ok(proc)
    report = json.loads(out_file.read_text())
    printed = report["models"][0]["metrics"]
    assert set(printed) == set(best) == {"accuracy", "f1"}
    for k in best:
        assert printed[k] == pytest.approx(best[k], abs=1e-6), k
    assert f"| {printed['accuracy']:.4f} |" in proc.stdout  # the table on stdout shows the main metric


def test_results_record_parameter_counts_and_the_start_up_line_compares_them(run, tiny_yaml):
    from codir_ds.models.size import counts_from_config, human_count
    results = json.loads((run / "results.json").read_text())
    student, teacher = counts_from_config(run / "export"), counts_from_config(results_teacher(tiny_yaml))
    assert results["parameters"] == {"student": student, "teacher": teacher}
    # the packaged task's test split (first data.max_eval_examples of it), scored once at the end
    assert results["num_test_examples"] == 24 and set(results["test"]) == {"accuracy", "f1"}
    assert student["total"] < teacher["total"]
    log = (run.parent / "launch.log").read_text()
    assert (f"student {human_count(student['total'])} parameters (teacher {human_count(teacher['total'])}: "
            f"{teacher['total'] / student['total']:.1f}x fewer") in log
    # 6 optimizer steps: the run says at start-up that its schedule is too short to move a student
    assert "warning: this run makes only 6 optimizer steps" in log and "raise training" in log
    assert f"test split (24 examples, final model): accuracy {results['test']['accuracy']:.4f}" in log


def results_teacher(tiny_yaml) -> Path:
    import yaml
    return Path(yaml.safe_load(tiny_yaml.read_text())["model"]["teacher"])


def test_evaluate_wrong_num_labels_is_one_line_error(run, tiny_yaml, capsys):
    code, out, err = launch_inprocess("launchers/evaluate.py", ["--model", str(run / "export"), "--config",
                                                                str(tiny_yaml), "--set", "data.task=trec6"], capsys)
    line = _assert_one_line_error(code, err)
    assert "2-way" in line and "trec6" in line and out == ""


def test_evaluate_rejects_corrupted_weights(run, tiny_yaml, tmp_path, capsys):
    bad = tmp_path / "export"
    shutil.copytree(run / "export", bad)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte of the last tensor: still loadable, so only the checksum can tell
    weights.write_bytes(bytes(data))
    code, _, err = launch_inprocess("launchers/evaluate.py", ["--model", str(bad), "--config", str(tiny_yaml)], capsys)
    assert "checksum" in _assert_one_line_error(code, err)


# --------------------------------------------------------------------------- export


def test_export_latest_checkpoint_equals_run_export(run):
    from transformers import AutoModelForSequenceClassification

    proc = python_launch("launchers/export.py", ["--run_dir", str(run)])
    _ok(proc)
    out = run / "export_step_00000006"
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    # No eval_every: the run's export/ is the final (= best) model, i.e. the step-6 checkpoint's weights.
    a, b = _weights(run / "export"), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == torch.float32
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0, msg=k)
    manifest = json.loads((out / "codir_export.json").read_text())
    assert manifest["tag"] == "step_00000006" and manifest["step"] == 6
    assert manifest["task"] == "movie_snippets" and manifest["method"] == "codir"
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 2


def test_export_earlier_tag_gives_other_weights(run, tmp_path, capsys):
    out = tmp_path / "step3"
    code, stdout, err = launch_inprocess("launchers/export.py", ["--run_dir", str(run), "--tag", "step_00000003",
                                                                 "--output_dir", str(out)], capsys)
    assert code == 0, err
    assert stdout.strip() == str(out)
    early, final = _weights(out), _weights(run / "export")
    assert early.keys() == final.keys()
    assert any(not torch.equal(early[k], final[k]) for k in final)
    assert json.loads((out / "codir_export.json").read_text())["step"] == 3


def test_export_bad_tag_names_available_tags(run, capsys):
    code, _, err = launch_inprocess("launchers/export.py", ["--run_dir", str(run), "--tag", "step_99"], capsys)
    line = _assert_one_line_error(code, err)
    assert "step_99" in line and "step_00000003" in line and "step_00000006" in line


def test_export_incomplete_checkpoint_is_refused(run, tmp_path, capsys):
    fake = tmp_path / "run"
    (fake / "checkpoints" / "step_00000003").mkdir(parents=True)  # no COMPLETE file, no other checkpoint
    code, _, err = launch_inprocess("launchers/export.py", ["--run_dir", str(fake)], capsys)
    assert "no complete checkpoint" in _assert_one_line_error(code, err)
    shutil.copytree(run / "checkpoints" / "step_00000006", fake / "checkpoints" / "step_00000006")
    code, _, err = launch_inprocess("launchers/export.py", ["--run_dir", str(fake), "--tag", "step_00000003"], capsys)
    assert "incomplete" in _assert_one_line_error(code, err)
    code, _, err = launch_inprocess("launchers/export.py", ["--run_dir", str(fake)], capsys)  # no export/ yet
    assert "config.json" in _assert_one_line_error(code, err)


def test_export_refuses_non_empty_output_dir_without_overwrite(run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["--run_dir", str(run), "--output_dir", str(out)]
    code, _, err = launch_inprocess("launchers/export.py", args, capsys)
    assert "--overwrite" in _assert_one_line_error(code, err)
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = launch_inprocess("launchers/export.py", args + ["--overwrite"], capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    # --overwrite never reaches the run itself.
    code, _, err = launch_inprocess("launchers/export.py", ["--run_dir", str(run), "--output_dir", str(run),
                                                            "--overwrite"], capsys)
    _assert_one_line_error(code, err)
    assert (run / "checkpoints").is_dir()


def test_export_missing_run_dir(tmp_path, capsys):
    code, _, err = launch_inprocess("launchers/export.py", ["--run_dir", str(tmp_path / "nope")], capsys)
    assert "does not exist" in _assert_one_line_error(code, err)
