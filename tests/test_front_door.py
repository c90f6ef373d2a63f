"""What a new user meets first: the README's commands, the commands errors suggest, batch-job logs,
exporting any run, evaluating without distillation settings, free ports, and model-init settings.

Each test follows a command a user types (or one a message tells them to type) with tiny settings
appended, so a broken example or hint fails here rather than on a user's machine.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY_YAML, python_launch
from test_bad_inputs import launcher_error
from codir_ds.config import ModelConfig, load_config
from codir_ds.distill.methods import read_by
from codir_ds.errors import CodirError

DS = str(REPO / "ds_configs" / "zero2.json")
SHIPPED = "configs/fine_movie_snippets_cpu.yaml"

# Appended to every finetuning command a doc or an error shows: the same job, a few seconds long.
TINY_FINETUNE = ["data.max_train_examples=16", "data.max_eval_examples=16", "data.max_length=16",
                 "training.max_steps=1", "training.train_batch_size=8", "training.micro_batch_size=8",
                 "training.eval_batch_size=16", "method.num_negatives=4", "logging.progress_bar=false"]


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"
    return proc


def readme_commands() -> list[str]:
    """The launcher commands of the README's ``bash`` blocks, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(line.split("#")[0].split())
            if re.match(r"(python|deepspeed) launchers/", line):
                commands.append(line)
    return commands


def tiny(argv: list[str], runs: Path) -> list[str]:
    """``argv`` with ``runs/`` under ``runs`` and tiny settings appended (finetuning and evaluation)."""
    argv = [a.replace("runs/", f"{runs}/") for a in argv]
    script = next(a for a in argv if a.startswith("launchers/"))
    sets = {"launchers/finetune.py": TINY_FINETUNE,
            "launchers/export.py": ["data.max_eval_examples=16"],
            "launchers/evaluate.py": ["data.max_eval_examples=16", "training.eval_batch_size=16"]}[script]
    timing = ["--repeats", "2", "--warmup", "0"] if script == "launchers/evaluate.py" else []  # latency: 2 passes
    named = [a.split("=", 1)[1] for a in argv if a.startswith("method.name=")]
    if script == "launchers/finetune.py" and named:  # a method.* key only for the methods that read it
        sets = read_by(named[-1], sets)
    return argv + [x for s in sets for x in ("--set", s)] + timing


