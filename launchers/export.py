"""Export the student of any run's DeepSpeed checkpoint (ZeRO 1/2/3, any rank count) as a Hugging Face directory.

    python launchers/export.py --run_dir runs/codir                         # newest checkpoint
    python launchers/export.py --run_dir runs/codir --tag step_00000124 --output_dir students/step124
    python launchers/export.py --run_dir runs/fine_ctcd_cpu --large         # a CTCD run's larger model

(runs/codir: launchers/finetune.py's example, whose only checkpoint is its last step, 124;
runs/fine_ctcd_cpu: configs/fine_ctcd_cpu.yaml's.)

A finetuning run's result loads with ``AutoModelForSequenceClassification.from_pretrained`` and
with ``launchers/evaluate.py --model``; a pre-training run's with ``AutoModelForMaskedLM``.
Prints the output directory on stdout. Single process; no DeepSpeed launcher needed.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from codir_ds.cli import quiet_environment, run_main  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run_dir", required=True, help="run directory of launchers/finetune.py or pretrain.py (holds checkpoints/ and architecture/)")
    ap.add_argument("--tag", default=None, help="checkpoint tag, e.g. step_00000120 (default: the newest complete one)")
    ap.add_argument("--output_dir", default=None, help="where to write the model (default: RUN_DIR/export_<tag>)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    ap.add_argument("--large", action="store_true",
                    help="method.name=ctcd runs: export the larger model (default: the smaller one, the student)")
    args = ap.parse_args()
    quiet_environment()
    from codir_ds.engine.export_checkpoint import export_from_checkpoint

    out = export_from_checkpoint(args.run_dir, tag=args.tag, output_dir=args.output_dir, overwrite=args.overwrite,
                                 large=args.large)
    print(out, flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
