"""Compare finetuning-distillation methods on one task: a grid of methods x seeds through the real launchers.

    python bench/compare.py --task trec6 --methods ce,kd,codir --seeds 1,2,3 --size cpu \
        --out bench/results/compare_cpu

1. finetune the packaged all-MiniLM-L6-v2 with ``ce`` on the task: the teacher, once per task
   (``<work_dir>/<task>/teacher``, reused while its results.json exists and its config matches);
2. for every method and seed, one ``deepspeed --num_gpus N launchers/finetune.py ...`` job
   (``<work_dir>/<task>/<method>_seed<seed>``) with the size preset's settings, the method's
   own settings (``METHOD_SETTINGS``) and, for the methods that read a teacher, the teacher's
   export as ``model.teacher``;
3. write ``<out>/<task>.md`` (mean ± sample std over seeds of every validation metric, one row
   per method, in the order given), ``<out>/<task>.json`` (every run: results.json, command,
   run directory, wall seconds; failed runs with their error tail) and ``<out>/<task>.png``
   (bar chart of the main metric). The .md's first line is the command that regenerates it.

A failed run (e.g. a method not implemented yet) is recorded as failed and the grid goes on.
Re-running the same command reuses finished runs whose config matches, resumes interrupted ones
from their last checkpoint (``--resume``) and restarts the others in their own run directory
(``--overwrite``); ``--force`` reruns everything.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Optional

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.cli import ArgumentError, Parser, read_json, shown_command  # noqa: E402,F401 (re-exported)
from codir_ds.cli import DefaultsHelpFormatter  # noqa: E402
from codir_ds.config import ExperimentConfig, MethodConfig, load_config  # noqa: E402
from codir_ds.distill.methods import get_method, method_names, read_by  # noqa: E402
from codir_ds.engine.rundir import RESUMABLE_CHANGES  # noqa: E402
from codir_ds.errors import CodirError  # noqa: E402
from codir_ds.models.loading import EXPORT_MANIFEST  # noqa: E402
from codir_ds.pipeline import cpu_threads_per_rank, deepspeed_command, free_port  # noqa: E402

BASE_CONFIG = "configs/fine_movie_snippets_cpu.yaml"
MINILM = "all-MiniLM-L6-v2"  # the packaged model (codir_ds.assets): teacher, student layers, ctcd's larger model
LAUNCHER = "launchers/finetune.py"
TEACHER_SEED = 42  # the teacher does not depend on --seeds, so one teacher serves every grid of a task

# The packaged tasks; cr_ild's supplementary data is the other task's inputs (labels unused).
SUPPLEMENTARY = {"movie_snippets": "trec6", "trec6": "movie_snippets", "movie_snippets_regression": "trec6"}
TASKS = tuple(SUPPLEMENTARY)

# Size presets: --set overrides of BASE_CONFIG. "common" goes to the teacher and every student run.
# How the values were chosen (measured times) is in bench/README.md, "Method comparison".
PRESETS = {
    # 2 CPU cores (1 rank x 2 threads, fp32): one student run 33-52 s including DeepSpeed start-up and the
    # evaluation when the cores are otherwise idle; the teacher 107 s (trec6) / 167 s (movie_snippets).
    # lr 1e-3: at 2e-4 (the demo's, for 124 steps) the students were still at chance after 48 steps.
    "cpu": {
        "common": ["data.max_train_examples=2000", "data.max_eval_examples=null", "data.max_length=64",
                   "training.train_batch_size=32", "training.micro_batch_size=16", "training.eval_batch_size=128"],
        "teacher": ["model.student_init=all-MiniLM-L6-v2", "model.student_init_layers=null",
                    "training.max_steps=-1", "training.epochs=2", "training.lr=5e-5"],
        "student": ["model.student_init=all-MiniLM-L6-v2", "model.student_init_layers=[0,3]",
                    "training.max_steps=48", "training.lr=1e-3"],
        "teacher_model": "MiniLM 6L/384",
        "student_model": "2L/384 student from MiniLM layers 0 and 3",
    },
    # One H200, 1 rank, fp16 (ds_configs/zero2.json): whole training sets, no truncation (the longest
    # movie_snippets sentence has 68 tokens). Steps of these small models are bound by Python and
    # DeepSpeed (~0.13 s per student step, ~0.26 s per teacher step at batch 32 in the first H200
    # session, bench/results/h200) and each run starts in ~35 s: teacher and students use batch 64
    # and one epoch (so that both tasks' grids fit one 15-minute device lease), run with --jobs 6.
    "gpu": {
        "common": ["data.max_train_examples=null", "data.max_eval_examples=null", "data.max_length=128",
                   "training.eval_batch_size=256"],
        "teacher": ["model.student_init=all-MiniLM-L6-v2", "model.student_init_layers=null",
                    "training.train_batch_size=64", "training.micro_batch_size=64",
                    "training.max_steps=-1", "training.epochs=1", "training.lr=8e-5"],
        "student": ["model.student_init=all-MiniLM-L6-v2", "model.student_init_layers=[0,3]",
                    "training.train_batch_size=64", "training.micro_batch_size=64",
                    "training.max_steps=-1", "training.epochs=1", "training.lr=1e-3"],
        "teacher_model": "MiniLM 6L/384",
        "student_model": "2L/384 student from MiniLM layers 0 and 3",
    },
    # Seconds per run, for the tests: a 1-layer slice of MiniLM as teacher, a random 1L/32 student.
    "tiny": {
        "common": ["data.max_train_examples=48", "data.max_eval_examples=32", "data.max_length=16",
                   "training.train_batch_size=16", "training.micro_batch_size=16", "training.eval_batch_size=32",
                   "training.max_steps=2", "training.lr=1e-3"],
        "teacher": ["model.student_init=all-MiniLM-L6-v2", "model.student_init_layers=[0]"],
        "student": ["model.student_init=null", "model.student_init_layers=null", "model.student_layers=1",
                    "model.student_hidden=32", "model.student_heads=2"],
        "teacher_model": "MiniLM layer 0, 1L/384",
        "student_model": "random 1L/32 student",
    },
}

FINETUNE_METHODS = method_names("finetune")


def registry_settings(method: str) -> list[str]:
    """A method's own --set overrides (on top of the size preset and method.name / training.seed), from the
    registry: its headline keys at their defaults (``compare_keys``), then its fixed settings (``compare_sets``,
    where {supplementary} is the other packaged task and {max_train_examples} the preset's training-set cap)."""
    cls, defaults = get_method(method), MethodConfig(name=method)  # the method's own defaults, written out
    return [f"method.{key}={getattr(defaults, key)}" for key in cls.compare_keys] + list(cls.compare_sets)


METHOD_SETTINGS: dict[str, list[str]] = {name: registry_settings(name) for name in FINETUNE_METHODS}


def method_settings(method: str, task: str, common: list[str]) -> list[str]:
    """METHOD_SETTINGS[method] for ``task`` and the preset's ``common`` overrides."""
    max_train = next((o.split("=", 1)[1] for o in common if o.startswith("data.max_train_examples=")), "null")
    return [s.format(supplementary=SUPPLEMENTARY[task], max_train_examples=max_train)
            for s in METHOD_SETTINGS[method]]


def teacher_label(size: str) -> str:
    return f"teacher ({PRESETS[size]['teacher_model']}, ce)"


def uses_teacher(method: str) -> bool:
    """Whether the method's comparison runs read the finetuned teacher (model.teacher)."""
    cls = get_method(method)
    return cls(MethodConfig(name=method), "finetune").teacher is not None


# --------------------------------------------------------------------------- arguments


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = Parser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter, script="bench/compare.py")
    ap.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    ap.add_argument("--methods", default=",".join(FINETUNE_METHODS),
                    help=f"comma-separated, table rows in this order (default: {','.join(FINETUNE_METHODS)})")
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated integers (default 1,2,3)")
    ap.add_argument("--size", default="cpu", help=f"preset: {', '.join(PRESETS)} (default cpu)")
    ap.add_argument("--out", default=None, help="where <task>.md/.json/.png go (default bench/results/compare_<size>)")
    ap.add_argument("--work_dir", default=None, help="run directories (default runs/compare_<size>)")
    ap.add_argument("--ranks", type=int, default=1, help="data-parallel ranks per run (default 1)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="student runs at a time after the teacher (default 1; e.g. 6 on one H200, "
                         "bench/results/compare_h200: each run is a small model whose steps are bound by Python "
                         "and start-up, not by the GPU)")
    ap.add_argument("--launcher", default="deepspeed",
                    help="deepspeed (deepspeed --num_gpus N launchers/finetune.py) or python (python "
                         "launchers/finetune.py, one rank; saves the launcher's start-up)")
    ap.add_argument("--deepspeed_config", default="ds_configs/zero2.json")
    ap.add_argument("--minilm", default=MINILM,
                    help="a directory holding a copy of all-MiniLM-L6-v2 to use instead of the packaged one "
                         "(e.g. an fp16 copy carried to a GPU machine); default: the packaged model")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every student run (not the teacher; a method.* key only for the "
                         "methods that read it), repeatable")
    ap.add_argument("--force", action="store_true", help="rerun finished runs too (the teacher included)")
    return ap.parse_checked(argv, check_args)


def check_args(args: argparse.Namespace) -> None:
    """Normalise ``args`` in place; a bad value raises ArgumentError before anything runs."""
    if args.task not in TASKS:
        raise ArgumentError(f"unknown task {args.task!r}: choose one of {', '.join(TASKS)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ArgumentError(f"--methods is empty: list some of {','.join(FINETUNE_METHODS)}")
    for m in methods:
        if m not in FINETUNE_METHODS:
            raise ArgumentError(f"unknown method {m!r}: choose from {','.join(FINETUNE_METHODS)}")
    if len(set(methods)) != len(methods):
        raise ArgumentError(f"--methods lists a method twice: {args.methods}")
    args.methods = methods
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ArgumentError(f"--seeds must be comma-separated integers, e.g. 1,2,3; got {args.seeds!r}") from None
    if not seeds:
        raise ArgumentError("--seeds is empty: give at least one seed, e.g. --seeds 1,2,3")
    if len(set(seeds)) != len(seeds):
        raise ArgumentError(f"--seeds lists a seed twice: {args.seeds}")
    args.seeds = seeds
    if args.size not in PRESETS:
        raise ArgumentError(f"unknown --size {args.size!r}: choose one of {', '.join(PRESETS)}")
    if args.launcher not in ("deepspeed", "python"):
        raise ArgumentError(f"unknown --launcher {args.launcher!r}: choose deepspeed or python")
    if args.ranks < 1:
        raise ArgumentError(f"--ranks must be >= 1, got {args.ranks}")
    if args.jobs < 1:
        raise ArgumentError(f"--jobs must be >= 1, got {args.jobs}")
    if args.launcher == "python" and args.ranks != 1:
        raise ArgumentError(f"--launcher python runs one process: drop --ranks {args.ranks} or use "
                            f"--launcher deepspeed")
    if not (REPO / args.deepspeed_config).is_file():
        if not Path(args.deepspeed_config).is_file():
            raise ArgumentError(f"--deepspeed_config {args.deepspeed_config!r} does not exist: see ds_configs/")
        args.deepspeed_config = launcher_path(Path(args.deepspeed_config))  # the launchers run in the repository
    if args.minilm != MINILM:
        if not Path(args.minilm, "config.json").is_file():
            raise ArgumentError(f"--minilm {args.minilm!r} is not a model directory (no config.json)")
        args.minilm = launcher_path(Path(args.minilm))
    args.out = args.out or f"bench/results/compare_{args.size}"
    args.work_dir = args.work_dir or f"runs/compare_{args.size}"


def regenerate_command(args: argparse.Namespace) -> str:
    """The one command that regenerates ``<out>/<task>.md`` (first line of that file)."""
    cmd = ["python", "bench/compare.py", "--task", args.task, "--methods", ",".join(args.methods),
           "--seeds", ",".join(map(str, args.seeds)), "--size", args.size, "--out", args.out]
    if args.work_dir != f"runs/compare_{args.size}":
        cmd += ["--work_dir", args.work_dir]
    if args.ranks != 1:
        cmd += ["--ranks", str(args.ranks)]
    if args.jobs != 1:
        cmd += ["--jobs", str(args.jobs)]
    if args.launcher != "deepspeed":
        cmd += ["--launcher", args.launcher]
    if args.deepspeed_config != "ds_configs/zero2.json":
        cmd += ["--deepspeed_config", args.deepspeed_config]
    if args.minilm != MINILM:
        cmd += ["--minilm", args.minilm]
    for o in args.overrides:
        cmd += ["--set", o]
    return shlex.join(cmd)


# --------------------------------------------------------------------------- runs


def launcher_path(p: Path) -> str:
    """``p`` as the launcher (cwd = repository root) should see it: relative inside the repository."""
    p = p.resolve()
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


_MISSING = object()


def config_differences(saved: dict, expected: dict, defaults: Optional[dict] = None,
                       prefix: tuple = ()) -> list[str]:
    """Keys whose values differ between a run's saved config.yaml and the config it would get now.

    A key the saved config lacks (added to the code since) counts only if its value is not the default.
    """
    if defaults is None:
        defaults = ExperimentConfig().to_dict()
    out = []
    for key in sorted(set(saved) | set(expected)):
        path = prefix + (key,)
        a, b = saved.get(key, _MISSING), expected.get(key, _MISSING)
        if path[:1] == ("method",) and len(path) == 2 and b is _MISSING:
            continue  # an option the run's method does not read (older runs saved every method's options)
        d = defaults.get(key, _MISSING) if isinstance(defaults, dict) else _MISSING
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, d if isinstance(d, dict) else {}, path)
        elif a is _MISSING and b == d:
            continue
        elif a != b and path not in RESUMABLE_CHANGES:
            out.append(".".join(path))
    return out


def saved_config(run_dir: Path) -> Optional[dict]:
    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def plan_run(run_dir: Path, expected: dict, force: bool) -> tuple[str, str]:
    """What to do with one run directory: ('reuse' | 'resume' | 'overwrite' | 'fresh', why)."""
    saved = saved_config(run_dir)
    diff = config_differences(saved, expected) if saved is not None else None
    if read_json(run_dir / "results.json") is not None:
        if force:
            return "overwrite", "--force"
        if diff == []:
            return "reuse", "finished"
        why = "no readable config.yaml" if diff is None else f"config changed in {', '.join(diff[:4])}"
        return "overwrite", f"finished run's {why}"
    if not force and diff == [] and (run_dir / "checkpoints" / "latest").is_file():
        return "resume", "interrupted, checkpoint found"
    if run_dir.is_dir() and any(run_dir.iterdir()):
        return "overwrite", "interrupted before a checkpoint" if diff == [] else "leftover run directory"
    return "fresh", "new"


def error_summary(tail: str) -> str:
    """The one line that says why a run failed: its ``error:`` line, else the last exception line."""
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:"):
            return ln
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", ln):
            return ln
    return lines[-1] if lines else "no output"


def read_tail(path: Path, max_chars: int = 6000, max_lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_chars))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-max_lines:])


