"""Weak scaling of the training step (pre-training, or finetuning with --task finetune) on CPU ranks (gloo):
bench/throughput.py on 1, 2, 4, ... ranks.

    python bench/weak_scaling.py --ranks 1,2,4 --objectives kd,codir -- \\
        --teacher_layers 6 --teacher_hidden 384 --teacher_heads 12 --student_layers 3 \\
        --student_hidden 384 --student_heads 12 --seq_len 128 --micro_batch 16 --steps 6 --warmup 2 \\
        --precision fp32

For each world size N: ``deepspeed --num_gpus N bench/throughput.py <args> --objectives ... --output
<output_dir>/runs/ranks<N>.json`` on CPU ranks (``DS_ACCELERATOR=cpu``, no CUDA device visible),
``OMP_NUM_THREADS = max(1, cores // N)`` per rank. The per-rank micro-batch stays fixed, so the
global batch grows with N. Writes ``<output_dir>/weak_scaling.json`` (every run's full report and
the summary) and ``<output_dir>/weak_scaling.md`` (first line: the command that regenerates it; one
table per objective). A world size whose ``runs/ranks<N>.json`` exists is reused, not rerun, unless
``--force``. Every argument this script does not know (or everything after ``--``) goes to
bench/throughput.py verbatim. See bench/README.md, "Weak scaling".
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import throughput  # noqa: E402
from bench.cli import ArgumentError, Parser, read_json, shown_command  # noqa: E402

THROUGHPUT = "bench/throughput.py"
OBJECTIVES = ("mlm", "kd", "codir")   # the reference objectives (ref_*) run in one process only
DEFAULT_RANKS = "1,2,4"
DEFAULT_OBJECTIVES = "kd,codir"
DEFAULT_OUTPUT_DIR = "bench/results/weak_scaling_cpu"
DEFAULT_TIMEOUT_S = 3600.0
# Set by this script for every run: passing them through would break the bookkeeping.
RESERVED = ("--objectives", "--output", "--local_rank")
# The report's config fields that must match for a stored run to be reused.
COMPARED = ("teacher", "student", "vocab", "seq_len", "precision", "micro_batch", "grad_accum", "world_size",
            "steps", "warmup", "objectives", "num_examples", "num_negatives", "deepspeed_config",
            "breakdown_timing", "torch_threads")
# Compared too when both the report's config and bench/throughput.py's arguments have them.
COMPARED_IF_PRESENT = ("task", "schedule", "global_negatives")
TAIL_LINES = 20


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask), else the machine's logical cores."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_per_rank(ranks: int, cores: int) -> int:
    return max(1, cores // ranks)


# --------------------------------------------------------------------------- arguments

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Our options, and the rest for bench/throughput.py (validated by its own parser)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    after = []
    if "--" in argv:  # everything after the first "--" is bench/throughput.py's, verbatim
        cut = argv.index("--")
        argv, after = argv[:cut], argv[cut + 1:]
    from codir_ds.cli import DefaultsHelpFormatter
    ap = Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False, formatter_class=DefaultsHelpFormatter,
                script="bench/weak_scaling.py",
                 epilog="Any other argument (or everything after --) is passed to bench/throughput.py verbatim, "
                        "e.g. --teacher_layers 6 --seq_len 128 --micro_batch 16 --steps 6 --precision fp32.")
    ap.add_argument("--ranks", default=DEFAULT_RANKS, help=f"comma-separated world sizes (default {DEFAULT_RANKS})")
    ap.add_argument("--objectives", default=DEFAULT_OBJECTIVES,
                    help=f"comma-separated subset of {','.join(OBJECTIVES)} (default {DEFAULT_OBJECTIVES})")
    ap.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR, help=f"default {DEFAULT_OUTPUT_DIR}")
    ap.add_argument("--force", action="store_true", help="rerun world sizes whose runs/ranks<N>.json exists")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                    help=f"seconds one world size's job may take before it is stopped and recorded as failed "
                         f"(default {DEFAULT_TIMEOUT_S:.0f})")
    args, unknown = ap.parse_known_args(argv)
    args.throughput_args = unknown + after
    check_args(args)
    return args


def _parse_ranks(text: str) -> list[int]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise ArgumentError("--ranks is empty: give comma-separated world sizes, e.g. --ranks 1,2,4")
    ranks = []
    for s in items:
        try:
            n = int(s)
        except ValueError:
            raise ArgumentError(f"--ranks {text!r}: {s!r} is not an integer") from None
        if n < 1:
            raise ArgumentError(f"--ranks {text!r}: every world size must be >= 1, got {n}")
        ranks.append(n)
    return sorted(set(ranks))


def check_args(args: argparse.Namespace) -> None:
    """Normalise ``args`` in place; a bad value raises ArgumentError before anything runs."""
    args.ranks = _parse_ranks(args.ranks)
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    if not objectives:
        raise ArgumentError(f"--objectives is empty: give a comma-separated subset of {','.join(OBJECTIVES)}")
    for o in objectives:
        if o not in OBJECTIVES:
            raise ArgumentError(f"unknown objective {o!r}: choose from {','.join(OBJECTIVES)} "
                                f"(the ref_* references run in one process only)")
    args.objectives = list(dict.fromkeys(objectives))
    if not args.timeout > 0:
        raise ArgumentError(f"--timeout must be > 0, got {args.timeout}")
    for a in args.throughput_args:
        name = a.split("=", 1)[0]
        if name in RESERVED:
            raise ArgumentError(f"{name} is set by bench/weak_scaling.py for every run: "
                                f"use --objectives / --output_dir of bench/weak_scaling.py instead")
    args.bench = validate_throughput_args(args.throughput_args, args.objectives)
    if not os.path.isfile(args.bench.deepspeed_config):
        raise ArgumentError(f"--deepspeed_config {args.bench.deepspeed_config}: no such file")
    if args.bench.precision == "fp16":
        raise ArgumentError("--precision fp16 needs CUDA and these are CPU ranks: use --precision fp32 or bf16")
    for n in args.ranks:
        if args.bench.num_examples // n < args.bench.micro_batch:
            raise ArgumentError(f"--num_examples {args.bench.num_examples} gives each of {n} ranks fewer ids than "
                                f"--micro_batch {args.bench.micro_batch}: raise --num_examples")
    if args.bench.vocab < 30522:  # the packaged tokenizer's size; checked exactly only when it matters
        from codir_ds.assets import minilm_dir
        from codir_ds.models.loading import load_tokenizer
        size = len(load_tokenizer(minilm_dir()))
        if args.bench.vocab < size:
            raise ArgumentError(f"--vocab {args.bench.vocab} is smaller than the tokenizer's {size} tokens")


def validate_throughput_args(throughput_args: list[str], objectives: list[str]) -> argparse.Namespace:
    """bench/throughput.py's own parser and checks on the pass-through arguments; one line on error."""
    bench = throughput  # its module level imports the standard library only
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            return bench.parse_args([*throughput_args, "--objectives", ",".join(objectives)])
    except bench.BenchError as e:
        raise ArgumentError(f"bench/throughput.py arguments: {e}") from None
    except SystemExit:
        lines = [ln for ln in captured.getvalue().splitlines() if ln.strip()]
        why = next((ln.split("error:", 1)[1].strip() for ln in reversed(lines) if "error:" in ln), None)
        if why is None:  # --help after --: throughput.py's help
            raise ArgumentError("for bench/throughput.py's arguments run python bench/throughput.py --help") from None
        raise ArgumentError(f"bench/throughput.py arguments: {why}") from None