def run_user_command(argv: list[str]) -> subprocess.CompletedProcess:
    """Run ``argv`` as typed in a shell with the project's environment (``deepspeed`` is the venv's)."""
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(PATH=bin_dir + os.pathsep + env.get("PATH", ""), OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    if argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    return subprocess.run(argv, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=420)


# --------------------------------------------------------------------------- the README's commands

def test_readme_finetuning_example_runs_as_written(tmp_path):
    commands = readme_commands()
    assert [c.split()[:2] for c in commands] == [["python", "launchers/finetune.py"],
                                                 ["deepspeed", "launchers/finetune.py"],
                                                 ["python", "launchers/export.py"],
                                                 ["python", "launchers/evaluate.py"]], commands
    for command in commands:
        proc = _ok(run_user_command(tiny(shlex.split(command), tmp_path / "runs")))
    report = json.loads((tmp_path / "runs" / "my_codir" / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["teacher", "codir", "codir_onnx", "codir_int8"]
    assert [m["precision"] for m in report["models"]] == ["fp32", "fp32", "fp32", "int8 (dynamic)"]
    assert all(0.0 <= m["metrics"]["accuracy"] <= 1.0 and set(m["latency"]) == {"1", "32"} for m in report["models"])
    assert report["models"][2]["metrics"] == report["models"][1]["metrics"]  # ONNX fp32 predicts what PyTorch does
    assert "| teacher | pytorch fp32 |" in proc.stdout
    export = tmp_path / "runs" / "my_codir" / "export"
    assert json.loads((export / "config.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}


# --------------------------------------------------------------------------- commands errors suggest

def _suggested_command(message: str) -> list[str]:
    commands = re.findall(r"`([^`]+)`", message)
    assert len(commands) == 1, message
    return shlex.split(commands[0])


def test_missing_teacher_hint_is_a_complete_command(tmp_path):
    """The finetuning hint names every required launcher argument, with the user's own config; it trains."""
    with pytest.raises(CodirError) as info:
        load_config(SHIPPED, [], stage="finetune")
    argv = _suggested_command(str(info.value))
    assert argv[:2] == ["python", "launchers/finetune.py"]
    assert {"--deepspeed_config", "--config", "--output_dir"} <= set(argv) and SHIPPED in argv
    assert "model.teacher=runs/teacher/export" in str(info.value)
    _ok(run_user_command(tiny(argv, tmp_path / "runs")))
    assert (tmp_path / "runs" / "teacher" / "export" / "config.json").is_file()


def test_missing_teacher_hint_for_pretraining_names_the_head_launcher(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the hint depends on what runs/teacher_mlm holds in the current directory
    with pytest.raises(CodirError) as info:
        load_config(str(REPO / "configs" / "pre_codir_cpu.yaml"), ["model.teacher=null"], stage="pretrain")
    argv = _suggested_command(str(info.value))
    assert argv[0] == "python" and Path(argv[1]) == REPO / "launchers" / "fit_teacher_head.py"
    assert "--output_dir" in argv
    assert "model.teacher=all-MiniLM-L6-v2 with method.alpha_kd=0" in str(info.value)


def test_teacher_without_a_head_hint_finetunes_that_teacher(tmp_path, tiny_mlm_teacher, single_process_env):
    from codir_ds.recipes import run_finetune
    cfg = load_config(None, [f"model.teacher={tiny_mlm_teacher}", "method.name=kd", "model.student_layers=1",
                             "model.student_hidden=32", *read_by("kd", TINY_FINETUNE)], stage="finetune")
    with pytest.raises(CodirError) as info:
        run_finetune(cfg, DS, str(tmp_path / "run"))
    argv = _suggested_command(str(info.value))
    assert f"model.student_init={tiny_mlm_teacher}" in argv and "--output_dir" in argv
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- logs in batch jobs

def test_without_a_progress_bar_a_plain_line_every_log_every_steps(tmp_path, tiny_config, single_process_env,
                                                                  capsys):
    from codir_ds.recipes import run_finetune
    cfg = load_config(str(tiny_config), ["logging.log_every=2", "logging.progress_bar=false"])
    run_finetune(cfg, DS, str(tmp_path / "run"))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if re.match(r"codir step \d+/6 ", ln)]
    assert [ln.split()[2] for ln in lines] == ["2/6", "4/6", "6/6"], lines
    pattern = (r"codir step 2/6 \(33%\) \| loss [\d.e+-]+ \| crd [\d.e+-]+ \| kd [\d.e+-]+ \| task [\d.e+-]+ \| "
               r"lr [\d.e+-]+ \| [\d.]+ samples/s \| elapsed \d+s \| eta \d+s")
    assert re.fullmatch(pattern, lines[0]), lines[0]


def test_log_line_format():
    from codir_ds.engine.monitor import Monitor, duration
    assert [duration(s) for s in (0.4, 59, 61, 3599, 3600 * 2 + 180, float("nan"))] == \
        ["0s", "59s", "1m01s", "59m59s", "2h03m", "?"]
    m = Monitor(Path("."), enabled=True, tensorboard=False, progress_bar=False, total_steps=100, initial_step=20,
                desc="kd")
    line = m.log_line(30, {"loss/total": 1.5, "loss/kd": 0.25, "train/lr": 1e-4, "perf/samples_per_s": 12.34,
                           "train/loss_scale": 1024.0}, elapsed=20.0)
    assert line == ("kd step 30/100 (30%) | loss 1.5 | kd 0.25 | lr 1.00e-04 | loss scale 1024 | 12.3 samples/s | "
                    "elapsed 20s | eta 2m20s")


# --------------------------------------------------------------------------- export any run, evaluate any model

@pytest.fixture(scope="module")
def stopped_before_evaluating(tmp_path_factory, tiny_teacher) -> Path:
    """A finetuning run stopped at step 2 (training.stop_at_step) that never evaluated: no export/."""
    cfg = tmp_path_factory.mktemp("stopped_cfg") / "tiny.yaml"
    cfg.write_text(TINY_YAML.format(teacher=tiny_teacher))
    out = tmp_path_factory.mktemp("stopped") / "run"
    _ok(python_launch("launchers/finetune.py", ["--deepspeed_config", DS, "--config", str(cfg), "--set",
                                                "training.stop_at_step=2", "--output_dir", str(out)]))
    assert not (out / "export").exists() and (out / "architecture" / "config.json").is_file()
    return out


def test_export_a_run_stopped_before_its_first_evaluation(stopped_before_evaluating, tmp_path):
    from transformers import pipeline
    out = tmp_path / "exported"
    proc = _ok(python_launch("launchers/export.py", ["--run_dir", str(stopped_before_evaluating),
                                                     "--output_dir", str(out)]))
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    manifest = json.loads((out / "codir_export.json").read_text())
    assert manifest["tag"] == "step_00000002" and manifest["task"] == "movie_snippets"
    classify = pipeline("text-classification", model=str(out), device="cpu")
    assert classify("a wonderful, moving film")[0]["label"] in ("negative", "positive")


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory, tiny_mlm_teacher, corpus_file) -> Path:
    from test_bad_inputs import PRE_YAML
    root = tmp_path_factory.mktemp("pre_export")
    cfg = root / "pre.yaml"
    cfg.write_text(PRE_YAML.format(teacher=tiny_mlm_teacher, corpus=corpus_file, cache=root / "cache"))
    out = root / "run"
    _ok(python_launch("launchers/pretrain.py", ["--deepspeed_config", DS, "--config", str(cfg),
                                                "--output_dir", str(out)]))
    return out


def test_export_a_pretraining_checkpoint_as_a_masked_lm(pretrain_run, tmp_path):
    from transformers import AutoModelForMaskedLM
    out = tmp_path / "exported"
    _ok(python_launch("launchers/export.py", ["--run_dir", str(pretrain_run), "--output_dir", str(out)]))
    model = AutoModelForMaskedLM.from_pretrained(str(out))
    assert type(model).__name__.endswith("ForMaskedLM")
    assert json.loads((out / "codir_export.json").read_text())["stage"] == "pretrain"
    # the last checkpoint is the model the run exported at its end
    ours, theirs = load_file(out / "model.safetensors"), load_file(pretrain_run / "export" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0, msg=k)


def test_evaluate_needs_no_distillation_settings(tiny_teacher):
    """The shipped distillation config names codir without a teacher: evaluating a model needs neither."""
    out = tiny_teacher.parent / "no_distillation_settings.json"
    _ok(python_launch("launchers/evaluate.py", ["--model", str(tiny_teacher), "--config", SHIPPED,
                                                "--set", "data.max_eval_examples=8", "--repeats", "0",
                                                "--output", str(out)]))
    assert set(json.loads(out.read_text())["models"][0]["metrics"]) == {"accuracy", "f1"}


# --------------------------------------------------------------------------- ports

def test_a_busy_master_port_is_one_error_line(tiny_config, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        proc = subprocess.run([sys.executable, "launchers/finetune.py", "--deepspeed_config", DS, "--config",
                               str(tiny_config), "--output_dir", str(tmp_path / "run")], cwd=str(REPO),
                              env={**env, "MASTER_PORT": str(port)}, capture_output=True, text=True, timeout=240)
    launcher_error(proc, f"MASTER_PORT {port}", "already in use", "MASTER_PORT=")


def test_a_single_process_picks_a_free_port(monkeypatch):
    import deepspeed
    from codir_ds.engine import distributed
    seen = {}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: seen.update(port=os.environ["MASTER_PORT"]))
    monkeypatch.setattr(distributed.atexit, "register", lambda fn: None)
    with socket.socket() as busy:  # the old hard-wired port, taken by another job
        try:
            busy.bind(("127.0.0.1", 29500))
        except OSError:
            pass  # already taken: just as good
        distributed.init_distributed()
    assert seen["port"] != "29500" and int(seen["port"]) > 0


# --------------------------------------------------------------------------- model initialisation

def test_init_from_on_the_command_line_replaces_the_configs_student_init():
    cfg = load_config(SHIPPED, ["model.teacher=x", "model.init_from=runs/pre_codir_cpu"])
    assert (cfg.model.init_from, cfg.model.student_init, cfg.model.student_init_layers) == \
        ("runs/pre_codir_cpu", None, None)
    cfg = load_config("configs/pre_paper_stage2_codir.yaml", ["model.student_init=all-MiniLM-L6-v2"])
    assert (cfg.model.init_from, cfg.model.student_init) == (None, "all-MiniLM-L6-v2")
    with pytest.raises(CodirError, match="both set"):  # both in the same place is still ambiguous
        load_config(SHIPPED, ["model.teacher=x", "model.init_from=a", "model.student_init=b"])


def test_a_regression_student_from_a_classifier_export(tiny_teacher):
    """STS-B after SST-2: the 2-way classifier's body with a new 1-output regression head."""
    from codir_ds.models.loading import build_student, load_tokenizer
    tok = load_tokenizer(tiny_teacher)
    for key in ("init_from", "student_init"):
        student = build_student(ModelConfig(**{key: str(tiny_teacher)}), 1, True, tok)
        assert (student.config.num_labels, student.config.problem_type) == (1, "regression")
        assert student.classifier.out_features == 1
    named = build_student(ModelConfig(student_init=str(tiny_teacher)), 3, False, tok, label_names=["a", "b", "c"])
    assert named.config.id2label == {0: "a", 1: "b", 2: "c"} and named.config.label2id == {"a": 0, "b": 1, "c": 2}