def launch_command(args: argparse.Namespace, launcher_args: list[str]) -> list[str]:
    if args.launcher == "python":
        return [sys.executable, str(REPO / LAUNCHER), *launcher_args]
    return deepspeed_command(LAUNCHER, args.ranks, launcher_args)


def execute(cmd: list[str], log: Path, processes: int) -> int:
    """Run one launcher job with its output in ``log``; the exit status."""
    env = dict(os.environ)
    if cmd[1:3] != ["-m", "deepspeed.launcher.runner"]:
        # A plain one-process launch: torch.distributed's default port 29500 may be taken by another job.
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env.setdefault("OMP_NUM_THREADS", str(cpu_threads_per_rank(processes)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write(shown_command(cmd) + "\n\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(REPO)).returncode


def run_one(args: argparse.Namespace, name: str, run_dir: Path, overrides: list[str], log: Path) -> dict:
    """Reuse, resume or run one job; a record for ``<task>.json`` (status 'ok' or 'failed')."""
    expected = load_config(str(REPO / BASE_CONFIG), overrides).to_dict()
    action, why = plan_run(run_dir, expected, args.force)
    launcher_args = ["--deepspeed_config", args.deepspeed_config, "--config", BASE_CONFIG]
    for o in overrides:
        launcher_args += ["--set", o]
    launcher_args += ["--output_dir", launcher_path(run_dir)]
    record = {"name": name, "run_dir": str(run_dir), "log": str(log), "action": action}
    if action == "reuse":
        sidecar = read_json(run_dir / "compare_run.json") or {}
        record.update(status="ok", results=read_json(run_dir / "results.json"),
                      command=sidecar.get("command"), wall_seconds=sidecar.get("wall_seconds"))
        return record
    if action != "fresh":
        launcher_args.append(f"--{action}")
    cmd = launch_command(args, launcher_args)
    record["command"] = shown_command(cmd)
    print(f"  {name}: {action} ({why}), log {log}", flush=True)
    t0 = time.perf_counter()
    code = execute(cmd, log, args.ranks * (args.jobs if name != "teacher" else 1))
    wall = round(time.perf_counter() - t0, 1)
    record["wall_seconds"] = wall
    results = read_json(run_dir / "results.json") if code == 0 else None
    if results is None:
        tail = read_tail(log)
        record.update(status="failed", exit_code=code, error=error_summary(tail), error_tail=tail)
        return record
    (run_dir / "compare_run.json").write_text(json.dumps({"command": record["command"], "wall_seconds": wall,
                                                          "action": action}, indent=2))
    record.update(status="ok", results=results)
    return record


def with_minilm(overrides: list[str], args: argparse.Namespace) -> list[str]:
    """``overrides`` with the packaged MiniLM replaced by ``--minilm`` (a copy of it in a directory)."""
    if args.minilm == MINILM:
        return overrides
    return [o.replace(f"={MINILM}", f"={args.minilm}") if o.endswith(f"={MINILM}") else o for o in overrides]


def teacher_overrides(args: argparse.Namespace) -> list[str]:
    p = PRESETS[args.size]
    return with_minilm([f"data.task={args.task}", "logging.progress_bar=false", *p["common"], *p["teacher"],
                        "method.name=ce", f"training.seed={TEACHER_SEED}"], args)


def student_overrides(args: argparse.Namespace, method: str, seed: int, teacher_export: Optional[Path],
                      teacher_sha256: Optional[str]) -> list[str]:
    p = PRESETS[args.size]
    out = [f"data.task={args.task}", "logging.progress_bar=false", *p["common"], *p["student"],
           f"method.name={method}", f"training.seed={seed}"]
    if uses_teacher(method):
        # The checksum ties the run's config to this teacher: a retrained teacher reruns its students.
        sha = teacher_sha256 or "unknown"
        if not isinstance(yaml.safe_load(sha), str):  # an all-digit checksum would be read as a number
            sha = f"'{sha}'"
        out += [f"model.teacher={launcher_path(teacher_export) if teacher_export else 'TEACHER'}",
                f"model.teacher_sha256={sha}"]
    # --set: every student, a method.* key only for the methods that read it
    return with_minilm(out + method_settings(method, args.task, p["common"]), args) + read_by(method, args.overrides)


# --------------------------------------------------------------------------- summary


def metric_names(records: list[dict], teacher: Optional[dict]) -> tuple[str, list[str]]:
    """(main metric, all metric names with the main one first), from the results' "final" dicts."""
    for r in ([teacher] if teacher else []) + records:
        res = r.get("results") if r else None
        if res and isinstance(res.get("final"), dict):
            main = res.get("main_metric") or next(iter(res["final"]))
            names = [main] + [k for k in res["final"] if k != main and k != "step"]
            return main, names
    return "accuracy", ["accuracy"]


def summarize(method: str, records: list[dict], names: list[str]) -> dict:
    """Mean, sample std (n - 1) and n of every metric over the method's finished seeds."""
    ok = [r for r in records if r["status"] == "ok"]
    row = {"method": method, "n": len(ok), "failed": len(records) - len(ok), "seeds": [r["seed"] for r in ok],
           "metrics": {}}
    for name in names:
        values = [float(r["results"]["final"][name]) for r in ok if name in r["results"].get("final", {})]
        if values:
            row["metrics"][name] = {"mean": statistics.fmean(values),
                                    "std": statistics.stdev(values) if len(values) > 1 else None,
                                    "n": len(values), "values": values}
    steps = sorted({r["results"]["steps"] for r in ok if r["results"].get("steps") is not None})
    row["steps"] = steps
    train = [r["results"]["train_seconds_this_session"] for r in ok
             if r["results"].get("train_seconds_this_session") is not None]
    wall = [r["wall_seconds"] for r in ok if r.get("wall_seconds") is not None]
    row["train_seconds_mean"] = statistics.fmean(train) if train else None
    row["wall_seconds_mean"] = statistics.fmean(wall) if wall else None
    return row


def format_cell(m: Optional[dict]) -> str:
    if m is None:
        return "–"
    if m["std"] is None:
        return f"{m['mean']:.4f}"
    return f"{m['mean']:.4f} ± {m['std']:.4f}"


def _seconds(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.0f}"


def _steps(steps: list) -> str:
    steps = [s for s in steps if s is not None]
    if not steps:
        return "–"
    return str(steps[0]) if len(steps) == 1 else f"{steps[0]}–{steps[-1]}"


def table_lines(rows: list[dict], names: list[str], teacher_row: Optional[dict]) -> list[str]:
    head = "| method | " + " | ".join(f"{n} (mean ± std)" for n in names) + " | n | steps | train s | run s |"
    lines = [head, "|" + "---|" * (len(names) + 5)]
    for row in ([teacher_row] if teacher_row else []) + rows:
        if row["n"] == 0:
            status = "failed" if row["failed"] else "not run"
            cells = [status] * len(names)
            n = f"0 ({row['failed']} failed)" if row["failed"] else "0"
        else:
            cells = [format_cell(row["metrics"].get(name)) for name in names]
            n = str(row["n"]) + (f" ({row['failed']} failed)" if row["failed"] else "")
        lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {n} | {_steps(row['steps'])} | "
                     f"{_seconds(row['train_seconds_mean'])} | {_seconds(row['wall_seconds_mean'])} |")
    return lines


def device_description(ranks: int) -> str:
    """GPU name(s) via nvidia-smi when there is one, else the CPU model from /proc/cpuinfo."""
    if shutil.which("nvidia-smi"):
        try:
            names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=30).stdout.split("\n")
            names = [n.strip() for n in names if n.strip()]
            if names:
                return f"{names[0]} ({ranks} of {len(names)} GPU(s) used)"
        except (OSError, subprocess.SubprocessError):
            pass
    model = platform.machine() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {ranks} rank(s)"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "deepspeed", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _yaml(value) -> str:
    return "null" if value is None else str(value)


def settings_lines(args: argparse.Namespace, teacher: Optional[dict], records: list[dict]) -> list[str]:
    """The grid's fixed settings, from the resolved configs and the runs' results."""
    p = PRESETS[args.size]
    cfg_t = load_config(str(REPO / BASE_CONFIG), teacher_overrides(args))
    cfg_s = load_config(str(REPO / BASE_CONFIG), student_overrides(args, args.methods[0], args.seeds[0], None, None))
    res_t = (teacher or {}).get("results") or {}
    first = next((r["results"] for r in records if r["status"] == "ok"), {})
    any_res = first or res_t
    t, d, tt = cfg_s.training, cfg_s.data, cfg_t.training
    steps = f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.epochs:g} epochs ({first.get('steps', '?')} steps)"
    t_steps = (f"{tt.max_steps} steps" if tt.max_steps > 0
               else f"{tt.epochs:g} epochs ({res_t.get('steps', '?')} steps)")
    n_train = any_res.get("num_train_examples", d.max_train_examples)
    n_val = any_res.get("num_validation_examples", d.max_eval_examples)
    lines = [
        f"- Teacher: {p['teacher_model']} ({args.minilm}) finetuned on {args.task} with ce for {t_steps}, "
        f"batch {tt.train_batch_size}, lr {tt.lr:g}, seed {TEACHER_SEED}.",
        f"- Students: {p['student_model']}; {steps} per run, batch {t.train_batch_size} (micro "
        f"{t.micro_batch_size}), lr {t.lr:g}, warm-up {t.warmup_ratio:g}, max_length {d.max_length}, "
        f"dropout {cfg_s.model.dropout:g}.",
        f"- Examples: {n_train} training (data.max_train_examples={_yaml(d.max_train_examples)}), {n_val} "
        f"validation (data.max_eval_examples={_yaml(d.max_eval_examples)}; null = the whole split); precision "
        f"{any_res.get('precision', '?')}; DeepSpeed config {args.deepspeed_config}; launcher {args.launcher}"
        + (f"; {args.jobs} student runs at a time (their seconds include that sharing)" if args.jobs > 1 else "")
        + ".",
        f"- Seeds: {', '.join(map(str, args.seeds))}. Metrics: the final validation evaluation after the last "
        f"step; mean ± sample standard deviation (n − 1) over the seeds that finished; n = finished seeds. "
        f"train s = mean training seconds (results.json, this session); run s = mean wall seconds of the "
        f"launcher job (start-up and evaluation included).",
        "- Per-method settings (--set, on top of the preset): "
        + "; ".join(f"{m}: {' '.join(method_settings(m, args.task, p['common'])) or 'none'}" for m in args.methods)
        + (f"; every student: {' '.join(args.overrides)}" if args.overrides else "") + ".",
    ]
    return lines


