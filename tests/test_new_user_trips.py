"""Five things a new user tripped on, each checked where the user meets it.

1. the missing-MLM-head error names the packaged teacher by its name (not its site-packages path), passes the
   run's --config, and suggests a command that runs as written after docs/pretraining.md's own command;
2. under the ``deepspeed`` launcher our ``error:`` line is the last line (after DeepSpeed's own report) and the
   exit status stays 2;
3. a pipeline whose stages were all reused says so, with the time they took, instead of "0 s";
4. an unknown config key suggests only close matches (``training.lrr`` -> ``training.lr``);
5. a method cannot be registered without a summary, so --help never lists one with a blank description.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, free_port, remove_shm_buffers
from test_bad_inputs import one_line, refused, snapshot
from codir_ds.config import load_config
from codir_ds.errors import CodirError

DS = str(REPO / "ds_configs" / "zero2.json")
PRE_CODIR = str(REPO / "configs" / "pre_codir_cpu.yaml")


# --------------------------------------------------------------------------- 1. the missing-MLM-head error

def _command(message: str) -> list[str] | None:
    """The one command in backticks of ``message`` (None when it has none)."""
    commands = re.findall(r"`([^`]+)`", message)
    assert len(commands) <= 1, message
    return shlex.split(commands[0]) if commands else None


def _fake_head(directory: Path, source: Path) -> None:
    """What launchers/fit_teacher_head.py leaves in ``directory`` for the teacher at ``source`` (the files the
    hint reads; the weights file is a stand-in)."""
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(b"stand-in")
    (directory / "codir_export.json").write_text(json.dumps({"kind": "teacher_with_mlm_head", "source": str(source)}))


def test_missing_head_error_names_the_packaged_teacher_and_the_runs_config(tmp_path, monkeypatch):
    from codir_ds.assets import minilm_dir
    from codir_ds.models.mlm import load_mlm_teacher
    monkeypatch.chdir(tmp_path)
    site = str(minilm_dir())
    # refused at config time (the packaged MiniLM is known to have no head), with the run's YAML
    msg = refused(lambda: load_config(PRE_CODIR, ["method.alpha_kd=0.1"], stage="pretrain"),
                  "teacher 'all-MiniLM-L6-v2' has no masked-LM head", "method.alpha_kd=0")
    assert site not in msg
    argv = _command(msg)
    assert argv[argv.index("--teacher") + 1] == "all-MiniLM-L6-v2"
    assert argv[argv.index("--config") + 1] == PRE_CODIR
    assert argv[argv.index("--output_dir") + 1] == "runs/teacher_mlm"
    assert "set model.teacher=runs/teacher_mlm" in msg
    # the loader, given the resolved site-packages directory (what the recipes pass), says the same
    with pytest.raises(CodirError) as info:
        load_mlm_teacher(site, torch.float32, source=PRE_CODIR)
    msg = one_line(info, "teacher 'all-MiniLM-L6-v2' has no masked-LM head (missing ")
    assert site not in msg and _command(msg)[_command(msg).index("--teacher") + 1] == "all-MiniLM-L6-v2"
    # after docs/pretraining.md's command has filled runs/teacher_mlm: nothing to fit, point at it
    _fake_head(tmp_path / "runs" / "teacher_mlm", minilm_dir())
    msg = refused(lambda: load_config(PRE_CODIR, ["method.alpha_kd=0.1"], stage="pretrain"),
                  "runs/teacher_mlm already holds it", "set model.teacher=runs/teacher_mlm")
    assert _command(msg) is None
    # and the "needs a teacher" hint of pre-training agrees
    msg = refused(lambda: load_config(PRE_CODIR, ["model.teacher=null"], stage="pretrain"),
                  "model.teacher=runs/teacher_mlm, which holds one",
                  "model.teacher=all-MiniLM-L6-v2 with method.alpha_kd=0")
    assert _command(msg) is None


def test_missing_head_command_runs_as_written_next_to_an_existing_output(tmp_path, monkeypatch, tiny_teacher,
                                                                         corpus_file):
    """runs/teacher_mlm already holds something else: the suggested command writes beside it and succeeds."""
    from codir_ds.models.mlm import load_mlm_teacher
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"  # the run's YAML: its corpus is what the head is fitted on
    config.write_text(f"corpus:\n  sources: [{corpus_file}]\n  block_size: 32\n  validation_blocks: 16\n"
                      f"  cache_dir: {tmp_path / 'cache'}\n")
    _fake_head(tmp_path / "runs" / "teacher_mlm", tmp_path / "another_teacher")  # e.g. an earlier head of another
    before = snapshot(tmp_path / "runs" / "teacher_mlm", mtimes=True)
    with pytest.raises(CodirError) as info:
        load_mlm_teacher(str(tiny_teacher), torch.float32, source=str(config))
    msg = one_line(info, "has no masked-LM head", "set model.teacher=runs/teacher_mlm_2")
    argv = _command(msg)
    assert argv[0] == "python" and Path(argv[1]).resolve() == REPO / "launchers" / "fit_teacher_head.py"
    assert "--overwrite" not in argv and argv[argv.index("--config") + 1] == "run.yaml"  # as typed from here
    assert argv[argv.index("--output_dir") + 1] == "runs/teacher_mlm_2"

    # as written, with tiny settings appended (300 steps take a minute even on the tiny teacher)
    proc = subprocess.run([sys.executable, *argv[1:], "--steps", "2", "--batch_size", "8"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert snapshot(tmp_path / "runs" / "teacher_mlm", mtimes=True) == before
    load_mlm_teacher("runs/teacher_mlm_2", torch.float32, need_head=True)  # the head is there, checksum verified
    # asked again, the error now points at that head instead of fitting another
    with pytest.raises(CodirError) as info:
        load_mlm_teacher(str(tiny_teacher), torch.float32, source=str(config))
    msg = one_line(info, "runs/teacher_mlm_2 already holds it", "set model.teacher=runs/teacher_mlm_2")
    assert _command(msg) is None


def test_docs_fit_head_command_is_the_suggested_one(tmp_path, monkeypatch):
    """docs/pretraining.md shows the command the error suggests for its default config."""
    block = re.search(r"```bash\n(python launchers/fit_teacher_head.py.*?)```",
                      (REPO / "docs" / "pretraining.md").read_text(), re.S).group(1)
    documented = shlex.split(block.replace("\\\n", " "))
    monkeypatch.chdir(tmp_path)  # no runs/ here (a checkout's own runs/teacher_mlm would change the suggestion)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    msg = refused(lambda: load_config("configs/pre_codir_cpu.yaml", ["method.alpha_kd=0.1"], stage="pretrain"))
    argv = _command(msg)
    assert Path(argv[1]) == REPO / "launchers" / "fit_teacher_head.py"  # from the repository: launchers/...
    assert [argv[0], "launchers/fit_teacher_head.py", *argv[2:]] == documented


# --------------------------------------------------------------------------- 2. errors under the deepspeed launcher

def test_error_is_the_last_line_under_the_deepspeed_launcher(tmp_path, tiny_config):
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(port),
           str(REPO / "launchers" / "finetune.py"), "--deepspeed_config", DS, "--config", str(tiny_config),
           "--output_dir", str(tmp_path / "run"), "--set", "training.lrr=1e-4"]
    env = {**__import__("os").environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    try:  # one stream, in the order a terminal shows it
        proc = subprocess.run(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=180)
    finally:
        remove_shm_buffers(port)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert lines[-1] == "error: unknown config key 'training.lrr': did you mean 'training.lr'?", proc.stdout[-3000:]
    assert sum(ln.startswith("error:") for ln in lines) == 1
    assert any("exits with return code = 2" in ln for ln in lines[:-1])  # DeepSpeed's report: before ours
    assert "Traceback" not in proc.stdout and not (tmp_path / "run").exists()


def test_plain_python_run_prints_the_error_itself(monkeypatch, capsys):
    """Outside the deepspeed launcher nothing is deferred: the line is printed at once."""
    from codir_ds import cli
    monkeypatch.setenv("LOCAL_RANK", "0")  # as torchrun sets it: the parent is not deepspeed's launch.py
    assert cli.deepspeed_launcher_pid() is None

    def main():
        raise CodirError("bad input: fix it")
    with pytest.raises(SystemExit) as info:
        cli.run_main(main)
    assert info.value.code == 2 and capsys.readouterr().err == "error: bad input: fix it\n"


# --------------------------------------------------------------------------- 3. reused pipeline stages

@pytest.fixture()
def stages(monkeypatch):
    from codir_ds import pipeline
    monkeypatch.setattr(pipeline, "STAGES", [])
    return pipeline


def test_run_stage_records_its_time_and_reports_it_on_reuse(tmp_path, stages, monkeypatch, capsys):
    run = tmp_path / "stage"

    def fake_job(cmd, env):  # the deepspeed job: writes its results.json
        run.mkdir(exist_ok=True)
        (run / "results.json").write_text('{"steps": 3}')
        return 0
    monkeypatch.setattr(stages, "run_job", fake_job)
    assert stages.run_stage("stage 1", "launchers/pretrain.py", 1, run, []) == {"steps": 3}
    assert stages.read_stage_time(run) is not None and stages.STAGES[-1].reused is False
    (run / "stage_time.json").write_text(json.dumps({**json.loads((run / "stage_time.json").read_text()),
                                                     "seconds": 86.0}))  # as if it had taken 86 s
    monkeypatch.setattr(stages, "run_job", lambda *a, **k: pytest.fail("a finished stage was run again"))
    assert stages.run_stage("stage 1", "launchers/pretrain.py", 1, run, []) == {"steps": 3}
    out = capsys.readouterr().out
    assert f"[stage 1] reusing finished run {run} (it took 86 s)" in out
    assert stages.STAGES[-1] == stages.StageRecord("stage 1", 86.0, True)
    (run / "results.json").write_text('{"steps": 4}')  # redone outside the pipeline: the record is stale
    assert stages.read_stage_time(run) is None


def test_timing_note_says_the_stages_were_reused_and_what_they_took(stages):
    R = stages.StageRecord
    assert stages.timing_note(528.4, []) == "528 s"
    assert stages.timing_note(300.2, [R("a", 100.0, False), R("b", 200.0, False)]) == "300 s"
    reused = [R("head", 60.0, True), R("stage 1", 100.0, True), R("stage 2", 368.0, True)]
    assert stages.timing_note(0.4, reused) == "all 3 stages reused from earlier runs that took 528 s"
    assert stages.timing_note(75, reused) == "all 3 stages reused from earlier runs that took 528 s; this run 75 s"
    assert stages.timing_note(120.0, [R("head", 60.0, True), R("stage 1", 118.0, False)]) == \
        "120 s, with 1 of 2 stages reused from earlier runs that took 60 s"
    assert stages.timing_note(0.4, [R("head", None, True)]) == \
        "all 1 stages reused from earlier runs whose time was not recorded"
    assert "(1 of them without a recorded time)" in stages.timing_note(0.4, [R("a", None, True), R("b", 5.0, True)])


def test_demo_teacher_head_reuse_is_recorded(tmp_path, stages):
    """The main job's teacher-head stage (not a deepspeed job) records and reports its time the same way."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("demo_pretrain_under_test", REPO / "launchers" / "demo_pretrain.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    head = tmp_path / "teacher_mlm"
    head.mkdir()
    (head / "codir_export.json").write_text('{"validation_mlm_accuracy": 0.13}')
    stages.write_stage_time(head, 61.0, "codir_export.json")
    assert demo.fit_head(head, "all-MiniLM-L6-v2", PRE_CODIR, 150) == {"validation_mlm_accuracy": 0.13}
    assert stages.STAGES == [stages.StageRecord("teacher head", 61.0, True)]
    for script in ("demo_pretrain.py", "demo_finetune.py"):  # their summary line reports it
        source = (REPO / "launchers" / script).read_text()
        assert "rank(s), {timing_note(elapsed)}:" in source and "rank(s), {elapsed:.0f} s" not in source


