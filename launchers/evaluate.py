"""Evaluate an exported classifier (a run's export/ or any HF *ForSequenceClassification dir) on a task.

    python launchers/evaluate.py --model runs/codir/export --config configs/fine_movie_snippets_cpu.yaml

Prints the metrics as one JSON line on stdout (and writes them to --output).
Single process; no DeepSpeed launcher needed.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from codir_ds.cli import quiet_environment, run_main  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Hugging Face classifier directory, e.g. <run>/export")
    ap.add_argument("--config", help="experiment YAML naming the task (data.*), e.g. the run's config.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set data.max_eval_examples=500 (repeatable)")
    ap.add_argument("--split", default="validation", choices=["validation", "train"])
    ap.add_argument("--batch_size", type=int, default=None,
                    help="examples per forward pass (default: the config's training.eval_batch_size)")
    ap.add_argument("--output", help="also write the metrics JSON to this file")
    args = ap.parse_args()
    quiet_environment()
    from codir_ds.config import load_config
    from codir_ds.engine.evaluate_model import evaluate_model_dir

    cfg = load_config(args.config, args.overrides, evaluation=True)
    batch_size = args.batch_size if args.batch_size is not None else cfg.training.eval_batch_size
    metrics = evaluate_model_dir(args.model, cfg, split=args.split, batch_size=batch_size)
    line = json.dumps(metrics)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2) + "\n")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
