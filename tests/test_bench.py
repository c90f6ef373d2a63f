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
        # the reference times the same buckets as codir-ds, so a gap reads bucket by bucket
        assert tuple(res["breakdown_s"]) == BREAKDOWN and res["breakdown_s"]["student_forward_backward"] > 0
        assert sum(res["breakdown_s"].values()) == pytest.approx(res["step_time_mean_s"], rel=1e-6)
    assert (report["results"]["ref_codir"]["breakdown_s"]["crd_and_bank"] > 0
            and report["results"]["ref_kd"]["breakdown_s"]["crd_and_bank"] == 0)
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


@pytest.mark.parametrize("extra, words", [
    (["--micro_batch", "4,3", "--global_batch", "8"], ("--global_batch 8", "--micro_batch 3")),
    (["--grad_accum", "2", "--global_batch", "8"], ("--grad_accum", "--global_batch")),
    (["--zero_stage", "0,5"], ("--zero_stage", "0, 1, 2, 3")),
    (["--peak_json", "/nonexistent/peak.json"], ("--peak_json", "matmul_peak.py")),
])
def test_bad_batch_and_peak_arguments_get_one_line(extra, words):
    test_bad_arguments_get_one_line(extra, words)


# ------------------------------------------------------------------ sweeps, accumulation, ZeRO stage, peak, OOM