# --------------------------------------------------------------------------- the runs

def run_paths(output_dir: Path, ranks: int) -> dict[str, Path]:
    runs = output_dir / "runs"
    return {"report": runs / f"ranks{ranks}.json", "partial": runs / f"ranks{ranks}.json.partial",
            "launch": runs / f"ranks{ranks}.launch.json", "stdout": runs / f"ranks{ranks}.out",
            "stderr": runs / f"ranks{ranks}.err"}


def expected_config(args: argparse.Namespace, ranks: int, threads: int) -> dict:
    """The report config fields (COMPARED) a run of this world size will have."""
    b = args.bench
    return {
        "teacher": {"layers": b.teacher_layers, "hidden": b.teacher_hidden, "heads": b.teacher_heads},
        "student": {"layers": b.student_layers, "hidden": b.student_hidden, "heads": b.student_heads},
        "vocab": b.vocab, "seq_len": b.seq_len, "precision": b.precision, "micro_batch": b.micro_batch,
        "grad_accum": b.grad_accum, "world_size": ranks, "steps": b.steps, "warmup": b.warmup,
        "objectives": list(b.objectives), "num_examples": b.num_examples, "num_negatives": b.num_negatives,
        "deepspeed_config": os.path.relpath(os.path.abspath(b.deepspeed_config), REPO),
        "breakdown_timing": not b.no_breakdown, "torch_threads": threads,
        **{k: getattr(b, k) for k in COMPARED_IF_PRESENT if hasattr(b, k)},
    }


