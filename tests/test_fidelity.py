"""bench/fidelity.py: the paired statistics by hand, argument errors, the table and plot from fake runs, and
one real tiny study (teacher, then ce / kd / codir with the raw-feature bank, two seeds) through the launcher."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from codir_ds.errors import CodirError

from conftest import REPO, run_main

SCRIPT = REPO / "bench" / "fidelity.py"
_spec = importlib.util.spec_from_file_location("bench_fidelity", SCRIPT)
fidelity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fidelity)


def _script(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, cwd=str(REPO), capture_output=True,
                          text=True, timeout=timeout)


def test_sign_flip_p_by_hand():
    # All 5 differences positive: only the all-+ and all-- assignments reach |mean| = observed: 2/32.
    assert fidelity.sign_flip_p([0.01, 0.02, 0.03, 0.01, 0.02]) == pytest.approx(2 / 32)
    # (1, -1): the four assignments give means 0, 1, -1, 0 -> |mean| >= 0 always: p = 1.
    assert fidelity.sign_flip_p([1.0, -1.0]) == 1.0
    # (3, 1): means 2, 1, -1, -2 -> two of four reach |2|.
    assert fidelity.sign_flip_p([3.0, 1.0]) == pytest.approx(0.5)
    assert fidelity.sign_flip_p([]) is None


def _rec(acc: float, diag: dict | None = None) -> dict:
    return {"status": "ok", "run_dir": "/nonexistent", "results": {"final": {"accuracy": acc},
                                                                    "train_seconds_this_session": 3.0},
            "diagnostics": diag or {}}


def test_paired_differences_use_the_same_seed_only():
    records = {("codir", 1): _rec(0.80), ("kd", 1): _rec(0.78), ("codir", 2): _rec(0.70), ("kd", 2): _rec(0.75),
               ("codir", 3): _rec(0.9)}  # seed 3 has no kd run: not paired
    d = fidelity.paired(records, "codir", "kd", [1, 2, 3], "accuracy")
    assert d["seeds"] == [1, 2]
    assert d["diffs"] == pytest.approx([0.02, -0.05])
    assert d["mean"] == pytest.approx(-0.015)
    assert d["wins"] == 1
    assert fidelity.paired(records, "ce", "kd", [1, 2], "accuracy") is None


def test_outputs_from_fake_runs(tmp_path):
    args = fidelity.parse_args(["--task", "trec6", "--variants", "kd,codir", "--seeds", "1,2", "--size", "tiny",
                                "--out", str(tmp_path)])
    diag = {"bank/pos_sim": 0.9, "bank/neg_sim": 0.3, "bank/sim_gap": 0.6, "crd/loss_over_log_k1": 0.4,
            "collapse_warning": False, "min_sim_gap": 0.2,
            "crd/student_norm": 9.0, "first_student_norm": 2.5}
    records = {("kd", 1): _rec(0.70), ("kd", 2): _rec(0.72), ("codir", 1): _rec(0.73, diag),
               ("codir", 2): _rec(0.71, diag)}
    teacher = {"results": {"main_metric": "accuracy", "final": {"accuracy": 0.88}}}
    written = fidelity.write_outputs(args, teacher, records)
    md = (tmp_path / "trec6.md").read_text()
    assert md.splitlines()[0].startswith("python bench/fidelity.py --task trec6 --seeds 1,2 --size tiny")
    # mean 1 point, t interval 1 ± t_{0.975,1} 12.706 x 2.83 / sqrt 2 = ±25.41 points; two seeds bound no shift
    assert ("| codir vs kd | CoDIR beats KD | +3.0, -1.0 | +1.00 | [-24.41, +26.41] | (unbounded) | 1/0/1 | 1.000 | "
            "1.000 | no difference shown |") in md
    assert "| 0.900 | 0.300 | 0.600 | 0.200 | 0.400 | 2.5 → 9.0 | 0/2 |" in md
    data = json.loads((tmp_path / "trec6.json").read_text())
    assert data["comparisons"][0]["paired"]["diffs"] == pytest.approx([0.03, -0.01])
    if importlib.util.find_spec("matplotlib") is not None:
        assert tmp_path / "trec6.png" in written


def test_split_test_compares_the_test_metrics(tmp_path):
    argv = ["--task", "trec6", "--variants", "kd,codir", "--seeds", "1,2", "--size", "tiny", "--out", str(tmp_path),
            "--split", "test"]
    args = fidelity.parse_args(argv)
    records = {(v, s): _rec(0.5) for v in ("kd", "codir") for s in (1, 2)}
    for (v, s), acc in {("kd", 1): 0.60, ("kd", 2): 0.62, ("codir", 1): 0.64, ("codir", 2): 0.61}.items():
        records[(v, s)]["results"]["test"] = {"accuracy": acc}
    teacher = {"results": {"main_metric": "accuracy", "final": {"accuracy": 0.88}, "test": {"accuracy": 0.86}}}
    fidelity.write_outputs(args, teacher, records)
    md = (tmp_path / "trec6.md").read_text()
    assert md.splitlines()[0].endswith(f"--split test --out {tmp_path}")
    assert "Paired differences in test accuracy (final model)" in md and "accuracy 0.86." in md
    assert "| codir vs kd | CoDIR beats KD | +4.0, -1.0 | +1.50 |" in md  # the test values, not the validation 0.5
    del records[("kd", 1)]["results"]["test"]  # a run made before the test split existed
    with pytest.raises(CodirError, match="has no test metrics"):
        fidelity.write_outputs(args, teacher, records)


def test_report_only_rewrites_a_study_from_its_json_and_keeps_its_date_and_device(tmp_path):
    argv = ["--task", "trec6", "--variants", "kd,codir", "--seeds", "1,2", "--size", "tiny", "--out", str(tmp_path)]
    args = fidelity.parse_args(argv)
    records = {("kd", 1): _rec(0.70), ("kd", 2): _rec(0.72), ("codir", 1): _rec(0.73), ("codir", 2): _rec(0.71)}
    fidelity.write_outputs(args, {"results": {"main_metric": "accuracy", "final": {"accuracy": 0.88}}}, records)
    data = json.loads((tmp_path / "trec6.json").read_text())
    data.update(date_utc="2020-01-02 03:04", versions={"torch": "0.0-recorded"})
    for c in data["comparisons"]:  # a study written before the intervals existed
        c["paired"] = {k: c["paired"][k] for k in ("seeds", "diffs", "mean", "std", "wins", "p")}
    (tmp_path / "trec6.json").write_text(json.dumps(data))
    md = tmp_path / "trec6.md"
    md.write_text(md.read_text().replace(md.read_text().split("- Device: ")[1].split(";")[0], "Recorded CPU, 2 cores"))
    assert fidelity.main(argv + ["--report_only"]) == 0  # no run is started: there is no work_dir or teacher
    text = md.read_text()
    assert "- Device: Recorded CPU, 2 cores; torch 0.0-recorded. Date: 2020-01-02 03:04 (UTC)." in text
    assert "| +3.0, -1.0 | +1.00 | [-24.41, +26.41] | (unbounded) | 1/0/1 | 1.000 | 1.000 | no difference shown |" in text
    rewritten = json.loads((tmp_path / "trec6.json").read_text())
    assert rewritten["comparisons"][0]["paired"]["verdict"] == "no difference shown"
    assert rewritten["date_utc"] == "2020-01-02 03:04" and rewritten["runs"] == data["runs"]
    # another command's arguments: refused, nothing rewritten
    other = tmp_path / "other"
    proc = _script(["--task", "trec6", "--variants", "kd,codir", "--seeds", "1,2,3", "--size", "tiny", "--out",
                    str(tmp_path), "--report_only"])
    assert proc.returncode == 2 and "pass that command's arguments" in proc.stderr and not other.exists()


@pytest.mark.parametrize("args, message", [
    (["--task", "sst9"], "error: unknown task 'sst9'"),
    (["--task", "trec6", "--variants", "codir,bogus"], "error: unknown or no --variants 'bogus'"),
    (["--task", "trec6", "--seeds", "x"], "error: --seeds must be comma-separated integers"),
    (["--task", "trec6", "--size", "huge"], "error: unknown --size 'huge'"),
    (["--task", "trec6", "--set", "method.bank_normalize=maybe"], "error: "),
])
def test_bad_arguments_are_one_line_errors(tmp_path, args, message):
    argv = [*args, "--out", str(tmp_path / "out"), "--work_dir", str(tmp_path / "work")]
    # one case as a command line; the rest in this process (no interpreter start)
    proc = _script(argv) if args[-1] == "sst9" else run_main(fidelity.main, argv)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(message), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = _script(["--task", "trec6", "--variants", "ce,kd,codir_raw_bank", "--seeds", "1,2", "--size", "tiny",
                    "--jobs", "2", "--out", str(out), "--work_dir", str(work)], timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((out / "trec6.json").read_text())
    assert len(data["runs"]) == 6 and all(r["status"] == "ok" for r in data["runs"])
    raw = [r for r in data["runs"] if r["variant"] == "codir_raw_bank"]
    assert all("bank/sim_gap" in r["diagnostics"] for r in raw)
    cfg = (work / "trec6" / "codir_raw_bank_seed1" / "config.yaml").read_text()
    assert "bank_normalize: false" in cfg and "teacher_cache: true" in cfg
    kd_ce = next(c for c in data["comparisons"] if (c["a"], c["b"]) == ("kd", "ce"))
    assert kd_ce["paired"]["seeds"] == [1, 2]
