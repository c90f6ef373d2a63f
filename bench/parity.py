"""Behaviour parity of two checkouts: the same reference runs, compared field by field.

    git worktree add /tmp/codir_before <commit>     # the code before a change
    python bench/parity.py --before /tmp/codir_before --teacher runs/teacher/export --out runs/parity

Each reference run (tiny settings, a few optimizer steps with checkpoints) is launched once from each checkout
(``python launchers/<stage>.py`` with the checkout as working directory). Compared, exactly:

- ``results.json`` (timings, paths and the config echo aside): metrics, history, diagnostics, step counts;
- every TensorBoard scalar (tag set and values; throughput tags aside);
- the exported weights (the export manifests' sha256);
- every checkpoint's per-rank state: sampler position, RNG states, memory bank rows and update counts, extras
  (the EMA copy).

The finetuning runs use ``--teacher`` (a classifier finetuned on ``--task``); the pre-training runs a teacher
with a fitted MLM head, made once under ``--out`` with ``launchers/fit_teacher_head.py``. Writes
``<out>/parity.json`` and prints one line per run; exit status 1 when any run differs or fails.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
DS = "ds_configs/zero2.json"
FINE = ["data.max_train_examples=96", "data.max_eval_examples=64", "training.max_steps=4",
        "training.train_batch_size=16", "training.micro_batch_size=8", "training.eval_every=2",
        "training.checkpoint_every=2", "training.keep_checkpoints=10", "logging.log_every=1",
        "logging.progress_bar=false", "model.teacher_sha256=null"]
PRE = ["corpus.max_documents=200", "corpus.block_size=64", "corpus.validation_blocks=16", "training.max_steps=3", "training.train_batch_size=16",
       "training.micro_batch_size=8", "training.checkpoint_every=1", "training.keep_checkpoints=10",
       "training.eval_every=0", "logging.log_every=1", "logging.progress_bar=false", "model.teacher_sha256=null"]
# name: (launcher, config, overrides beyond FINE / PRE); {teacher}, {mlm_teacher}, {task}, {supplementary} filled in
REFERENCE_RUNS = {
    "fine_codir": ("finetune", "configs/fine_movie_snippets_cpu.yaml", ["method.name=codir"]),
    "fine_tinybert": ("finetune", "configs/fine_movie_snippets_cpu.yaml", ["method.name=tinybert"]),
    "fine_pkd": ("finetune", "configs/fine_movie_snippets_cpu.yaml", ["method.name=pkd"]),
    "fine_distilbert": ("finetune", "configs/fine_movie_snippets_cpu.yaml", ["method.name=distilbert"]),
    "fine_cr_ild_ema": ("finetune", "configs/fine_movie_snippets_cpu.yaml",
                        ["method.name=cr_ild", "method.consistency_ema=0.9", "data.supplementary={supplementary}",
                         "data.supplementary_max_examples=64"]),
    "fine_kd_cache": ("finetune", "configs/fine_movie_snippets_cpu.yaml",
                      ["method.name=kd", "training.teacher_cache=true", "training.max_steps=8"]),
    "fine_ctcd": ("finetune", "configs/fine_ctcd_cpu.yaml",
                  ["method.ctcd_large_init=null", "method.ctcd_large_layers=2", "method.ctcd_large_hidden=128",
                   "method.ctcd_large_heads=2", "model.teacher=null"]),
    "pre_codir_kd": ("pretrain", "configs/pre_codir_cpu.yaml",
                     ["method.alpha_kd=0.5", "method.num_negatives=15", "model.teacher={mlm_teacher}"]),
    "pre_tinybert": ("pretrain", "configs/pre_codir_cpu.yaml",
                     ["method.name=tinybert", "method.alpha_kd=0", "model.teacher=all-MiniLM-L6-v2"]),
    "pre_ctcd": ("pretrain", "configs/pre_ctcd_cpu.yaml", ["model.teacher=null"]),
}
SUPPLEMENTARY = {"trec6": "movie_snippets", "movie_snippets": "trec6"}
VOLATILE = ("seconds", "per_second", "samples_per_s", "export_dir", "run_dir", "elapsed", "date", "time")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--before", required=True, help="checkout of the earlier code (e.g. a git worktree)")
    ap.add_argument("--after", default=str(REPO), help="checkout of the later code (default: this one)")
    ap.add_argument("--teacher", required=True, help="finetuned classifier of --task (export directory)")
    ap.add_argument("--task", default="trec6", choices=sorted(SUPPLEMENTARY))
    ap.add_argument("--runs", default=",".join(REFERENCE_RUNS), help="comma-separated reference runs")
    ap.add_argument("--out", default="runs/parity")
    ap.add_argument("--report_only", action="store_true",
                    help="compare the runs already under --out (both sides finished) without launching any")
    args = ap.parse_args(argv)
    for side in ("before", "after"):
        if not (Path(getattr(args, side)) / "launchers" / "finetune.py").is_file():
            ap.error(f"--{side} {getattr(args, side)!r} is not a codir-ds checkout (no launchers/finetune.py)")
    if not (Path(args.teacher) / "config.json").is_file():
        ap.error(f"--teacher {args.teacher!r} holds no model (no config.json): pass a finetuned classifier's export")
    args.runs = [r for r in args.runs.split(",") if r]
    unknown = [r for r in args.runs if r not in REFERENCE_RUNS]
    if unknown:
        ap.error(f"--runs: unknown {', '.join(unknown)}; choose from {', '.join(REFERENCE_RUNS)}")
    return args


def launch(root: Path, stage: str, config: str, sets: list[str], out_dir: Path, log: Path) -> int:
    """One run from checkout ``root`` (its own code first on the path), single process."""
    env = dict(os.environ, PYTHONPATH=str(root), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, f"launchers/{stage}.py", "--deepspeed_config", DS, "--config", config,
           *[a for kv in sets for a in ("--set", kv)], "--output_dir", str(out_dir.resolve()), "--overwrite"]
    with open(log, "w") as f:
        return subprocess.run(cmd, cwd=str(root), env=env, stdout=f, stderr=subprocess.STDOUT).returncode


def mlm_teacher(args, work: Path) -> Path:
    """A teacher with a fitted MLM head for the pre-training runs (made once, by the --after checkout)."""
    out = work / "teacher_mlm"
    if not (out / "config.json").is_file():
        cmd = [sys.executable, "launchers/fit_teacher_head.py", "--teacher", "all-MiniLM-L6-v2", "--output_dir",
               str(out.resolve()), "--config", "configs/pre_codir_cpu.yaml", "--steps", "5", "--overwrite"]
        subprocess.run(cmd, cwd=args.after, env=dict(os.environ, PYTHONPATH=args.after), check=True,
                       stdout=subprocess.DEVNULL)
    return out.resolve()


def run_settings(args, name: str, teacher_mlm: Optional[Path]) -> tuple[str, str, list[str]]:
    stage, config, extra = REFERENCE_RUNS[name]
    fill = {"teacher": str(Path(args.teacher).resolve()), "mlm_teacher": str(teacher_mlm),
            "task": args.task, "supplementary": SUPPLEMENTARY[args.task]}
    base = (FINE + [f"data.task={args.task}", f"model.teacher={fill['teacher']}"]) if stage == "finetune" else PRE
    return stage, config, base + [kv.format(**fill) for kv in extra]


# --------------------------------------------------------------------------- what is compared

def clean(value, run_dir: str):
    """``value`` with volatile keys dropped and the run directory replaced by ``<run>``."""
    if isinstance(value, dict):
        return {k: clean(v, run_dir) for k, v in value.items() if not any(w in k for w in VOLATILE)}
    if isinstance(value, list):
        return [clean(v, run_dir) for v in value]
    if isinstance(value, str):
        return value.replace(run_dir, "<run>")
    return value


def scalars(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = {}
    for events in sorted({p.parent for p in run_dir.glob("**/events.out.tfevents.*")}):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if not any(w in tag for w in VOLATILE):
                out[f"{events.relative_to(run_dir)}/{tag}"] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return out


def rank_states(run_dir: Path) -> dict:
    import torch
    return {str(p.relative_to(run_dir)): torch.load(p, map_location="cpu", weights_only=False)
            for p in sorted(run_dir.glob("checkpoints/*/codir_rank_*.pt"))}


def exports(run_dir: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text()).get("sha256")
            for p in sorted(run_dir.glob("export*/codir_export.json"))}


def differences(a, b, path: str = "") -> list[str]:
    """Where two nested values (dicts, lists, tensors, numbers) differ, exactly (NaN equals NaN)."""
    import torch
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) and \
            torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
        return [] if same else [path or "<value>"]
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}" if path else str(k) for k in sorted(set(a) ^ set(b), key=str)]
        for k in sorted(set(a) & set(b), key=str):
            out += differences(a[k], b[k], f"{path}.{k}" if path else str(k))
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path} (length {len(a)} vs {len(b)})"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [path or "<value>"]


def compare(before: Path, after: Path) -> dict:
    parts = {
        "results": lambda d: clean(json.loads((d / "results.json").read_text()), str(d.resolve())),
        "tensorboard": scalars, "checkpoints": rank_states, "exports": exports}
    out = {}
    for name, read in parts.items():
        a, b = read(before), read(after)
        out[name] = {"compared": _count(a), "differences": differences(a, b)[:20]}
    return out


def _count(value) -> int:
    if isinstance(value, dict):
        return sum(_count(v) for v in value.values()) or len(value)
    if isinstance(value, (list, tuple)):
        return len(value)
    return 1


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    teacher_mlm = (mlm_teacher(args, work) if not args.report_only and
                   any(REFERENCE_RUNS[r][0] == "pretrain" for r in args.runs) else work / "teacher_mlm")
    report, failed = {"before": str(Path(args.before).resolve()), "after": str(Path(args.after).resolve()),
                      "task": args.task, "runs": {}}, False
    for name in args.runs:
        stage, config, sets = run_settings(args, name, teacher_mlm)
        t0, dirs, rcs = time.perf_counter(), {}, {}
        for side in ("before", "after"):
            dirs[side] = work / side / name
            dirs[side].parent.mkdir(parents=True, exist_ok=True)
            if args.report_only:
                rcs[side] = 0 if (dirs[side] / "results.json").is_file() else "not run"
                continue
            rcs[side] = launch(Path(getattr(args, side)), stage, config, sets, dirs[side],
                               work / side / f"{name}.log")
        entry = {"stage": stage, "config": config, "overrides": sets, "exit": rcs}
        if any(rcs.values()):
            entry["status"], failed = "failed", True
        else:
            entry.update(compare(dirs["before"], dirs["after"]))
            same = all(not entry[k]["differences"] for k in ("results", "tensorboard", "checkpoints", "exports"))
            entry["status"] = "identical" if same else "different"
            failed |= not same
        report["runs"][name] = entry
        detail = ", ".join(f"{k} {entry[k]['compared']} compared" for k in ("results", "tensorboard", "checkpoints",
                                                                            "exports") if k in entry)
        print(f"{name}: {entry['status']} ({detail or 'exit ' + str(rcs)}; {time.perf_counter() - t0:.0f} s)",
              flush=True)
        (work / "parity.json").write_text(json.dumps(report, indent=2))
    print(f"written: {work / 'parity.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