def config_differences(report: dict, expected: dict) -> list[str]:
    cfg = report.get("config", {}) if isinstance(report, dict) else {}
    diffs = []
    for key in COMPARED + tuple(k for k in COMPARED_IF_PRESENT if k in expected and k in cfg):
        have = cfg.get(key)
        if isinstance(have, dict) and isinstance(expected[key], dict):
            have = {k: have.get(k) for k in expected[key]}
        if have != expected[key]:
            diffs.append(f"{key} {have!r} -> {expected[key]!r}")
    return diffs


def plan(args: argparse.Namespace, cores: int) -> list[dict]:
    """Per world size: reuse the stored report or run. A stored run with other settings is an error."""
    output_dir = Path(args.output_dir)
    steps = []
    for n in args.ranks:
        threads = threads_per_rank(n, cores)
        paths = run_paths(output_dir, n)
        item = {"ranks": n, "threads_per_rank": threads, "paths": paths, "action": "run"}
        if not args.force and paths["report"].is_file():
            report = read_json(paths["report"])
            if report is None:
                item["why"] = f"{paths['report']} is not a readable JSON object: rerun"
            else:
                diffs = config_differences(report, expected_config(args, n, threads))
                if diffs:
                    raise ArgumentError(f"{paths['report']} was measured with other settings ({'; '.join(diffs)}): "
                                        f"use --force to replace it, or another --output_dir")
                item.update(action="reuse", report=report)
        steps.append(item)
    return steps


def remove_shm_buffers(port: int) -> None:
    """DeepSpeed 0.19's CPU comm op leaves a ~66 MB /dev/shm buffer per rank; a killed rank cannot remove its own."""
    for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        with contextlib.suppress(OSError):
            f.unlink()


def launch_command(args: argparse.Namespace, ranks: int, port: int, output: Path) -> list[str]:
    from codir_ds.pipeline import deepspeed_command
    return deepspeed_command(THROUGHPUT, ranks, [*args.throughput_args, "--objectives", ",".join(args.objectives),
                                                 "--output", str(output)], master_port=port)


def shown_launch(cmd: list[str], threads: int) -> str:
    """The launch as a user types it, with its environment."""
    return shown_command(cmd, f"DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS={threads}")


def run_env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu",
               CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))  # as scripts/env.sh
    return env


