"""Multi-stage pipelines built from the launchers: each stage is one ``deepspeed`` job.

A stage whose run directory already has ``results.json`` is reused; one that was
interrupted (it has a checkpoint) is continued with ``--resume``. So re-running a
pipeline never repeats or overwrites finished work.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from codir_ds.errors import CodirError

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_command(script: str, ranks: int, args: Sequence[str], master_port: Optional[int] = None) -> list[str]:
    """``deepspeed --num_gpus N script args``; on a CPU machine N is the number of CPU ranks."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--log_level", "warning", "--num_gpus", str(ranks),
            "--master_port", str(master_port or free_port()), str(REPO / script), *args]


def cpu_threads_per_rank(ranks: int) -> int:
    return max(1, (os.cpu_count() or 1) // ranks)


def run_stage(name: str, script: str, ranks: int, run_dir: Path, args: Sequence[str]) -> dict:
    """Run (or reuse, or resume) one training job; returns its results.json."""
    results = run_dir / "results.json"
    if results.is_file():
        print(f"[{name}] reusing finished run {run_dir}", flush=True)
        return json.loads(results.read_text())
    extra = ["--resume"] if (run_dir / "checkpoints" / "latest").is_file() else []
    if extra:
        print(f"[{name}] resuming interrupted run {run_dir}", flush=True)
    elif (run_dir / "config.yaml").is_file():
        # interrupted before its first checkpoint: nothing to keep (no results, no checkpoint), start it again
        extra = ["--overwrite"]
        print(f"[{name}] restarting {run_dir}: it was interrupted before its first checkpoint", flush=True)
    cmd = deepspeed_command(script, ranks, [*args, "--output_dir", str(run_dir), *extra])
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(cpu_threads_per_rank(ranks)))
    print(f"[{name}] {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=str(REPO))
    if proc.returncode != 0 or not results.is_file():
        raise CodirError(f"stage '{name}' failed (exit {proc.returncode}); its output is above and its run "
                         f"directory is {run_dir}; fix the cause and re-run to continue from there")
    print(f"[{name}] done in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(results.read_text())


def format_table(rows: list[dict], metric: str) -> str:
    """Markdown table of ``{"model", "method", "seed", metric, "steps"}`` rows."""
    header = f"| model | method | seed | validation {metric} | steps | samples/s |"
    lines = [header, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['seed']} | {r[metric]:.4f} | {r['steps']} | "
                     f"{r['samples_per_second']:.1f} |")
    return "\n".join(lines)
