"""Export a run's student as a Hugging Face directory (from any DeepSpeed checkpoint) or as ONNX for deployment.

    python launchers/export.py --run_dir runs/codir                         # newest checkpoint
    python launchers/export.py --run_dir runs/codir --tag step_00000124 --output_dir students/step124
    python launchers/export.py --run_dir runs/fine_ctcd_cpu --large         # a CTCD run's larger model
    python launchers/export.py --onnx --model runs/codir/export --quantize int8   # ONNX fp32 and int8

(runs/codir: launchers/finetune.py's example, whose only checkpoint is its last step, 124;
runs/fine_ctcd_cpu: configs/fine_ctcd_cpu.yaml's.)

A finetuning run's result loads with ``AutoModelForSequenceClassification.from_pretrained`` and
with ``launchers/evaluate.py --model``; a pre-training run's with ``AutoModelForMaskedLM``.

--onnx writes a classifier (--model DIR, or --run_dir RUN: its export/, or with --tag that checkpoint
exported first) as ONNX (model.onnx, config, tokenizer, codir_onnx.json) to --output_dir (default
<model dir>_onnx), checked against PyTorch on real validation examples of the task; --quantize int8
adds ONNX Runtime's dynamic int8 model in <output_dir>_int8. The task comes from --config, or the
run's config.yaml. Prints each output directory on stdout. Single process; no DeepSpeed launcher needed.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from codir_ds.cli import quiet_environment, run_main  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run_dir", help="run directory of launchers/finetune.py or pretrain.py (holds checkpoints/ "
                                      "and architecture/)")
    ap.add_argument("--tag", default=None, help="checkpoint tag, e.g. step_00000120 (default: the newest complete one)")
    ap.add_argument("--output_dir", default=None,
                    help="where to write the model (default: RUN_DIR/export_<tag>; with --onnx <model dir>_onnx)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    ap.add_argument("--large", action="store_true",
                    help="method.name=ctcd runs: export the larger model (default: the smaller one, the student)")
    ap.add_argument("--onnx", action="store_true", help="write an ONNX model for deployment, checked against PyTorch")
    ap.add_argument("--model", default=None, help="with --onnx: the classifier directory to export (instead of "
                                                  "--run_dir), e.g. a run's export/")
    ap.add_argument("--quantize", choices=["int8"], default=None,
                    help="with --onnx: also write ONNX Runtime's dynamic int8 model to <output_dir>_int8")
    ap.add_argument("--config", default=None, help="with --onnx: experiment YAML naming the task whose validation "
                                                   "examples check the export (default: the run's config.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="with --onnx: override a config key, e.g. --set data.max_length=128 (repeatable)")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    quiet_environment()
    from codir_ds.deploy.export_cli import check_arguments, export_onnx_command
    from codir_ds.engine.export_checkpoint import export_from_checkpoint

    check_arguments(args)
    if not args.onnx:
        out = export_from_checkpoint(args.run_dir, tag=args.tag, output_dir=args.output_dir, overwrite=args.overwrite,
                                     large=args.large)
        print(out, flush=True)
        return 0
    for out in export_onnx_command(args):
        print(out, flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
