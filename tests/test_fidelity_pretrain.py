"""bench/fidelity_pretrain.py: argument errors, and the table, paired differences and plot from fake
pipelines (the real pipeline is the main job, tested by its own tests)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_main

SCRIPT = REPO / "bench" / "fidelity_pretrain.py"
_spec = importlib.util.spec_from_file_location("bench_fidelity_pretrain", SCRIPT)
fp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fp)


@pytest.mark.parametrize("argv,expect", [
    (["--variants", "mlm,bogus"], "unknown or no --variants 'bogus'"),
    (["--seeds", "1,x"], "--seeds must be comma-separated integers"),
    (["--seeds", ","], "--seeds is empty"),
    (["--ranks", "0"], "--ranks must be >= 1"),
])
def test_bad_arguments_are_one_line_errors(argv, expect):
    if argv[0] == "--variants":  # one case as a command line; the rest in this process (no interpreter start)
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
        proc = subprocess.run([sys.executable, str(SCRIPT), *argv], env=env, cwd=str(REPO), capture_output=True,
                              text=True, timeout=60)
    else:
        proc = run_main(fp.main, argv)
    assert proc.returncode == 2 and expect in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def _summary(seed: int, accs: dict) -> dict:
    rows = []
    for v, (final, best) in accs.items():
        diag = ({"bank/pos_sim": 0.8, "bank/neg_sim": 0.1 * seed, "bank/sim_gap": 0.8 - 0.1 * seed,
                 "crd/loss_over_log_k1": 0.01, "collapse_warning": False} if v.startswith("codir") else None)
        rows.append({"pretraining": fp.demo.PRE_NAMES[v], "variant": v, "mlm_loss": 5.0 + seed / 10,
                     "mlm_accuracy": 0.2, "finetune_final": final, "finetune_best": best, "crd_diagnostics": diag})
    return {"rows": rows, "args": {"stage1_steps": 100, "stage2_steps": 80, "stage2_lr": 1e-4},
            "teacher_head": {"validation_mlm_accuracy": 0.128}}


def test_study_from_fake_pipelines(tmp_path, monkeypatch):
    work = tmp_path / "work"
    accs = {1: {"mlm": (0.70, 0.72), "kd": (0.71, 0.73), "codir": (0.73, 0.74), "codir_bank": (0.72, 0.75)},
            2: {"mlm": (0.74, 0.75), "kd": (0.72, 0.74), "codir": (0.75, 0.76), "codir_bank": (0.77, 0.78)}}
    calls = []

    real_run = subprocess.run

    def fake_run(cmd, cwd=None, **kwargs):
        if not any(str(a).endswith("demo_pretrain.py") for a in cmd):  # e.g. matplotlib's fc-list on a fresh machine
            return real_run(cmd, cwd=cwd, **kwargs)
        calls.append(cmd)
        seed = int(cmd[cmd.index("--seed") + 1])
        out = Path(cmd[cmd.index("--output_dir") + 1])
        assert Path(cmd[cmd.index("--shared_dir") + 1]) == work / "shared"
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(_summary(seed, accs[seed])))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(fp.subprocess, "run", fake_run)
    assert fp.main(["--seeds", "1,2", "--work_dir", str(work), "--out", str(tmp_path / "out")]) == 0
    assert len(calls) == 2 and calls[0][calls[0].index("--methods") + 1:][:4] == ["mlm", "kd", "codir", "codir_bank"]
    md = (tmp_path / "out" / "pretrain.md").read_text().splitlines()
    assert md[0] == f"python bench/fidelity_pretrain.py --seeds 1,2 --out {tmp_path / 'out'} --work_dir {work}"
    codir_row = next(line for line in md if line.startswith("| CoDIR-Pre (`codir`)"))
    # final 0.73 / 0.75, best 0.74 / 0.76, MLM loss (5.1 + 5.2) / 2, neg cos (0.1 + 0.2) / 2
    assert "| 2 | 0.7400 ± 0.0141 | 0.7500 ± 0.0141 | 5.1500 | 0.2000 | 0.800 | 0.150 | 0.650 | 0.0100 | 0/2 |" \
        in codir_row
    mlm_row = next(line for line in md if line.startswith("| MLM-Pre"))
    assert mlm_row.endswith("| – | – | – | – | – |")
    # codir - mlm per seed: +3.0, +1.0 -> mean +2.00 +- 1.4, 2/2 wins, p = 2/4
    cmp_row = next(line for line in md if line.startswith("| codir vs mlm"))
    # mean 2 points, t interval 2 ± 12.706 x 1.41 / sqrt 2 = ±12.71; Holm over the study's comparisons
    assert "| +3.0, +1.0 | +2.00 | [-10.71, +14.71] | (unbounded) | 2/0/0 | 0.500 | 1.000 | no difference shown |" \
        in cmp_row
    saved = json.loads((tmp_path / "out" / "pretrain.json").read_text())
    assert set(saved["summaries"]) == {"1", "2"} and saved["comparisons"][0]["a"] == "kd"


def test_a_failed_pipeline_stops_the_study(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fp.subprocess, "run", lambda cmd, cwd: subprocess.CompletedProcess(cmd, 3))
    assert fp.main(["--seeds", "4", "--work_dir", str(tmp_path / "w"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "the pipeline of seed 4 failed (exit 3)" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "pretrain.md").exists()