def _stop(proc: subprocess.Popen) -> None:
    """Stop the launcher and its ranks (their own process group, started by us)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def error_summary(text: str) -> str:
    """The line that says why a run failed (``bench/compare.py``'s rule), read past the launcher's ``[rankN]:``."""
    from bench.compare import error_summary as summary
    return summary("\n".join(re.sub(r"^\[rank\d+\]:\s*", "", ln) for ln in text.splitlines()))


def run_world_size(args: argparse.Namespace, item: dict) -> dict:
    """Launch bench/throughput.py on ``item['ranks']`` CPU ranks; a record with status ok or failed."""
    from codir_ds.pipeline import free_port
    n, threads, paths = item["ranks"], item["threads_per_rank"], item["paths"]
    paths["report"].parent.mkdir(parents=True, exist_ok=True)
    for key in ("report", "partial", "launch"):
        paths[key].unlink(missing_ok=True)
    port = free_port()
    cmd = launch_command(args, n, port, paths["partial"].resolve())
    record = {"ranks": n, "threads_per_rank": threads, "action": "run", "command": shown_launch(cmd, threads),
              "master_port": port, "stdout_log": str(paths["stdout"]), "stderr_log": str(paths["stderr"]),
              "load_average_before": list(os.getloadavg()),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    t0 = time.perf_counter()
    code, timed_out = None, False
    try:
        with open(paths["stdout"], "w") as out, open(paths["stderr"], "w") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=run_env(threads), cwd=os.getcwd(),
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _stop(proc)
                code = proc.returncode
            except BaseException:  # Ctrl-C: take the ranks down with us
                _stop(proc)
                raise
    finally:
        remove_shm_buffers(port)
    record["wall_seconds"] = round(time.perf_counter() - t0, 1)
    record["load_average_after"] = list(os.getloadavg())
    report = read_json(paths["partial"]) if code == 0 else None
    problem = None  # for a non-zero exit status the run's own error line says why
    if timed_out:
        problem = f"stopped after --timeout {args.timeout:g} s"
    elif code != 0:
        pass
    elif report is None:
        problem = f"exit 0 but no JSON report in {paths['partial']}"
    else:
        cfg = report.get("config", {})
        missing = [o for o in args.objectives if o not in report.get("results", {})]
        if cfg.get("world_size") != n:
            problem = f"the report says world_size {cfg.get('world_size')!r}, launched {n}"
        elif missing:
            problem = f"the report has no results for {','.join(missing)}"
    if timed_out or code != 0 or problem:
        paths["partial"].unlink(missing_ok=True)
        stderr_tail = tail(paths["stderr"])
        record.update(status="failed", exit_status=code, timed_out=timed_out,
                      error=problem or error_summary(stderr_tail), stderr_tail=stderr_tail)
        return record
    os.replace(paths["partial"], paths["report"])
    launch = {k: record[k] for k in ("command", "threads_per_rank", "master_port", "started", "wall_seconds",
                                     "load_average_before", "load_average_after")}
    paths["launch"].write_text(json.dumps(launch, indent=2) + "\n")
    record.update(status="ok", report=report)
    return record


def reused_record(item: dict) -> dict:
    record = {"ranks": item["ranks"], "threads_per_rank": item["threads_per_rank"], "action": "reuse",
              "stdout_log": str(item["paths"]["stdout"]), "stderr_log": str(item["paths"]["stderr"])}
    launch = read_json(item["paths"]["launch"]) or {}
    record.update({k: v for k, v in launch.items() if k != "threads_per_rank"})
    record.update(status="ok", report=item["report"])
    return record


# --------------------------------------------------------------------------- summary and table

def summarize(records: list[dict], objectives: list[str], cores: int) -> dict:
    """Per objective, one row per world size (ascending); efficiencies against the baseline world size.

    ``records``: ``{"ranks", "threads_per_rank", "status": "ok"|"failed", "report"}`` (report when ok).
    The baseline is N = 1 when it succeeded, else the smallest world size that did.
    """
    records = sorted(records, key=lambda r: r["ranks"])
    ok = [r for r in records if r["status"] == "ok"]
    base = ok[0]["ranks"] if ok else None
    summary = {"cores": cores, "baseline_ranks": base, "objectives": {},
               "oversubscribed_ranks": [r["ranks"] for r in records
                                        if r["ranks"] * r["threads_per_rank"] > cores]}
    for obj in objectives:
        rows = []
        base_row = None
        for r in records:
            n, threads = r["ranks"], r["threads_per_rank"]
            row = {"ranks": n, "threads_per_rank": threads, "status": r["status"],
                   "oversubscribed": n * threads > cores}
            if r["status"] == "ok":
                cfg, res = r["report"]["config"], r["report"]["results"][obj]
                total = res["samples_per_second"]
                row.update(threads_per_rank=cfg.get("torch_threads", threads),
                           global_batch=cfg["train_batch_size"], samples_per_second=total,
                           samples_per_second_per_rank=total / n, step_time_mean_s=res["step_time_mean_s"],
                           bank_allgather_bytes_per_step=res["bank_allgather_bytes_per_step"],
                           batch_negatives_allgather_bytes_per_step=res["batch_negatives_allgather_bytes_per_step"],
                           device=cfg.get("device"))
                if n == base:
                    base_row = row
            rows.append(row)
        for row in rows:
            if row["status"] == "ok" and base_row is not None:
                row["weak_scaling_efficiency"] = (row["samples_per_second_per_rank"]
                                                  / base_row["samples_per_second_per_rank"])
                row["total_over_baseline"] = row["samples_per_second"] / base_row["samples_per_second"]
            else:
                row["weak_scaling_efficiency"] = row["total_over_baseline"] = None
        summary["objectives"][obj] = rows
    return summary


def _fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def format_table(rows: list[dict], base: Optional[int]) -> str:
    b = base if base is not None else 1
    head = ["ranks", "threads per rank", "global batch", "samples/s total", "samples/s per rank",
            f"weak-scaling efficiency (vs N={b})", f"samples/s total vs N={b}", "step time (s)",
            "bank all-gather bytes/step", "batch_negatives all-gather bytes/step", "device"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            cells = [str(r["ranks"]), str(r["threads_per_rank"]), "failed"] + ["–"] * (len(head) - 3)
        else:
            ranks = f"{r['ranks']} (oversubscribed)" if r["oversubscribed"] else str(r["ranks"])
            cells = [ranks, str(r["threads_per_rank"]), str(r["global_batch"]),
                     _fmt(r["samples_per_second"], ".2f"), _fmt(r["samples_per_second_per_rank"], ".2f"),
                     _fmt(r["weak_scaling_efficiency"], ".3f"), _fmt(r["total_over_baseline"], ".3f"),
                     _fmt(r["step_time_mean_s"], ".3f"), str(r["bank_allgather_bytes_per_step"]),
                     str(r["batch_negatives_allgather_bytes_per_step"]), str(r["device"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def regenerate_command(args: argparse.Namespace) -> str:
    out = os.path.abspath(args.output_dir)
    rel = os.path.relpath(out, REPO)
    parts = ["python", "bench/weak_scaling.py", "--ranks", ",".join(map(str, args.ranks)),
             "--objectives", ",".join(args.objectives), "--output_dir", out if rel.startswith("..") else rel]
    if args.timeout != DEFAULT_TIMEOUT_S:
        parts += ["--timeout", f"{args.timeout:g}"]
    if args.throughput_args:
        parts += ["--", *args.throughput_args]
    return shlex.join(parts)


def notes(summary: dict, records: list[dict]) -> list[str]:
    cores = summary["cores"]
    out = [f"The ranks are processes on this one machine ({cores} cores available), communicating through gloo "
           f"and DeepSpeed's shared-memory all-reduce: there is no network here. Each rank gets "
           f"OMP_NUM_THREADS = max(1, {cores} // N) threads, so the ranks split the same cores instead of each "
           f"bringing its own: if one rank already kept every core busy, perfect scaling here would keep the "
           f"total samples/s of N = 1 (per-rank efficiency 1/N), while a step too small to use all its threads "
           f"gains total throughput from more ranks. Read the 'samples/s total vs N' column alongside the "
           f"efficiency."]
    for n in summary["oversubscribed_ranks"]:
        t = next(r["threads_per_rank"] for r in records if r["ranks"] == n)
        out.append(f"N = {n}: {n} ranks x {t} thread(s) on {cores} cores oversubscribe the cores, so the "
                   f"efficiency there measures oversubscription, not the interconnect.")
    if summary["baseline_ranks"] not in (None, 1):
        out.append(f"No successful 1-rank run: efficiencies are relative to N = {summary['baseline_ranks']}.")
    return out


def write_outputs(args: argparse.Namespace, records: list[dict], cores: int) -> tuple[Path, Path]:
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    records = sorted(records, key=lambda r: r["ranks"])
    summary = summarize(records, args.objectives, cores)
    command = regenerate_command(args)
    first = next((r["report"] for r in records if r["status"] == "ok"), None)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    data = {"benchmark": "codir-ds weak scaling on CPU ranks (bench/weak_scaling.py)", "command": command,
            "date": now, "cores": cores, "ranks": args.ranks, "objectives": args.objectives,
            "throughput_args": args.throughput_args, "launcher": "deepspeed --num_gpus N (CPU ranks, gloo)",
            "python_version": platform.python_version(), "notes": notes(summary, records),
            "summary": summary, "runs": records}
    json_path = output_dir / "weak_scaling.json"
    json_path.write_text(json.dumps(data, indent=2) + "\n")

    md = [command, "", "# Weak scaling of bench/throughput.py on CPU ranks (gloo)", ""]
    if first is not None:
        c = first["config"]
        task = f"task {c['task']}, " if c.get("task") else ""
        md.append(f"- Setup: {task}teacher {c['teacher']['layers']}L/{c['teacher']['hidden']} -> student "
                  f"{c['student']['layers']}L/{c['student']['hidden']}, seq {c['seq_len']}, {c['precision']}, "
                  f"micro-batch {c['micro_batch']} per rank x accum {c['grad_accum']} (fixed: the global batch is "
                  f"micro x accum x N), {c['steps']} timed steps after {c['warmup']} warm-up, "
                  f"{c['num_negatives']} negatives, {c['num_examples']} bank rows, {c['deepspeed_config']} "
                  f"(ZeRO-{c['zero_stage']}); torch {c['torch_version']}, deepspeed {c['deepspeed_version']}, "
                  f"transformers {c['transformers_version']}.")
    md.append(f"- Each world size N: `deepspeed --num_gpus N bench/throughput.py ...` on CPU ranks "
              f"(DS_ACCELERATOR=cpu, no CUDA device), reports in `runs/ranks<N>.json`. Written {now}.")
    md.append("- Weak-scaling efficiency = (samples/s per rank at N) / (samples/s per rank at the baseline N); "
              "samples/s are global (all ranks); step time is rank 0's mean; all-gather bytes per step are "
              "the report's `bank_allgather_bytes_per_step` and `batch_negatives_allgather_bytes_per_step`.")
    md += [f"- {line}" for line in notes(summary, records)]
    for r in records:
        if r.get("wall_seconds") is not None:
            la, lb = r.get("load_average_before"), r.get("load_average_after")
            load = f", 1-min load average {la[0]:.2f} before / {lb[0]:.2f} after" if la and lb else ""
            when = f" at {r['started']}" if r.get("started") else ""
            reused = " (reused from an earlier invocation)" if r.get("action") == "reuse" else ""
            md.append(f"- N = {r['ranks']}: launched{when}{reused}, job wall time {r['wall_seconds']:.0f} s "
                      f"(start-up included){load}.")
    for obj in args.objectives:
        md += ["", f"## {obj}", "", format_table(summary["objectives"][obj], summary["baseline_ranks"])]
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        md += ["", "Failed runs:", ""]
        md += [f"- N = {r['ranks']}: exit status {r.get('exit_status')}: {r.get('error')} "
               f"(log {r.get('stderr_log')})" for r in failed]
    md_path = output_dir / "weak_scaling.md"
    md_path.write_text("\n".join(md) + "\n")
    return json_path, md_path


# --------------------------------------------------------------------------- main

def main(argv: Optional[list[str]] = None) -> int:
    cores = cpu_cores()
    try:
        args = parse_args(argv)
        steps = plan(args, cores)
    except ArgumentError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    records = []
    t_all = time.perf_counter()
    for item in steps:
        n, threads = item["ranks"], item["threads_per_rank"]
        if item["action"] == "reuse":
            print(f"N={n}: reusing {item['paths']['report']} (--force reruns it)", flush=True)
            record = reused_record(item)
        else:
            extra = " (oversubscribed)" if n * threads > cores else ""
            print(f"N={n}: {n} rank(s) x {threads} thread(s) on {cores} cores{extra}"
                  + (f"; {item['why']}" if item.get("why") else ""), flush=True)
            record = run_world_size(args, item)
            if record["status"] == "ok":
                print(f"N={n}: done in {record['wall_seconds']:.0f} s", flush=True)
            else:
                print(f"N={n}: FAILED (exit status {record['exit_status']}): {record['error']} "
                      f"(log {record['stderr_log']})", flush=True)
        records.append(record)
        write_outputs(args, records, cores)  # a partial table after every run
    json_path, md_path = write_outputs(args, records, cores)
    failed = [r["ranks"] for r in records if r["status"] != "ok"]
    print(f"wrote {md_path} and {json_path} in {time.perf_counter() - t_all:.0f} s; {len(failed)} failed world "
          f"size(s)" + (f": {', '.join(map(str, failed))}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
