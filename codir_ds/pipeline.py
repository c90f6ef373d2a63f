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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from codir_ds.assets import sha256_file
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


# Written next to a finished stage's output: how long the run that finished the stage took, and a digest of
# the file that marks it finished (results.json; a redone run leaves a stale record, which is then ignored).
STAGE_TIME = "stage_time.json"


@dataclass
class StageRecord:
    name: str
    seconds: Optional[float]  # wall time of the run that finished the stage (None: not recorded)
    reused: bool              # finished by an earlier run, reused by this one


# This process's stages in order (run_stage and record_stage append): what the pipeline's timing line reports.
STAGES: list[StageRecord] = []


def record_stage(name: str, seconds: Optional[float], reused: bool) -> None:
    STAGES.append(StageRecord(name, seconds, reused))


def write_stage_time(run_dir: Path, seconds: float, finished: str = "results.json") -> None:
    """Record that the stage whose output is ``run_dir`` (``finished``: the file that marks it done, as it is
    now) took ``seconds``."""
    (run_dir / STAGE_TIME).write_text(json.dumps(
        {"seconds": round(seconds, 1), "finished": finished, "sha256": sha256_file(run_dir / finished)}) + "\n")


def read_stage_time(run_dir: Path, finished: str = "results.json") -> Optional[float]:
    """Seconds the run that wrote ``run_dir / finished`` took; None when not recorded, or recorded for another
    version of that file (the stage was redone without the pipeline)."""
    try:
        data = json.loads((run_dir / STAGE_TIME).read_text())
        if data["finished"] == finished and data["sha256"] == sha256_file(run_dir / finished):
            return float(data["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def timing_note(elapsed: float, stages: Optional[Sequence[StageRecord]] = None) -> str:
    """How long a pipeline took, for its summary line: ``"528 s"``, or with reused stages what they had taken,
    e.g. ``"all 7 stages reused from earlier runs that took 528 s"`` (``stages``: default this process's)."""
    stages = STAGES if stages is None else stages
    reused = [s for s in stages if s.reused]
    if not reused:
        return f"{elapsed:.0f} s"
    known = [s.seconds for s in reused if s.seconds is not None]
    took = f"that took {sum(known):.0f} s" if known else "whose time was not recorded"
    if len(known) not in (0, len(reused)):
        took += f" ({len(reused) - len(known)} of them without a recorded time)"
    if len(reused) == len(stages):
        rest = f"; this run {elapsed:.0f} s" if elapsed >= 1 else ""  # e.g. the main job's deployment report
        return f"all {len(stages)} stages reused from earlier runs {took}{rest}"
    return f"{elapsed:.0f} s, with {len(reused)} of {len(stages)} stages reused from earlier runs {took}"


def run_job(cmd: list[str], env: dict) -> int:
    """Run one launcher job from the repository root; its exit status. On Ctrl-C (which reaches the job too: its
    ranks finish their optimizer step and save a checkpoint) keep waiting for it; a second Ctrl-C stops waiting."""
    proc = subprocess.Popen(cmd, env=env, cwd=str(REPO))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return proc.wait()


def run_stage(name: str, script: str, ranks: int, run_dir: Path, args: Sequence[str]) -> dict:
    """Run (or reuse, or resume) one training job; returns its results.json (and records its time in STAGES)."""
    results = run_dir / "results.json"
    if results.is_file():
        seconds = read_stage_time(run_dir)
        print(f"[{name}] reusing finished run {run_dir}" + (f" (it took {seconds:.0f} s)" if seconds is not None
                                                           else ""), flush=True)
        record_stage(name, seconds, reused=True)
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
    code = run_job(cmd, env)
    marker = run_dir / "preempted.json"  # codir_ds.engine.preemption.MARKER
    if marker.is_file():
        stop = json.loads(marker.read_text())
        raise CodirError(f"stage '{name}' was stopped by {stop.get('signal')} after step {stop.get('step')} and saved "
                         f"a checkpoint in {run_dir}: re-run the same command to continue from there")
    if code != 0 or not results.is_file():
        raise CodirError(f"stage '{name}' failed (exit {code}); its output is above and its run "
                         f"directory is {run_dir}; fix the cause and re-run to continue from there")
    seconds = time.perf_counter() - t0
    print(f"[{name}] done in {seconds:.0f} s", flush=True)
    write_stage_time(run_dir, seconds)
    record_stage(name, seconds, reused=False)
    return json.loads(results.read_text())


def format_table(rows: list[dict], metric: str) -> str:
    """Markdown table of ``{"model", "method", "seed", metric, "steps"}`` rows."""
    header = f"| model | method | seed | validation {metric} | steps | samples/s |"
    lines = [header, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['seed']} | {r[metric]:.4f} | {r['steps']} | "
                     f"{r['samples_per_second']:.1f} |")
    return "\n".join(lines)
