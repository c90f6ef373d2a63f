"""What the main job's students cost to serve against the teacher: PyTorch fp32, ONNX fp32 and ONNX Runtime int8.

    python bench/deploy_cost.py --demo_dir runs/demo --out bench/results/cpu_epyc/deploy_cost

Takes the finetuned MiniLM teacher and the finetuned 2-layer students of a finished main job
(``bash scripts/demo.sh``: ``<demo_dir>/teacher_finetune/export`` and ``<demo_dir>/finetune_<variant>/export``;
or any classifiers with --teacher and --student NAME=DIR), exports each to ONNX (fp32, checked
against PyTorch, and int8) with ``launchers/export.py --onnx``'s code, and measures each form with
``launchers/evaluate.py``'s code: parameters, weight bytes, validation accuracy, latency at batch 1
and 32 (median and p95 after warm-up, inputs padded to data.max_length), throughput, and against the
teacher in PyTorch fp32: speed-up, parameter ratio and accuracy kept. Writes ``report.json``
(every number, the environment and this command) and ``report.md`` to --out; the ONNX files go to
--work_dir. A measurement, not a test: run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from codir_ds.cli import DefaultsHelpFormatter, quiet_environment, run_main  # noqa: E402
from codir_ds.errors import CodirError  # noqa: E402

VARIANTS = ("mlm", "kd", "codir", "codir_bank")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--demo_dir", default="runs/demo", help="a finished main job (bash scripts/demo.sh)")
    ap.add_argument("--teacher", default=None, help="the reference classifier (default: DEMO_DIR/teacher_finetune/export)")
    ap.add_argument("--student", action="append", default=[], metavar="NAME=DIR",
                    help="a student classifier (repeatable; default: every DEMO_DIR/finetune_<variant>/export)")
    ap.add_argument("--config", default="configs/fine_movie_snippets_cpu.yaml", help="the task (data.*)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="default: torch's (the cores)")
    ap.add_argument("--work_dir", default="runs/deploy_cost", help="where the ONNX exports go")
    ap.add_argument("--out", required=True, help="directory for report.json and report.md")
    return ap.parse_args(argv)


def models_of(args: argparse.Namespace) -> list[tuple[str, Path]]:
    demo = Path(args.demo_dir)
    teacher = Path(args.teacher) if args.teacher else demo / "teacher_finetune" / "export"
    students = [tuple(s.split("=", 1)) for s in args.student] if args.student else \
        [(v, demo / f"finetune_{v}" / "export") for v in VARIANTS if (demo / f"finetune_{v}" / "export").is_dir()]
    if any(len(s) != 2 for s in students):
        raise CodirError(f"--student takes NAME=DIR; got {args.student}")
    if not students:
        raise CodirError(f"no finetuned student under '{demo}' (finetune_<variant>/export): run bash scripts/demo.sh "
                         f"first, or pass --student NAME=DIR")
    return [("teacher", teacher)] + [(n, Path(d)) for n, d in students]


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    quiet_environment()
    from codir_ds.config import load_config
    from codir_ds.data.tasks import load_task
    from codir_ds.deploy.cost import cost_report
    from codir_ds.deploy.report import LatencySpec, render_markdown, write_report

    cfg = load_config(args.config, ["method.name=ce"], evaluation=True)
    report = cost_report(models_of(args), load_task(cfg.data), cfg.data.max_length, Path(args.work_dir),
                         cfg.training.eval_batch_size, onnx_fp32=True,
                         spec=LatencySpec((1, 32), args.warmup, args.repeats), threads=args.threads)
    report["command"] = shlex.join(["python", "bench/deploy_cost.py", *(argv if argv is not None else sys.argv[1:])])
    out = Path(args.out)
    write_report(report, out / "report.json")
    (out / "report.md").write_text(f"{report['command']}\n\n{render_markdown(report)}\n")
    print(render_markdown(report), flush=True)
    print(f"\nwritten to {out}/report.json and report.md", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