def _throughput_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("_bench_throughput_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # stdlib imports only at module level
    return module


def test_run_sweep_records_oom_and_skips_the_larger_micro_batches():
    """An out-of-memory point is a result (status oom, the error's first line), not a crash; the larger micro-batches
    of the same ZeRO stage / bucket size are skipped, the other groups still run."""
    import torch
    bench = _throughput_module()
    points = [{"zero_stage": z, "bucket_size": None, "micro_batch": m, "_private": object()}
              for z in (2, 1) for m in (2, 4, 8)]
    ran = []

    def run_point(p):
        ran.append((p["zero_stage"], p["micro_batch"]))
        if p["zero_stage"] == 2 and p["micro_batch"] >= 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore text")
        return {"results": {"kd": {"samples_per_second": float(p["micro_batch"])}}}

    seen = []
    records = bench.run_sweep(points, run_point, on_point=lambda recs: seen.append(len(recs)))
    assert ran == [(2, 2), (2, 4), (1, 2), (1, 4), (1, 8)]  # (2, 8) skipped after the OOM at 4
    assert [r["status"] for r in records] == ["ok", "oom", "skipped_after_oom", "ok", "ok", "ok"]
    assert records[1]["error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "micro_batch 4" in records[2]["error"] and "results" not in records[2]
    assert all("_private" not in r for r in records)  # only the public fields are recorded
    assert seen == [1, 2, 3, 4, 5, 6]                 # a partial report can be written after each point
    assert bench.best_point(records) == 5             # the fastest ok point

    def broken(p):
        raise ValueError("not a memory error")
    with pytest.raises(ValueError):
        bench.run_sweep(points[:1], broken)
    with pytest.raises(torch.OutOfMemoryError):       # several ranks: not caught
        bench.run_sweep(points[1:2], run_point, catch_oom=False)
    assert bench.best_point([{"status": "oom"}]) is None


def test_sweep_points_derive_accumulation_and_set_stage_and_buckets_in_the_deepspeed_json():
    bench = _throughput_module()
    args = bench.parse_args(TINY + ["--precision", "fp32", "--micro_batch", "2,4", "--global_batch", "8",
                                    "--zero_stage", "0,1", "--bucket_size", "1000000"])
    assert args.micro_batches == [2, 4] and args.micro_batch == 2 and args.grad_accum is None
    points = bench.sweep_points(args, world=1)
    assert [(p["zero_stage"], p["micro_batch"], p["grad_accum"], p["train_batch_size"]) for p in points] == \
        [(0, 2, 4, 8), (0, 4, 2, 8), (1, 2, 4, 8), (1, 4, 2, 8)]
    for p in points:
        raw, ds, _, _ = p["_ds"]
        assert raw["zero_optimization"]["stage"] == p["zero_stage"]
        assert raw["zero_optimization"]["reduce_bucket_size"] == raw["zero_optimization"]["allgather_bucket_size"] \
            == 1000000
        assert ds["gradient_accumulation_steps"] == p["grad_accum"] and p["_args"].micro_batch == p["micro_batch"]
    with pytest.raises(bench.BenchError, match="2 ranks"):
        bench.sweep_points(bench.parse_args(TINY + ["--micro_batch", "4", "--global_batch", "4"]), world=2)


def test_peak_json_is_the_mfu_peak(tmp_path):
    import torch
    bench = _throughput_module()
    peak = tmp_path / "peak.json"
    peak.write_text(json.dumps({"tflops": {"fp32": 2.5, "bf16": 10.0}}))
    args = bench.parse_args(TINY + ["--precision", "bf16", "--peak_json", str(peak)])
    assert bench.peak_tflops(args, torch.bfloat16, torch.device("cpu")) == (10.0, "peak_json:peak.json")
    with pytest.raises(bench.BenchError, match="no measured fp16 peak"):
        bench.peak_from_json(str(peak), "fp16")
    with pytest.raises(bench.BenchError, match="both give the peak"):
        bench.parse_args(TINY + ["--peak_tflops", "1", "--peak_json", str(peak)])


def test_global_batch_accumulates_one_optimizer_step_per_window_and_zero_stage_reaches_deepspeed(tmp_path):
    """Two points in one process (ZeRO-0 and ZeRO-1) at global batch 8 = micro 2 x 4: every objective took one
    optimizer step per 4 micro steps, the engine runs the asked stage, MFU is against the given peak."""
    peak = tmp_path / "peak.json"
    peak.write_text(json.dumps({"tflops": {"fp32": 0.5}}))
    out = tmp_path / "sweep.json"
    proc = _run(TINY[:12] + ["--micro_batch", "2", "--global_batch", "8", "--zero_stage", "0,1", "--steps", "2",
                             "--warmup", "1", "--precision", "fp32", "--objectives", "kd,ref_kd", "--no_breakdown",
                             "--num_examples", "64", "--peak_json", str(peak), "--output", str(out)])
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDERR:\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == report and report["complete"] is True
    assert report["peak_tflops"] == 0.5 and report["peak_source"] == "peak_json:peak.json"
    assert [(p["zero_stage"], p["status"], p["grad_accum"]) for p in report["points"]] == [(0, "ok", 4), (1, "ok", 4)]
    assert report["config"]["global_batch"] == 8 and report["config"]["train_batch_size"] == 8
    assert report["config"]["sweep"]["zero_stage"] == [0, 1]
    assert report["results"] == report["points"][report["best_point"]]["results"]
    for p in report["points"]:
        for name, r in p["results"].items():
            assert (r["optimizer_steps"], r["micro_steps"]) == (3, 12), name   # 1 warm-up + 2 timed steps
            assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 0.5)
        assert p["results"]["kd"]["engine_zero_stage"] == p["zero_stage"]
        assert p["results"]["ref_kd"]["engine_zero_stage"] is None
        assert _number(p["ratios"]["kd_over_ref_kd"])


def test_matmul_peak_writes_a_peak_per_dtype(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("_bench_matmul_peak", REPO / "bench" / "matmul_peak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "peak.json"
    assert module.main(["--size", "64", "--iters", "2", "--repeats", "2", "--dtypes", "fp32,bf16",
                        "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert set(report["tflops"]) == {"fp32", "bf16"} and report["size"] == 64 and report["device_type"] == "cpu"
    for name, peak in report["peaks"].items():
        assert _number(peak["tflops"]) and peak["tflops"] >= peak["tflops_median"] > 0
        assert report["tflops"][name] == peak["tflops"]


def test_teacher_cache_sizes_build_the_paper_size_runs():
    import importlib.util
    spec = importlib.util.spec_from_file_location("_bench_teacher_cache", REPO / "bench" / "teacher_cache.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--method", "codir", "--teacher_size", "12/768/12", "--student_size", "6/768/12",
                              "--set", "method.num_negatives=1000"])
    assert args.teacher_size == (12, 768, 12) and args.student_size == (6, 768, 12)
    args.teacher = "/tmp/teacher"
    common = module.common_arguments(args)
    sets = [common[i + 1] for i, a in enumerate(common) if a == "--set"]
    for expected in ("model.student_init=null", "model.student_layers=6", "model.student_hidden=768",
                     "model.student_heads=12", "method.num_negatives=1000", "model.teacher=/tmp/teacher"):
        assert expected in sets
    assert sets.index("model.student_init=null") > sets.index(f"model.student_init={args.minilm}")
    with pytest.raises(SystemExit):
        module.parse_args(["--teacher_size", "12/770/12"])


def test_step_probe_times_the_recipes_module_and_loss_beside_a_plain_loop(tmp_path):
    """bench/step_probe.py: DistillationModule in a DeepSpeed engine with the kd method's loss, against the plain
    model's forward and backward; a bad argument is one line."""
    out = tmp_path / "probe.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    script = str(REPO / "bench" / "step_probe.py")
    proc = subprocess.run([sys.executable, script, "--repeats", "2", "--output", str(out)], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {k: len(v) for k, v in report["seconds"].items()} == {"plain": 2, "codir_ds": 2, "codir_ds_step": 2}
    assert all(v > 0 for v in report["median_s"].values()) and report["codir_ds_over_plain"] > 0
    bad = subprocess.run([sys.executable, script, "--hidden", "64", "--heads", "3"], env=env, cwd=str(REPO),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --hidden 64 must be divisible by --heads 3"
