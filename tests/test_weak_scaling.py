"""bench/weak_scaling.py: argument errors, the summary and table on synthetic reports, one tiny 1 + 2 rank run."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

SCRIPT = REPO / "bench" / "weak_scaling.py"
TINY = ["--teacher_layers", "1", "--teacher_hidden", "32", "--teacher_heads", "2",
        "--student_layers", "1", "--student_hidden", "32", "--student_heads", "2", "--vocab", "30522",
        "--seq_len", "16", "--micro_batch", "4", "--steps", "2", "--warmup", "1", "--num_examples", "256",
        "--num_negatives", "15", "--precision", "fp32"]


@pytest.fixture(scope="module")
def ws():
    spec = importlib.util.spec_from_file_location("weak_scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def no_launch(ws, monkeypatch):
    """Any attempt to start a job fails the test."""
    def refuse(*a, **k):
        raise AssertionError("a job was launched")
    monkeypatch.setattr(ws, "run_world_size", refuse)
    monkeypatch.setattr(ws.subprocess, "Popen", refuse)


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("argv, words", [
    (["--ranks", "0"], [">= 1"]),
    (["--ranks", "1,-2"], [">= 1"]),
    (["--ranks", "1,two"], ["not an integer"]),
    (["--ranks", ","], ["--ranks is empty"]),
    (["--objectives", "kd,crd"], ["unknown objective 'crd'"]),
    (["--objectives", "ref_codir"], ["unknown objective"]),
    (["--objectives", ""], ["--objectives is empty"]),
    (["--timeout", "0"], ["--timeout"]),
    (["--", "--output", "x.json"], ["--output is set by"]),
    (["--teacher_hidden", "30", "--teacher_heads", "4"], ["throughput.py", "not a multiple"]),
    (["--", "--bogus", "1"], ["throughput.py", "--bogus"]),
    (["--", "--steps"], ["throughput.py", "--steps"]),
    (["--precision", "fp16"], ["fp16", "CPU"]),
    (["--ranks", "1,4", "--num_examples", "12", "--micro_batch", "4"], ["--num_examples 12", "4 ranks"]),
])
def test_bad_arguments_one_line_exit_2_nothing_launched(ws, no_launch, capsys, tmp_path, argv, words):
    assert ws.main([*argv, "--output_dir", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys)
    for w in words:
        assert w in line, line
    assert not (tmp_path / "out").exists()


def test_bad_arguments_from_the_command_line():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--ranks", "1,0"], cwd=str(REPO), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--ranks" in lines[0], proc.stderr


def test_pass_through_keeps_order_and_ranks_are_sorted(ws, tmp_path):
    args = ws.parse_args(["--ranks", "4,1,2,2", "--seq_len", "16", "--objectives", "codir",
                          "--output_dir", str(tmp_path), "--", "--steps", "3", "--precision", "fp32"])
    assert args.ranks == [1, 2, 4] and args.objectives == ["codir"]
    assert args.throughput_args == ["--seq_len", "16", "--steps", "3", "--precision", "fp32"]
    assert args.bench.seq_len == 16 and args.bench.steps == 3 and args.bench.objectives == ["codir"]
    assert ws.threads_per_rank(1, 2) == 2 and ws.threads_per_rank(2, 2) == 1 and ws.threads_per_rank(4, 2) == 1


def test_stored_run_with_other_settings_is_refused(ws, no_launch, capsys, tmp_path):
    argv = ["--ranks", "1", "--objectives", "codir", "--output_dir", str(tmp_path), "--", *TINY]
    args = ws.parse_args(argv)
    cores = ws.cpu_cores()
    stored = {"config": ws.expected_config(args, 1, ws.threads_per_rank(1, cores))}
    stored["config"]["seq_len"] = 32
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "ranks1.json").write_text(json.dumps(stored))
    assert ws.main(argv) == 2
    line = _one_error_line(capsys)
    assert "other settings" in line and "seq_len 32 -> 16" in line and "--force" in line


# --------------------------------------------------------------------------- summary on synthetic reports

def _report(ranks, threads, sps, step, bank, neg, micro=16):
    cfg = {"teacher": {"layers": 6, "hidden": 384, "heads": 12}, "student": {"layers": 3, "hidden": 384, "heads": 12},
           "vocab": 30522, "seq_len": 128, "precision": "fp32", "micro_batch": micro, "grad_accum": 1,
           "world_size": ranks, "train_batch_size": micro * ranks, "steps": 6, "warmup": 2,
           "objectives": ["kd", "codir"], "num_examples": 100000, "num_negatives": 8191,
           "deepspeed_config": "ds_configs/zero2.json", "zero_stage": 2, "breakdown_timing": True,
           "device": f"AMD EPYC (2 logical cores, {threads} torch threads)", "torch_threads": threads,
           "torch_version": "2.x", "deepspeed_version": "0.19.8", "transformers_version": "5.x"}
    res = {"samples_per_second": sps, "step_time_mean_s": step, "bank_allgather_bytes_per_step": bank,
           "batch_negatives_allgather_bytes_per_step": neg}
    kd = dict(res, bank_allgather_bytes_per_step=0, batch_negatives_allgather_bytes_per_step=0)
    return {"config": cfg, "results": {"kd": kd, "codir": res}}


def _records():
    return [  # deliberately out of order: the summary sorts by world size
        {"ranks": 4, "threads_per_rank": 1, "status": "ok", "report": _report(4, 1, 10.4, 6.2, 4 * 2048 * 512, 512)},
        {"ranks": 1, "threads_per_rank": 2, "status": "ok", "report": _report(1, 2, 8.0, 2.0, 0, 0)},
        {"ranks": 8, "threads_per_rank": 1, "status": "failed", "exit_status": 1, "error": "error: boom",
         "stderr_log": "runs/ranks8.err"},
        {"ranks": 2, "threads_per_rank": 1, "status": "ok", "report": _report(2, 1, 12.0, 2.7, 2 * 1024 * 512, 256)},
    ]


def test_summary_efficiency_hand_checked(ws):
    s = ws.summarize(_records(), ["kd", "codir"], cores=2)
    assert s["baseline_ranks"] == 1 and s["oversubscribed_ranks"] == [4, 8]
    rows = {r["ranks"]: r for r in s["objectives"]["codir"]}
    assert [r["ranks"] for r in s["objectives"]["codir"]] == [1, 2, 4, 8]
    # per rank: 8.0 / 1, 12.0 / 2 = 6.0, 10.4 / 4 = 2.6; efficiency against 8.0
    assert rows[1]["samples_per_second_per_rank"] == pytest.approx(8.0)
    assert rows[2]["samples_per_second_per_rank"] == pytest.approx(6.0)
    assert rows[4]["samples_per_second_per_rank"] == pytest.approx(2.6)
    assert rows[1]["weak_scaling_efficiency"] == pytest.approx(1.0)
    assert rows[2]["weak_scaling_efficiency"] == pytest.approx(0.75)
    assert rows[4]["weak_scaling_efficiency"] == pytest.approx(0.325)
    assert rows[2]["total_over_baseline"] == pytest.approx(1.5)
    assert rows[4]["total_over_baseline"] == pytest.approx(1.3)
    assert [rows[n]["global_batch"] for n in (1, 2, 4)] == [16, 32, 64]
    assert [rows[n]["threads_per_rank"] for n in (1, 2, 4, 8)] == [2, 1, 1, 1]
    assert [rows[n]["oversubscribed"] for n in (1, 2, 4, 8)] == [False, False, True, True]
    assert rows[2]["bank_allgather_bytes_per_step"] == 1048576
    assert rows[2]["batch_negatives_allgather_bytes_per_step"] == 256
    assert rows[4]["step_time_mean_s"] == 6.2
    assert rows[8]["status"] == "failed" and rows[8]["weak_scaling_efficiency"] is None
    kd = {r["ranks"]: r for r in s["objectives"]["kd"]}
    assert kd[2]["bank_allgather_bytes_per_step"] == 0 and kd[2]["weak_scaling_efficiency"] == pytest.approx(0.75)

    table = ws.format_table(s["objectives"]["codir"], s["baseline_ranks"]).splitlines()
    assert "weak-scaling efficiency (vs N=1)" in table[0] and len(table) == 2 + 4
    assert table[2].split(" | ")[:7] == ["| 1", "2", "16", "8.00", "8.00", "1.000", "1.000"]
    assert table[3].split(" | ")[:10] == ["| 2", "1", "32", "12.00", "6.00", "0.750", "1.500", "2.700",
                                          "1048576", "256"]
    assert table[4].startswith("| 4 (oversubscribed) | 1 | 64 | 10.40 | 2.60 | 0.325 | 1.300 |")
    assert "AMD EPYC (2 logical cores, 1 torch threads)" in table[4]
    assert table[5].startswith("| 8 | 1 | failed |")


def test_summary_without_a_one_rank_run_uses_the_smallest(ws):
    s = ws.summarize([r for r in _records() if r["ranks"] != 1], ["codir"], cores=2)
    rows = {r["ranks"]: r for r in s["objectives"]["codir"]}
    assert s["baseline_ranks"] == 2
    assert rows[2]["weak_scaling_efficiency"] == pytest.approx(1.0)
    assert rows[4]["weak_scaling_efficiency"] == pytest.approx(2.6 / 6.0)
    assert "vs N=2" in ws.format_table(s["objectives"]["codir"], 2).splitlines()[0]


def test_outputs_on_synthetic_records(ws, tmp_path):
    args = ws.parse_args(["--ranks", "1,2,4,8", "--output_dir", str(tmp_path), "--", "--precision", "fp32"])
    json_path, md_path = ws.write_outputs(args, _records(), cores=2)
    md = md_path.read_text().splitlines()
    assert md[0] == ws.regenerate_command(args)
    assert md[0].startswith("python bench/weak_scaling.py --ranks 1,2,4,8 --objectives kd,codir --output_dir ")
    assert md[0].endswith("-- --precision fp32")
    assert "## kd" in md and "## codir" in md
    text = "\n".join(md)
    assert "N = 4: 4 ranks x 1 thread(s) on 2 cores oversubscribe the cores" in text
    assert "measures oversubscription, not the interconnect" in text
    assert "- N = 8: exit status 1: error: boom" in text
    data = json.loads(json_path.read_text())
    assert data["command"] == md[0] and [r["ranks"] for r in data["runs"]] == [1, 2, 4, 8]
    assert data["runs"][1]["report"]["results"]["codir"]["samples_per_second"] == 12.0
    assert data["summary"]["objectives"]["codir"][2]["weak_scaling_efficiency"] == pytest.approx(0.325)


# --------------------------------------------------------------------------- one real run (1 and 2 ranks)

@pytest.mark.slow
def test_tiny_run_on_1_and_2_ranks_then_reused(ws, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ws"
    argv = ["--ranks", "1,2", "--objectives", "codir", "--output_dir", str(out), *TINY]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], env=env, cwd=str(REPO), capture_output=True,
                          text=True, timeout=300)
    err = "\n".join((out / "runs" / f"ranks{n}.err").read_text()[-2000:] for n in (1, 2)
                    if (out / "runs" / f"ranks{n}.err").is_file())
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}\n{err}"

    md_path, json_path = out / "weak_scaling.md", out / "weak_scaling.json"
    reports = [out / "runs" / "ranks1.json", out / "runs" / "ranks2.json"]
    for p in (md_path, json_path, *reports):
        assert p.is_file(), p
    md = md_path.read_text().splitlines()
    assert md[0].startswith("python bench/weak_scaling.py --ranks 1,2 --objectives codir --output_dir ")
    assert md[0].endswith(" -- " + " ".join(TINY))
    table = [ln for ln in md if ln.startswith("| 1 |") or ln.startswith("| 2 |")]
    assert len(table) == 2, "\n".join(md)

    data = json.loads(json_path.read_text())
    cores = ws.cpu_cores()
    rows = {r["ranks"]: r for r in data["summary"]["objectives"]["codir"]}
    assert set(rows) == {1, 2} and all(r["status"] == "ok" for r in rows.values())
    for n in (1, 2):
        run = next(r for r in data["runs"] if r["ranks"] == n)
        assert run["action"] == "run" and run["report"] == json.loads(reports[n - 1].read_text())
        assert run["report"]["config"]["world_size"] == n
        assert run["report"]["config"]["torch_threads"] == max(1, cores // n) == rows[n]["threads_per_rank"]
        assert rows[n]["global_batch"] == 4 * n
        assert rows[n]["samples_per_second"] > 0 and rows[n]["step_time_mean_s"] > 0
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{run['master_port']}_*"))
    assert rows[1]["bank_allgather_bytes_per_step"] == 0 and rows[1]["batch_negatives_allgather_bytes_per_step"] == 0
    assert rows[2]["bank_allgather_bytes_per_step"] > 0
    assert rows[2]["bank_allgather_bytes_per_step"] % (2 * 128 * 4) == 0  # world x ids x m x fp32
    assert rows[2]["batch_negatives_allgather_bytes_per_step"] == 2 * 4 * 8  # world x ids per rank x int64
    assert rows[1]["weak_scaling_efficiency"] == pytest.approx(1.0)
    assert rows[2]["weak_scaling_efficiency"] == pytest.approx(rows[2]["samples_per_second"] / 2
                                                                / rows[1]["samples_per_second"])

    # Second invocation: both world sizes are reused, nothing is launched, the reports are untouched.
    stamps = [p.stat().st_mtime_ns for p in reports]

    def refuse(*a, **k):
        raise AssertionError("a job was launched")
    monkeypatch.setattr(ws, "run_world_size", refuse)
    monkeypatch.setattr(ws.subprocess, "Popen", refuse)
    assert ws.main(argv) == 0
    assert capsys.readouterr().out.count("reusing") == 2
    assert [p.stat().st_mtime_ns for p in reports] == stamps
    again = json.loads(json_path.read_text())
    assert [r["action"] for r in again["runs"]] == ["reuse", "reuse"]
    assert again["summary"]["objectives"] == data["summary"]["objectives"]
    assert md_path.read_text().splitlines()[0] == md[0]


def test_failed_world_size_is_recorded_and_the_rest_still_runs(ws, monkeypatch, capsys, tmp_path):
    """N = 1 fails, N = 2 succeeds: both recorded, exit status 1, no stored report for N = 1 (no launch here)."""
    good = {r["ranks"]: r for r in _records()}[2]

    def fake(args, item):
        if item["ranks"] == 1:
            return {"ranks": 1, "threads_per_rank": item["threads_per_rank"], "action": "run", "status": "failed",
                    "exit_status": 2, "error": "error: bad thing", "stderr_tail": "...\nerror: bad thing",
                    "stderr_log": str(item["paths"]["stderr"])}
        return dict(good, action="run", wall_seconds=1.0)
    monkeypatch.setattr(ws, "run_world_size", fake)
    assert ws.main(["--ranks", "1,2", "--output_dir", str(tmp_path), "--", "--precision", "fp32"]) == 1
    assert "N=1: FAILED (exit status 2): error: bad thing" in capsys.readouterr().out
    data = json.loads((tmp_path / "weak_scaling.json").read_text())
    assert [(r["ranks"], r["status"]) for r in data["runs"]] == [(1, "failed"), (2, "ok")]
    rows = {r["ranks"]: r for r in data["summary"]["objectives"]["codir"]}
    assert data["summary"]["baseline_ranks"] == 2 and rows[2]["weak_scaling_efficiency"] == pytest.approx(1.0)
    md = (tmp_path / "weak_scaling.md").read_text()
    assert "| 1 | " in md and "failed" in md and "- N = 1: exit status 2: error: bad thing" in md
    assert "efficiencies are relative to N = 2" in md


@pytest.mark.slow
def test_a_failing_launch_records_exit_status_and_stderr(ws, capsys, tmp_path):
    """A real 1-rank launch that fails in bench/throughput.py (an unreadable DeepSpeed JSON)."""
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    out = tmp_path / "out"
    assert ws.main(["--ranks", "1", "--objectives", "kd", "--output_dir", str(out), *TINY,
                    "--deepspeed_config", str(bad)]) == 1
    data = json.loads((out / "weak_scaling.json").read_text())
    (run,) = data["runs"]
    assert run["status"] == "failed" and run["exit_status"] not in (0, None) and not run["timed_out"]
    assert run["stderr_tail"] and run["error"] and "bad.json" in run["stderr_tail"]
    assert not (out / "runs" / "ranks1.json").exists() and not (out / "runs" / "ranks1.json.partial").exists()
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{run['master_port']}_*"))


def test_timeout_stops_the_job_and_its_ranks(ws, tmp_path):
    out = tmp_path / "out"
    assert ws.main(["--ranks", "2", "--objectives", "kd", "--output_dir", str(out), "--timeout", "3", *TINY]) == 1
    (run,) = json.loads((out / "weak_scaling.json").read_text())["runs"]
    assert run["status"] == "failed" and run["timed_out"] and "--timeout 3" in run["error"]
    port = f"--master_port {run['master_port']}"  # launcher; its ranks get the port as MASTER_PORT only
    left = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                env = (p / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if port in cmd or f"MASTER_PORT={run['master_port']}".encode() in env:
                left.append(cmd)
    assert not left, left
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{run['master_port']}_*"))
