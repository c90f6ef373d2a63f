"""bench/throughput.py: a tiny run of all three objectives (fields, not timings) and the fp16-on-CPU refusal."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = str(REPO / "bench" / "throughput.py")
TINY = ["--teacher_layers", "2", "--teacher_hidden", "32", "--teacher_heads", "2",
        "--student_layers", "1", "--student_hidden", "32", "--student_heads", "2",
        "--seq_len", "32", "--micro_batch", "4", "--steps", "2", "--warmup", "1"]

RESULT_FIELDS = ("samples_per_second", "tokens_per_second", "step_time_mean_s", "step_time_median_s", "timed_steps",
                 "steps_applied", "final_loss", "flops_per_token", "teacher_params", "student_params",
                 "achieved_tflops", "mfu", "peak_memory_bytes", "peak_memory_source", "breakdown_s",
                 "crd_loss_fwd_bwd_s", "bank_allgather_bytes_per_step", "batch_negatives_allgather_bytes_per_step",
                 "bank_rows_gathered_per_step")
POSITIVE = ("samples_per_second", "tokens_per_second", "step_time_mean_s", "step_time_median_s", "timed_steps",
            "steps_applied", "final_loss", "flops_per_token", "student_params", "achieved_tflops", "mfu",
            "peak_memory_bytes")
BREAKDOWN = ("teacher_forward", "student_forward_backward", "crd_and_bank", "optimizer_step", "other")
CONFIG_FIELDS = ("teacher", "student", "vocab", "seq_len", "precision", "micro_batch", "grad_accum", "world_size",
                 "train_batch_size", "steps", "warmup", "num_negatives", "num_examples", "device", "torch_version",
                 "deepspeed_version", "date", "command")


def _run(args: list[str]) -> subprocess.CompletedProcess:
    """The script as a plain single process: it sets RANK/WORLD_SIZE/MASTER_PORT itself."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, SCRIPT, *args], env=env, cwd=str(REPO), capture_output=True, text=True,
                          timeout=180)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    proc = _run(TINY + ["--precision", "fp32", "--output", str(out)])
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)  # stdout is exactly one JSON object
    assert json.loads(out.read_text()) == report
    return report


def test_tiny_run_reports_every_field(tiny_report):
    cfg = tiny_report["config"]
    for key in CONFIG_FIELDS:
        assert key in cfg, key
    assert cfg["world_size"] == 1 and cfg["precision"] == "fp32" and cfg["train_batch_size"] == 4
    assert cfg["seq_len"] == 32 and cfg["micro_batch"] == 4 and cfg["grad_accum"] == 1
    assert cfg["device"] and cfg["torch_version"] and cfg["deepspeed_version"]
    assert _number(tiny_report["peak_tflops"]) and tiny_report["peak_tflops"] > 0
    assert tiny_report["peak_source"] == "measured_matmul"

    results = tiny_report["results"]
    assert set(results) == {"mlm", "kd", "codir"}
    for name, r in results.items():
        for key in RESULT_FIELDS:
            assert key in r, f"{name}: {key} missing"
        for key in POSITIVE:
            assert _number(r[key]) and r[key] > 0, f"{name}: {key} = {r[key]!r}"
        for key in ("teacher_params", "crd_loss_fwd_bwd_s", "bank_allgather_bytes_per_step",
                    "batch_negatives_allgather_bytes_per_step"):
            assert _number(r[key]) and r[key] >= 0, f"{name}: {key} = {r[key]!r}"
        assert r["timed_steps"] == 2
        assert r["flops_per_token"] == 2 * r["teacher_params"] + 6 * r["student_params"]
        assert set(r["breakdown_s"]) == set(BREAKDOWN)
        for key, v in r["breakdown_s"].items():
            assert _number(v) and v >= 0, f"{name}: breakdown {key} = {v!r}"
        # the buckets partition the step ("other" is the remainder), by construction
        assert math.isclose(sum(r["breakdown_s"].values()), r["step_time_mean_s"], rel_tol=1e-6)
        assert r["breakdown_s"]["student_forward_backward"] > 0 and r["breakdown_s"]["optimizer_step"] > 0

    assert results["mlm"]["teacher_params"] == 0 and results["mlm"]["breakdown_s"]["teacher_forward"] == 0
    assert results["mlm"]["breakdown_s"]["crd_and_bank"] == 0
    for name in ("kd", "codir"):
        assert results[name]["teacher_params"] == cfg["teacher"]["non_embedding_params"] > 0
        assert results[name]["breakdown_s"]["teacher_forward"] > 0
    assert results["codir"]["breakdown_s"]["crd_and_bank"] > 0 and results["codir"]["crd_loss_fwd_bwd_s"] > 0
    assert results["kd"]["breakdown_s"]["crd_and_bank"] == 0
    assert results["codir"]["bank_allgather_bytes_per_step"] == 0  # one rank: gather() reads locally