# --------------------------------------------------------------------------- 4. close matches only

@pytest.mark.parametrize("override,suggested", [
    ("training.lrr=1", ["training.lr"]),
    ("training.learning_rate=1", ["training.lr"]),
    ("method.num_negative=8", ["method.num_negatives"]),
    ("model.student_layer=2", ["model.student_layers"]),
    ("logging.tensorbord=false", ["logging.tensorboard"]),
    ("training.alpha_kd=0.1", ["method.alpha_kd"]),  # a key of another section
    ("trainig.lr=1", ["training"]),
])
def test_unknown_key_suggests_only_close_matches(override, suggested):
    msg = refused(lambda: load_config(None, [override]), f"unknown config key '{override.split('=')[0].split('.')[0]}")
    assert re.findall(r"'([a-z_.]+)'", msg.split("did you mean ", 1)[1]) == suggested, msg


def test_far_off_key_gets_no_suggestion_but_the_valid_keys():
    msg = refused(lambda: load_config(None, ["training.gpus=8"]), "unknown config key 'training.gpus'")
    assert "did you mean" not in msg and "valid keys: training.seed, " in msg and "training.lr," in msg


def test_configuration_doc_example_is_what_the_code_says():
    doc = (REPO / "docs" / "configuration.md").read_text()
    quoted = re.search(r"error: unknown config key 'training.lrr': .*", doc).group(0)
    assert quoted == "error: " + refused(lambda: load_config(None, ["training.lrr=1"]))


# --------------------------------------------------------------------------- 5. a summary for every method

def test_registry_refuses_a_method_without_its_own_summary():
    from codir_ds.distill.methods import method_names, registry
    from codir_ds.distill.methods.kd import KDMethod
    before = method_names()

    class NoSummary(KDMethod):  # inherits KD's summary, which describes KD, not this method
        name = "no_summary_method"

    class Blank(KDMethod):
        name, summary = "blank_summary_method", "  "

    for cls in (NoSummary, Blank):
        with pytest.raises(ValueError, match="sets no summary of its own"):
            registry.register_method(cls)
    assert method_names() == before