def write_markdown(path: Path, args: argparse.Namespace, teacher: Optional[dict], records: list[dict],
                   rows: list[dict], teacher_row: Optional[dict], names: list[str], device: str, date: str) -> None:
    lines = [regenerate_command(args), "",
             f"# {args.task}: finetuning distillation, {len(args.methods)} method(s) x {len(args.seeds)} seed(s) "
             f"(size preset {args.size})", "",
             f"- Device: {device}; {', '.join(f'{k} {v}' for k, v in versions().items())}.",
             f"- Date: {date} (UTC).", *settings_lines(args, teacher, records), "",
             *table_lines(rows, names, teacher_row)]
    failed = [r for r in ([teacher] if teacher else []) + records if r and r["status"] == "failed"]
    if failed:
        lines += ["", "Failed runs (error tails in the .json, full logs under the work directory):", ""]
        lines += [f"- {r['name']}: `{r['error']}`" for r in failed]
    path.write_text("\n".join(lines) + "\n")


def write_chart(path: Path, task: str, main: str, rows: list[dict], teacher_row: Optional[dict]) -> bool:
    """Bar chart of the main metric (mean, error bar = sample std); False when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows) + 1.5), 4.0))
    xs = list(range(len(rows)))
    means = [r["metrics"][main]["mean"] if main in r["metrics"] else 0.0 for r in rows]
    errs = [(r["metrics"][main]["std"] or 0.0) if main in r["metrics"] else 0.0 for r in rows]
    ax.bar(xs, means, yerr=errs, capsize=5, color="#4C72B0", edgecolor="black", linewidth=0.5)
    tops = [m + e for m, e in zip(means, errs)]
    top = max([1.0] + tops) if all(0.0 <= m <= 1.0 for m in means) else max(tops + [0.0]) * 1.15
    for x, r, t in zip(xs, rows, tops):
        if main in r["metrics"]:
            s = r["metrics"][main]
            label = f"{s['mean']:.3f}" + (f" ± {s['std']:.3f}" if s["std"] is not None else "") + f"\nn={s['n']}"
            ax.text(x, t + 0.01 * top, label, ha="center", va="bottom", fontsize=7)
        else:
            ax.text(x, 0.02 * top, "failed" if r["failed"] else "not run", ha="center", va="bottom", fontsize=8,
                    rotation=90)
    title = f"{task}: validation {main}, mean ± sample std over seeds"
    if teacher_row and main in teacher_row["metrics"]:
        tv = teacher_row["metrics"][main]["mean"]
        ax.axhline(tv, color="gray", linestyle="--", linewidth=1)
        title += f"\ndashed line: teacher {tv:.3f}"
    ax.set_xticks(xs, [r["method"] for r in rows])
    ax.set_ylabel(f"validation {main}")
    ax.set_ylim(min([0.0] + [m - e for m, e in zip(means, errs)]), top * 1.12)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(args: argparse.Namespace, teacher: Optional[dict], records: list[dict]) -> list[Path]:
    """(Re)write <out>/<task>.md, .json and .png from the records so far; the paths written."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    main, names = metric_names(records, teacher)
    by_method = {m: [r for r in records if r["method"] == m] for m in args.methods}
    rows = [summarize(m, by_method[m], names) for m in args.methods]
    teacher_row = None
    if teacher is not None:
        teacher_row = summarize(teacher_label(args.size), [{**teacher, "seed": TEACHER_SEED}], names)
    device = device_description(args.ranks)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    md, js, png = out / f"{args.task}.md", out / f"{args.task}.json", out / f"{args.task}.png"
    write_markdown(md, args, teacher, records, rows, teacher_row, names, device, date)
    data = {"task": args.task, "command": regenerate_command(args), "size": args.size, "preset": PRESETS[args.size],
            "methods": args.methods, "seeds": args.seeds, "main_metric": main, "metrics": names, "device": device,
            "date_utc": date, "versions": versions(), "work_dir": args.work_dir, "teacher": teacher, "runs": records,
            "summary": ([teacher_row] if teacher_row else []) + rows}
    js.write_text(json.dumps(data, indent=2))
    written = [md, js]
    if write_chart(png, args.task, main, rows, teacher_row):
        written.append(png)
    return written


