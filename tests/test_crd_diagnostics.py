"""The CRD collapse diagnostics: the watch's rule, and what a real run logs and reports."""
from __future__ import annotations

import json

from codir_ds.config import load_config
from codir_ds.distill.diagnostics import CollapseWatch, last_diagnostics

DS = "ds_configs/zero2.json"


def _window(pos: float, neg: float) -> dict:
    return {"bank/pos_sim": pos, "bank/neg_sim": neg, "bank/sim_gap": pos - neg, "crd/loss_over_log_k1": 0.9}


def test_collapse_warning_fires_once_after_three_collapsed_windows():
    watch = CollapseWatch()
    # the untrained start (nothing aligned yet) and a healthy phase never count
    seq = [(0.05, 0.02), (0.3, 0.05), (0.9, 0.2), (0.93, 0.25),
           (0.88, 0.7), (0.9, 0.8), (0.92, 0.85), (0.93, 0.9), (0.95, 0.93)]
    lines = [watch.observe(10 * (i + 1), _window(p, n)) for i, (p, n) in enumerate(seq)]
    fired = [(i, line) for i, line in enumerate(lines) if line]
    assert len(fired) == 1 and fired[0][0] == 6, lines
    line = fired[0][1]
    assert line.startswith("warning: step 70: the contrastive term has collapsed") and "\n" not in line
    assert "bank/pos_sim 0.92" in line and "bank/neg_sim 0.85" in line and "training.lr" in line


def test_collapse_watch_is_silent_on_a_healthy_run_and_when_collapse_does_not_last():
    healthy = CollapseWatch()
    assert not any(healthy.observe(s, _window(0.94, 0.21)) for s in range(0, 200, 10))
    flicker = CollapseWatch()
    pattern = [(0.9, 0.8), (0.9, 0.8), (0.9, 0.3)] * 5  # two collapsed windows, then recovered, again and again
    assert not any(flicker.observe(s, _window(p, n)) for s, (p, n) in enumerate(pattern))
    assert not CollapseWatch().observe(1, {"loss/task": 0.3})  # methods without CRD


def test_collapse_watch_state_survives_a_resume():
    a = CollapseWatch()
    for s in range(2):
        a.observe(s, _window(0.9, 0.85))
    b = CollapseWatch()
    b.load_state_dict(a.state_dict())
    assert b.observe(3, _window(0.9, 0.85))  # the third collapsed window, counted across the resume
    c = CollapseWatch()
    c.load_state_dict(b.state_dict())
    assert not c.observe(4, _window(0.9, 0.85))  # warned once per run


def test_a_codir_run_logs_and_reports_the_diagnostics(tmp_path, tiny_config, single_process_env):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from codir_ds.recipes import run_finetune
    results = run_finetune(load_config(str(tiny_config)), DS, str(tmp_path / "run"))
    keys = ("bank/pos_sim", "bank/neg_sim", "bank/sim_gap", "crd/loss_over_log_k1", "crd/student_norm",
            "crd/teacher_norm", "bank/never_updated")
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert set(keys) <= set(acc.Tags()["scalars"])
    saved = json.loads((tmp_path / "run" / "results.json").read_text())["diagnostics"]
    assert set(keys) <= set(saved) and saved["collapse_warning"] in (False, True)
    assert saved == results["diagnostics"]
    last = {k: acc.Scalars(k)[-1].value for k in keys}
    for k in keys:
        assert abs(saved[k] - last[k]) < 1e-5, k
    assert 0.0 <= saved["bank/never_updated"] <= 1.0
    # 6 steps x batch 8 = 48 positives on 64 training examples: at least 16 rows never updated
    assert saved["bank/never_updated"] >= 16 / 64
    assert last_diagnostics({"loss/task": 1.0, "bank/pos_sim": 0.5}) == {"bank/pos_sim": 0.5}