def test_fp16_on_cpu_is_refused_in_one_line():
    proc = _run(TINY + ["--precision", "fp16"])
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and "fp16" in lines[0] and "bf16" in lines[0] and "fp32" in lines[0]


@pytest.mark.slow
def test_plain_reference_runs_side_by_side_with_ratios():
    """ref_kd / ref_codir: the straightforward loop (no DeepSpeed, [B, K+1, m] per-anchor negatives)."""
    proc = _run(TINY + ["--precision", "fp32", "--objectives", "kd,ref_kd,codir,ref_codir", "--num_negatives", "20",
                        "--num_examples", "64"])
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDERR:\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)
    assert set(report["results"]) == {"kd", "ref_kd", "codir", "ref_codir"}
    for name in ("ref_kd", "ref_codir"):
        res = report["results"][name]
        assert all(_number(res[k]) and res[k] > 0 for k in ("samples_per_second", "step_time_mean_s", "mfu"))
    # Same models, init, data and masking (the optimizers' schedules differ): losses of the same size.
    assert report["results"]["ref_kd"]["final_loss"] == pytest.approx(report["results"]["kd"]["final_loss"], rel=0.05)
    assert report["results"]["ref_codir"]["negatives_copy_bytes_per_micro_step"] == 4 * 21 * 128 * 4
    assert set(report["ratios"]) == {"kd_over_ref_kd", "codir_over_ref_codir", "codir_step_time_over_kd",
                                     "codir_median_step_time_over_kd", "crd_sections_over_kd_step"}
    assert all(_number(v) and v > 0 for v in report["ratios"].values())


@pytest.mark.slow
def test_finetune_task_side_by_side_with_class_shared_negatives():
    """--task finetune: classification models, K negatives per class gathered once per step (C x K rows)."""
    proc = _run(TINY + ["--precision", "fp32", "--task", "finetune", "--num_classes", "3",
                        "--objectives", "kd,codir,ref_kd,ref_codir", "--num_negatives", "50", "--num_examples", "96"])
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDERR:\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)
    cfg = report["config"]
    assert cfg["task"] == "finetune" and cfg["num_classes"] == 3 and cfg["schedule"] == "interleaved"
    assert cfg["teacher_attention"] == "sdpa" and cfg["teacher_dtype"] == "float32"
    kd, codir = report["results"]["kd"], report["results"]["codir"]
    assert codir["bank_rows_gathered_per_step"] == 3 * 50 and kd["bank_rows_gathered_per_step"] == 0
    assert codir["breakdown_s"]["crd_and_bank"] > 0 and codir["crd_loss_fwd_bwd_s"] > 0
    assert kd["tokens_per_second"] == pytest.approx(kd["samples_per_second"] * 32, rel=1e-6)  # no padding
    # the reference copies [B, K+1, m] per micro step; codir-ds never does
    assert report["results"]["ref_codir"]["negatives_copy_bytes_per_micro_step"] == 4 * 51 * 128 * 4
    assert report["results"]["ref_kd"]["final_loss"] == pytest.approx(kd["final_loss"], rel=0.1)
    for key in ("kd_over_ref_kd", "codir_over_ref_codir", "codir_step_time_over_kd", "crd_sections_over_kd_step"):
        assert _number(report["ratios"][key]) and report["ratios"][key] > 0


@pytest.mark.slow
def test_global_negatives_fill_the_candidates_up_to_the_paper_batch():
    proc = _run(TINY + ["--precision", "fp32", "--objectives", "codir", "--num_examples", "512",
                        "--num_negatives", "300", "--global_negatives", "256", "--schedule", "sequential"])
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDERR:\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)
    assert report["results"]["codir"]["bank_rows_gathered_per_step"] == 256
    assert report["config"]["global_negatives"] == 256 and report["config"]["schedule"] == "sequential"


@pytest.mark.parametrize("extra, words", [
    (["--task", "finetune", "--objectives", "mlm,kd"], ("mlm", "finetune")),
    (["--task", "finetune", "--objectives", "kd", "--num_classes", "1"], ("--num_classes", ">= 2")),
    (["--global_negatives", "999999"], ("--global_negatives", "--num_examples")),
])
def test_bad_arguments_get_one_line(extra, words):
    proc = _run(TINY + extra)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert all(w in lines[0] for w in words), lines[0]
