"""The demo pipeline's stage runner: reuse finished stages, resume interrupted ones, report failures."""
import json
import subprocess

import pytest

from codir_ds import pipeline
from codir_ds.errors import CodirError


def test_finished_stage_is_reused_without_running(tmp_path, monkeypatch):
    run = tmp_path / "stage"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"best": {"accuracy": 0.5}}))
    monkeypatch.setattr(pipeline, "run_job", lambda *a, **k: pytest.fail("a finished stage must not run again"))
    assert pipeline.run_stage("s", "launchers/finetune.py", 1, run, [])["best"]["accuracy"] == 0.5


def test_interrupted_stage_is_resumed_and_fresh_stage_is_not(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, env):
        calls.append(cmd)
        out = cmd[cmd.index("--output_dir") + 1]
        (tmp_path / out).mkdir(parents=True, exist_ok=True)
        (tmp_path / out / "results.json").write_text("{}")
        return 0

    monkeypatch.setattr(pipeline, "run_job", fake_run)
    fresh, stopped, early = tmp_path / "fresh", tmp_path / "stopped", tmp_path / "early"
    (stopped / "checkpoints").mkdir(parents=True)
    (stopped / "checkpoints" / "latest").write_text("step_00000003\n")
    early.mkdir()  # stopped before its first checkpoint: a config, no checkpoint, no results
    (early / "config.yaml").write_text("name: x\n")
    pipeline.run_stage("fresh", "launchers/finetune.py", 2, fresh, ["--config", "c.yaml"])
    pipeline.run_stage("stopped", "launchers/finetune.py", 2, stopped, ["--config", "c.yaml"])
    pipeline.run_stage("early", "launchers/finetune.py", 1, early, ["--config", "c.yaml"])
    assert "--resume" not in calls[0] and "--overwrite" not in calls[0] and "--resume" in calls[1]
    assert "--overwrite" in calls[2] and "--resume" not in calls[2]
    assert calls[0][calls[0].index("--num_gpus") + 1] == "2"


def test_failed_stage_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "run_job", lambda cmd, env: 1)
    with pytest.raises(CodirError, match="stage 'x' failed \\(exit 1\\)") as err:
        pipeline.run_stage("x", "launchers/finetune.py", 1, tmp_path / "x", [])
    assert "\n" not in str(err.value)


def test_a_stage_stopped_by_a_signal_says_so_and_how_to_continue(tmp_path, monkeypatch):
    run = tmp_path / "x"

    def stopped(cmd, env):  # the launcher saved after step 7 and wrote its marker (exit 1 through deepspeed)
        run.mkdir()
        (run / "preempted.json").write_text(json.dumps({"step": 7, "signal": "SIGINT"}))
        return 1
    monkeypatch.setattr(pipeline, "run_job", stopped)
    with pytest.raises(CodirError, match=r"^stage 'x' was stopped by SIGINT after step 7 and saved a checkpoint in "
                                         r".*: re-run the same command to continue from there$"):
        pipeline.run_stage("x", "launchers/finetune.py", 1, run, [])


def test_run_job_keeps_waiting_for_the_job_after_ctrl_c(monkeypatch):
    waits = []

    class Proc:
        def wait(self):
            waits.append(1)
            if len(waits) == 1:
                raise KeyboardInterrupt
            return 75
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: Proc())
    assert pipeline.run_job(["x"], {}) == 75 and len(waits) == 2


def test_format_table():
    table = pipeline.format_table([{"model": "m", "method": "kd", "seed": 1, "accuracy": 0.71234, "steps": 10,
                                    "samples_per_second": 12.34}], "accuracy")
    assert table.splitlines()[2] == "| m | kd | 1 | 0.7123 | 10 | 12.3 |"