# --------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    task_dir = Path(args.work_dir) / args.task
    teacher_dir = task_dir / "teacher"
    # Every config is validated before the first job starts (a bad --set is one line, exit 2).
    try:
        load_config(str(REPO / BASE_CONFIG), teacher_overrides(args))
        for m in args.methods:
            load_config(str(REPO / BASE_CONFIG), student_overrides(args, m, args.seeds[0], teacher_dir / "export",
                                                                   "0" * 64))
    except CodirError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if importlib.util.find_spec("matplotlib") is None:
        print(f"warning: matplotlib is not installed: {args.out}/{args.task}.png will not be written", flush=True)

    total = 1 + len(args.methods) * len(args.seeds)
    t_grid = time.perf_counter()
    print(f"[1/{total}] {teacher_label(args.size)}", flush=True)
    teacher = run_one(args, "teacher", teacher_dir, teacher_overrides(args), task_dir / "logs" / "teacher.log")
    teacher.update(method="ce", seed=TEACHER_SEED)
    _report(teacher, 1, total)
    teacher_export = teacher_dir / "export"
    teacher_sha = None
    if teacher["status"] == "ok":
        teacher_sha = (read_json(teacher_export / EXPORT_MANIFEST) or {}).get("sha256")
    grid = [(method, seed) for method in args.methods for seed in args.seeds]
    done: dict[tuple[str, int], dict] = {}
    lock = threading.Lock()

    def student(k: int, method: str, seed: int) -> None:
        name = f"{method}_seed{seed}"
        print(f"[{k}/{total}] {method} seed {seed}", flush=True)
        if uses_teacher(method) and teacher_sha is None:
            rec = {"name": name, "run_dir": str(task_dir / name), "status": "failed", "action": "skipped",
                   "error": "not run: the teacher run failed", "error_tail": ""}
        else:
            overrides = student_overrides(args, method, seed, teacher_export, teacher_sha)
            rec = run_one(args, name, task_dir / name, overrides, task_dir / "logs" / f"{name}.log")
        rec.update(method=method, seed=seed)
        with lock:
            done[(method, seed)] = rec
            _report(rec, k, total)
            write_outputs(args, teacher, [done[key] for key in grid if key in done])

    # --jobs > 1 runs students side by side (one accelerator or the CPU cores shared): the table's
    # seconds then include that sharing; the metrics do not depend on it.
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(student, k, m, s) for k, (m, s) in enumerate(grid, start=2)]:
            future.result()
    records = [done[key] for key in grid]
    written = write_outputs(args, teacher, records)
    failed = [r["name"] for r in [teacher] + records if r["status"] == "failed"]
    print(f"\ndone in {time.perf_counter() - t_grid:.0f} s; {len(failed)} failed run(s)"
          + (f": {', '.join(failed)}" if failed else ""), flush=True)
    print("written:\n" + "\n".join(f"  {p}" for p in written) + f"\nruns: {task_dir}", flush=True)
    return 1 if failed else 0


def _report(rec: dict, k: int, total: int) -> None:
    label = f"[{k}/{total}] {rec['method'] if rec['name'] != 'teacher' else 'teacher'} seed {rec['seed']}"
    if rec["status"] == "ok":
        res = rec["results"] or {}
        main = res.get("main_metric", "accuracy")
        value = (res.get("final") or {}).get(main)
        when = "reused" if rec["action"] == "reuse" else f"{rec.get('wall_seconds', 0):.0f} s"
        shown = f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else str(value)
        print(f"{label}: {main} {shown} ({when})", flush=True)
    else:
        extra = f" after {rec['wall_seconds']:.0f} s" if rec.get("wall_seconds") is not None else ""
        print(f"{label}: FAILED{extra}: {rec['error']}" + (f" (log {rec['log']})" if rec.get("log") else ""),
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
