"""Evaluate exported classifiers side by side: metrics, size, latency, speed-up and accuracy kept.

    python launchers/evaluate.py --config configs/fine_movie_snippets_cpu.yaml \
        --model teacher=runs/my_teacher/export --model codir=runs/my_codir/export \
        --model codir_int8=runs/my_codir/export_onnx_int8 --output runs/my_codir/report.md

Each --model is a Hugging Face *ForSequenceClassification directory (a run's export/) or an ONNX
directory written by launchers/export.py --onnx, optionally named NAME=DIR. The first one is the
reference (normally the teacher): every other row gets its speed-up at each batch size, how many
times fewer parameters it has and the share of the reference's main metric it keeps. Prints the
table on stdout (progress on stderr); --output writes it as JSON (.json) or Markdown (.md).
Single process; no DeepSpeed launcher needed.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from codir_ds.cli import DefaultsHelpFormatter, quiet_environment, run_main  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--model", action="append", required=True, metavar="[NAME=]DIR",
                    help="classifier directory, PyTorch or ONNX (repeatable; the first is the reference)")
    ap.add_argument("--config", help="experiment YAML naming the task (data.*), e.g. the run's config.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set data.max_eval_examples=500 (repeatable)")
    ap.add_argument("--split", default="validation", choices=["validation", "test", "train"],
                    help="test: packaged tasks' held-out split (data.test_fraction)")
    ap.add_argument("--batch_size", type=int, default=None,
                    help="examples per forward pass for the metrics (default: the config's training.eval_batch_size)")
    ap.add_argument("--latency_batch_sizes", type=int, nargs="+", default=[1, 32], metavar="N")
    ap.add_argument("--warmup", type=int, default=5, help="untimed forward passes before timing")
    ap.add_argument("--repeats", type=int, default=30, help="timed forward passes per batch size (0: no latency)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for PyTorch and ONNX Runtime (default: torch's, i.e. the cores or OMP_NUM_THREADS)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="where PyTorch models run (default: cuda when there is a GPU; ONNX models run on the CPU)")
    ap.add_argument("--output", help="also write the report: .json (every number) or .md (the table)")
    args = ap.parse_args()
    quiet_environment()
    import torch
    from codir_ds.config import load_config
    from codir_ds.data.tasks import load_task
    from codir_ds.deploy.report import LatencySpec, build_report, render_markdown, write_report
    from codir_ds.errors import CodirError

    if args.threads is not None and args.threads < 1:
        raise CodirError(f"--threads must be >= 1; got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CodirError("--device cuda: no GPU is visible to PyTorch; drop --device or use --device cpu")
    spec = LatencySpec(tuple(args.latency_batch_sizes), args.warmup, args.repeats)
    spec.check()
    cfg = load_config(args.config, args.overrides, evaluation=True)
    batch_size = args.batch_size if args.batch_size is not None else cfg.training.eval_batch_size
    if batch_size < 1:
        raise CodirError(f"--batch_size must be >= 1; got {batch_size}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = build_report(args.model, load_task(cfg.data), args.split, cfg.data.max_length, batch_size, spec,
                          device, args.threads, progress=lambda line: print(line, file=sys.stderr, flush=True))
    if args.output:
        write_report(report, Path(args.output))
    print(render_markdown(report), flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
