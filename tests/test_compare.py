"""bench/compare.py: argument errors, the table/JSON/PNG from fake results, resumability with a mocked
launcher, and one real tiny grid (teacher, then ce and kd with two seeds) through launchers/finetune.py."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_main

SCRIPT = REPO / "bench" / "compare.py"
_spec = importlib.util.spec_from_file_location("bench_compare", SCRIPT)
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)

TEACHER_SHA = "0123456789abcdef" * 4


def _script(args: list[str], cwd: Path = REPO, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, cwd=str(cwd), capture_output=True,
                          text=True, timeout=timeout)


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("args, message", [
    (["--task", "sst9"], "error: unknown task 'sst9'"),
    (["--task", "trec6", "--methods", "ce,bogus"], "error: unknown method 'bogus'"),
    (["--task", "trec6", "--methods", ","], "error: --methods is empty"),
    (["--task", "trec6", "--seeds", ""], "error: --seeds is empty"),
    (["--task", "trec6", "--seeds", "1,two"], "error: --seeds must be comma-separated integers"),
    (["--task", "trec6", "--size", "huge"], "error: unknown --size 'huge'"),
    (["--task", "trec6", "--jobs", "0"], "error: --jobs must be >= 1"),
    (["--task", "trec6", "--minilm", "/nonexistent"], "error: --minilm '/nonexistent' is not a model directory"),
    (["--task", "trec6", "--set", "training.lrr=1"], "error: unknown config key 'training.lrr'"),
    (["--methods", "ce"], "error: the following arguments are required: --task"),
])
def test_bad_arguments_are_one_line_errors_before_anything_runs(tmp_path, args, message):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = [*args, "--out", str(out), "--work_dir", str(work)]
    # one case as a command line; the rest in this process (no interpreter start)
    proc = _script(argv) if args[-1] == "sst9" else run_main(compare.main, argv)
    assert proc.returncode == 2
    assert proc.stderr.startswith(message), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists() and not work.exists()


# --------------------------------------------------------------------------- table, JSON, PNG


def _results(accuracy: float, f1: float, seconds: float = 10.0) -> dict:
    return {"task": "trec6", "main_metric": "accuracy", "final": {"accuracy": accuracy, "f1": f1}, "steps": 24,
            "train_seconds_this_session": seconds, "num_train_examples": 2000, "num_validation_examples": 545,
            "precision": "float32"}


def _ok(method: str, seed: int, accuracy: float, f1: float, seconds: float = 10.0, wall: float = 30.0) -> dict:
    return {"name": f"{method}_seed{seed}", "method": method, "seed": seed, "status": "ok", "action": "fresh",
            "results": _results(accuracy, f1, seconds), "command": f"deepspeed ... {method} {seed}",
            "run_dir": f"runs/x/{method}_seed{seed}", "wall_seconds": wall}


def _failed(method: str, seed: int) -> dict:
    return {"name": f"{method}_seed{seed}", "method": method, "seed": seed, "status": "failed", "action": "fresh",
            "command": "deepspeed ...", "run_dir": f"runs/x/{method}_seed{seed}", "wall_seconds": 5.0,
            "exit_code": 2, "error": f"error: method {method} is not implemented",
            "error_tail": f"Traceback ...\nerror: method {method} is not implemented"}


def test_table_json_and_chart_from_fake_results(tmp_path):
    args = compare.parse_args(["--task", "trec6", "--methods", "kd,ce,pkd,codir", "--seeds", "1,2,3",
                               "--out", str(tmp_path / "out")])
    teacher = {"name": "teacher", "method": "ce", "seed": 42, "status": "ok", "action": "reuse",
               "results": _results(0.95, 0.94, 100.0), "command": "deepspeed ... teacher", "wall_seconds": 130.0,
               "run_dir": "runs/x/teacher"}
    records = [
        _ok("kd", 1, 0.70, 0.60, 10, 30), _ok("kd", 2, 0.74, 0.66, 12, 32), _ok("kd", 3, 0.78, 0.69, 14, 34),
        _ok("ce", 1, 0.50, 0.40), _ok("ce", 2, 0.60, 0.50),
        _failed("ce", 3),
        _failed("pkd", 1), _failed("pkd", 2), _failed("pkd", 3),
        _ok("codir", 1, 0.80, 0.70),
    ]
    written = compare.write_outputs(args, teacher, records)
    md = (tmp_path / "out" / "trec6.md").read_text().splitlines()

    # first line: the one command that regenerates the file
    assert md[0] == ("python bench/compare.py --task trec6 --methods kd,ce,pkd,codir --seeds 1,2,3 --size cpu "
                     f"--out {tmp_path / 'out'}")
    rows = [ln for ln in md if ln.startswith("| ")]
    assert rows[0].startswith("| method | accuracy (mean ± std) | f1 (mean ± std) | n | steps |")
    body = rows[1:]
    # teacher first, then the methods in command-line order (no sorting)
    assert [r.split(" | ")[0] for r in body] == ["| teacher (MiniLM 6L/384, ce)", "| kd", "| ce", "| pkd", "| codir"]
    # kd: accuracy mean 0.74, sample std sqrt(((-.04)^2 + 0 + .04^2) / 2) = 0.04; f1 mean 0.65,
    # std sqrt((.05^2 + .01^2 + .04^2) / 2) = sqrt(0.0021) = 0.045826
    assert body[1] == "| kd | 0.7400 ± 0.0400 | 0.6500 ± 0.0458 | 3 | 24 | 12 | 32 |"
    # ce: two finished seeds (0.5, 0.6: std 0.070711), one failed
    assert body[2] == "| ce | 0.5500 ± 0.0707 | 0.4500 ± 0.0707 | 2 (1 failed) | 24 | 10 | 30 |"
    assert body[3] == "| pkd | failed | failed | 0 (3 failed) | – | – | – |"
    assert body[4] == "| codir | 0.8000 | 0.7000 | 1 | 24 | 10 | 30 |"  # n = 1: no std
    assert body[0] == "| teacher (MiniLM 6L/384, ce) | 0.9500 | 0.9400 | 1 | 24 | 100 | 130 |"
    text = "\n".join(md)
    assert "- pkd_seed2: `error: method pkd is not implemented`" in text
    assert "Device: " in text and "Date: " in text and "Teacher: MiniLM 6L/384" in text
    assert "method.num_negatives=100" in text  # per-method settings are stated

    data = json.loads((tmp_path / "out" / "trec6.json").read_text())
    assert data["command"] == md[0]
    assert data["main_metric"] == "accuracy" and data["metrics"] == ["accuracy", "f1"]
    assert len(data["runs"]) == len(records)
    failed = [r for r in data["runs"] if r["status"] == "failed"]
    assert {r["name"] for r in failed} == {"ce_seed3", "pkd_seed1", "pkd_seed2", "pkd_seed3"}
    assert all("not implemented" in r["error_tail"] for r in failed)
    kd = next(s for s in data["summary"] if s["method"] == "kd")
    assert kd["metrics"]["accuracy"]["mean"] == pytest.approx(0.74)
    assert kd["metrics"]["accuracy"]["std"] == pytest.approx(0.04)
    assert data["teacher"]["results"]["final"]["accuracy"] == 0.95

    if importlib.util.find_spec("matplotlib") is None:
        assert tmp_path / "out" / "trec6.png" not in written
        pytest.skip("matplotlib is not installed: the chart is not written (checked above)")
    png = tmp_path / "out" / "trec6.png"
    assert png in written and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- resumability (mocked launcher)


def _launcher_sets(cmd: list[str]) -> tuple[list[str], Path, list[str]]:
    """(--set values, --output_dir, flags) of one launcher command."""
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    out = Path(cmd[cmd.index("--output_dir") + 1])
    flags = [a for a in cmd if a in ("--resume", "--overwrite")]
    return sets, (out if out.is_absolute() else REPO / out), flags


def _finish(run_dir: Path, sets: list[str], accuracy: float = 0.5) -> None:
    """What a finished launcher job leaves: config.yaml, results.json, (teacher) an export manifest."""
    cfg = compare.load_config(str(REPO / compare.BASE_CONFIG), sets)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    res = _results(accuracy, accuracy)
    res["seed"] = cfg.training.seed
    (run_dir / "results.json").write_text(json.dumps(res))
    (run_dir / "export").mkdir(exist_ok=True)
    (run_dir / "export" / compare.EXPORT_MANIFEST).write_text(json.dumps({"sha256": TEACHER_SHA}))


class FakeLauncher:
    """Stands in for subprocess.run: records each launcher command and finishes (or fails) the run."""

    def __init__(self, fail: tuple[str, ...] = ()):
        self.calls: list[tuple[str, list[str]]] = []
        self.fail = fail

    def __call__(self, cmd, stdout=None, stderr=None, env=None, cwd=None, **kw):
        sets, out, flags = _launcher_sets(cmd)
        self.calls.append((out.name, flags))
        if out.name.split("_seed")[0] in self.fail:
            stdout.write("Traceback (most recent call last):\nerror: objective not implemented yet\n")
            return subprocess.CompletedProcess(cmd, 2)
        _finish(out, sets)
        return subprocess.CompletedProcess(cmd, 0)


def _grid(tmp_path, *extra) -> list[str]:
    return ["--task", "trec6", "--methods", "ce,kd,pkd", "--seeds", "1,2", "--size", "tiny",
            "--out", str(tmp_path / "out"), "--work_dir", str(tmp_path / "work"), *extra]


def test_grid_reuses_finished_runs_and_resumes_or_restarts_the_rest(tmp_path, monkeypatch):
    fake = FakeLauncher(fail=("pkd",))
    monkeypatch.setattr(compare.subprocess, "run", fake)
    assert compare.main(_grid(tmp_path)) == 1  # pkd failed, the grid went on
    assert [c[0] for c in fake.calls] == ["teacher", "ce_seed1", "ce_seed2", "kd_seed1", "kd_seed2", "pkd_seed1",
                                          "pkd_seed2"]
    assert all(flags == [] for _, flags in fake.calls)
    # the default launcher is `deepspeed --num_gpus 1 launchers/finetune.py`; kd gets the teacher and its checksum
    data = json.loads((tmp_path / "out" / "trec6.json").read_text())
    kd = next(r for r in data["runs"] if r["name"] == "kd_seed1")
    assert kd["command"].startswith("deepspeed ") and "--num_gpus 1" in kd["command"]
    assert "launchers/finetune.py" in kd["command"]
    assert f"model.teacher={tmp_path / 'work' / 'trec6' / 'teacher' / 'export'}" in kd["command"]
    assert f"model.teacher_sha256={TEACHER_SHA}" in kd["command"]
    assert "model.teacher=" not in next(r for r in data["runs"] if r["name"] == "ce_seed1")["command"]
    pkd = next(r for r in data["runs"] if r["name"] == "pkd_seed1")
    assert pkd["status"] == "failed" and pkd["error"] == "error: objective not implemented yet"

    # Second run of the same command: finished runs are not started again; the failed ones are retried.
    work = tmp_path / "work" / "trec6"
    # kd seed 2 was interrupted after a checkpoint, ce seed 2 before one (config.yaml only)
    (work / "kd_seed2" / "results.json").unlink()
    (work / "kd_seed2" / "checkpoints").mkdir()
    (work / "kd_seed2" / "checkpoints" / "latest").write_text("step_00000001")
    (work / "ce_seed2" / "results.json").unlink()
    fake2 = FakeLauncher()
    monkeypatch.setattr(compare.subprocess, "run", fake2)
    assert compare.main(_grid(tmp_path)) == 0
    assert fake2.calls == [("ce_seed2", ["--overwrite"]), ("kd_seed2", ["--resume"]), ("pkd_seed1", []),
                           ("pkd_seed2", [])]
    data = json.loads((tmp_path / "out" / "trec6.json").read_text())
    assert [r["action"] for r in data["runs"]] == ["reuse", "overwrite", "reuse", "resume", "fresh", "fresh"]
    assert data["teacher"]["action"] == "reuse"

    # Third run: everything is reused, no launcher starts.
    monkeypatch.setattr(compare.subprocess, "run", lambda *a, **k: pytest.fail("a finished run was started again"))
    assert compare.main(_grid(tmp_path)) == 0

    # A changed setting reruns the affected runs in their own directories; --force reruns everything.
    fake3 = FakeLauncher()
    monkeypatch.setattr(compare.subprocess, "run", fake3)
    assert compare.main(_grid(tmp_path, "--methods", "kd", "--set", "method.kd_temperature=4")) == 0
    assert fake3.calls == [("kd_seed1", ["--overwrite"]), ("kd_seed2", ["--overwrite"])]
    fake4 = FakeLauncher()
    monkeypatch.setattr(compare.subprocess, "run", fake4)
    assert compare.main(_grid(tmp_path, "--methods", "ce", "--seeds", "1", "--force")) == 0
    assert fake4.calls == [("teacher", ["--overwrite"]), ("ce_seed1", ["--overwrite"])]


def test_config_match_ignores_new_keys_at_their_defaults_and_resumable_keys():
    sets = compare.student_overrides(compare.parse_args(["--task", "trec6", "--size", "tiny"]), "kd", 1, None, None)
    expected = compare.load_config(str(REPO / compare.BASE_CONFIG), sets).to_dict()
    saved = json.loads(json.dumps(expected))
    del saved["method"]["kd_t2_scale"]  # a key added to the code after the run: default value, same run
    saved["logging"]["log_every"] = 99  # may change between a run and its resumption
    saved["method"]["alpha_crd"] = 0.3  # older runs saved every method's options: kd does not read this one
    assert compare.config_differences(saved, expected) == []
    expected["method"]["kd_t2_scale"] = False
    saved["training"]["lr"] = 0.5
    assert compare.config_differences(saved, expected) == ["method.kd_t2_scale", "training.lr"]


def test_minilm_copy_replaces_the_packaged_model_everywhere(tmp_path):
    (tmp_path / "minilm").mkdir()
    (tmp_path / "minilm" / "config.json").write_text("{}")
    args = compare.parse_args(["--task", "trec6", "--minilm", str(tmp_path / "minilm")])
    assert f"model.student_init={tmp_path / 'minilm'}" in compare.teacher_overrides(args)
    sets = compare.student_overrides(args, "ctcd", 1, None, None)
    assert f"model.student_init={tmp_path / 'minilm'}" in sets
    assert f"method.ctcd_large_init={tmp_path / 'minilm'}" in sets
    assert not any(o.endswith("=all-MiniLM-L6-v2") for o in sets)
    assert compare.regenerate_command(args).endswith(f"--minilm {tmp_path / 'minilm'}")


def test_an_all_digit_teacher_checksum_stays_a_string():
    sets = compare.student_overrides(compare.parse_args(["--task", "trec6", "--size", "tiny"]), "kd", 1,
                                     Path("/t/export"), "1" * 64)
    assert f"model.teacher_sha256='{'1' * 64}'" in sets
    assert compare.load_config(str(REPO / compare.BASE_CONFIG), sets).model.teacher_sha256 == "1" * 64


def test_parallel_jobs_run_every_run_once_and_keep_the_grid_order(tmp_path, monkeypatch):
    fake = FakeLauncher(fail=("kd",))
    monkeypatch.setattr(compare.subprocess, "run", fake)
    assert compare.main(_grid(tmp_path, "--seeds", "1,2,3", "--jobs", "3")) == 1
    assert fake.calls[0][0] == "teacher"  # first, alone
    grid = [f"{m}_seed{s}" for m in ("ce", "kd", "pkd") for s in (1, 2, 3)]
    assert sorted(c[0] for c in fake.calls[1:]) == sorted(grid)
    data = json.loads((tmp_path / "out" / "trec6.json").read_text())
    assert [r["name"] for r in data["runs"]] == grid
    md = (tmp_path / "out" / "trec6.md").read_text()
    assert md.startswith("python bench/compare.py --task trec6 --methods ce,kd,pkd --seeds 1,2,3 --size tiny ")
    assert " --jobs 3" in md.splitlines()[0]
    assert "| kd | failed | failed | 0 (3 failed) |" in md


def test_a_new_teacher_reruns_the_students_that_read_it(tmp_path, monkeypatch):
    monkeypatch.setattr(compare.subprocess, "run", FakeLauncher())
    assert compare.main(_grid(tmp_path, "--methods", "ce,kd", "--seeds", "1")) == 0
    manifest = tmp_path / "work" / "trec6" / "teacher" / "export" / compare.EXPORT_MANIFEST
    manifest.write_text(json.dumps({"sha256": "f" * 64}))  # the teacher was retrained meanwhile
    fake = FakeLauncher()
    monkeypatch.setattr(compare.subprocess, "run", fake)
    compare.main(_grid(tmp_path, "--methods", "ce,kd", "--seeds", "1"))
    assert fake.calls == [("kd_seed1", ["--overwrite"])]  # ce does not read the teacher


def test_a_failed_teacher_skips_only_the_methods_that_need_it(tmp_path, monkeypatch):
    fake = FakeLauncher(fail=("teacher",))
    monkeypatch.setattr(compare.subprocess, "run", fake)
    assert compare.main(_grid(tmp_path, "--methods", "ce,kd", "--seeds", "1")) == 1
    assert [c[0] for c in fake.calls] == ["teacher", "ce_seed1"]
    md = (tmp_path / "out" / "trec6.md").read_text()
    assert "| kd | failed | failed | 0 (1 failed) |" in md
    assert "kd_seed1: `not run: the teacher run failed`" in md


# --------------------------------------------------------------------------- a real tiny grid


@pytest.mark.slow
def test_tiny_grid_end_to_end(tmp_path):
    """Teacher + ce and kd with two seeds each through the real launcher; the same command then reuses them."""
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--task", "trec6", "--methods", "ce,kd", "--seeds", "7,8", "--size", "tiny", "--launcher", "python",
            "--out", str(out), "--work_dir", str(work)]
    proc = _script(args, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    md = (out / "trec6.md").read_text().splitlines()
    assert md[0] == (f"python bench/compare.py --task trec6 --methods ce,kd --seeds 7,8 --size tiny --out {out} "
                     f"--work_dir {work} --launcher python")
    data = json.loads((out / "trec6.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["ce_seed7", "ce_seed8", "kd_seed7", "kd_seed8"]
    for r in [data["teacher"], *data["runs"]]:
        assert r["status"] == "ok" and r["results"]["steps"] == 2 and r["wall_seconds"] > 0
        assert set(r["results"]["final"]) == {"accuracy", "f1"}
        assert Path(r["run_dir"], "export", "config.json").is_file()
    assert [(r["results"]["method"], r["results"]["seed"]) for r in data["runs"]] == [
        ("ce", 7), ("ce", 8), ("kd", 7), ("kd", 8)]
    assert data["teacher"]["results"]["seed"] == compare.TEACHER_SEED
    # the table's cells are the mean and sample std of the runs' final metrics
    for method, runs in (("ce", data["runs"][:2]), ("kd", data["runs"][2:])):
        acc = [r["results"]["final"]["accuracy"] for r in runs]
        mean, std = sum(acc) / 2, abs(acc[0] - acc[1]) / 2 ** 0.5
        assert any(ln.startswith(f"| {method} | {mean:.4f} ± {std:.4f} | ") for ln in md), md
    # the real launcher's config.yaml matches what compare.py expects: nothing runs again
    again = _script(args, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("(reused)") == 5 and "fresh" not in again.stdout, again.stdout
