"""Fit a masked-LM head (decoder tied to the word embeddings) on a frozen teacher body.

    python launchers/fit_teacher_head.py --teacher all-MiniLM-L6-v2 --output_dir runs/teacher_mlm \
        --config configs/pre_codir_cpu.yaml

The corpus comes from the config's ``corpus`` section (default: the packaged moviedialog
text). Point ``model.teacher`` of a KD-Pre / CoDIR-Pre run at --output_dir.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from codir_ds.cli import DefaultsHelpFormatter, quiet_environment, run_main  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--teacher", required=True, help="teacher directory or the packaged 'all-MiniLM-L6-v2'")
    ap.add_argument("--output_dir", required=True, help="where teacher + head are saved (Hugging Face directory)")
    ap.add_argument("--config", help="experiment YAML whose corpus section gives the text (default corpus if omitted)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set corpus.max_documents=20000")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps")
    ap.add_argument("--batch_size", type=int, default=32, help="sequences per step")
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate of the head")
    ap.add_argument("--teacher_sha256", default=None, help="expected sha256 of the teacher's model.safetensors")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    args = ap.parse_args()
    quiet_environment()
    from codir_ds.config import load_config
    from codir_ds.recipes.fit_head import fit_teacher_head

    # Only the corpus, seed and masking rate are used; the teacher is --teacher.
    cfg = load_config(args.config, args.overrides + [f"model.teacher={args.teacher}"])
    fit_teacher_head(args.teacher, args.output_dir, cfg.corpus, steps=args.steps, batch_size=args.batch_size,
                     lr=args.lr, seed=cfg.training.seed, mlm_probability=cfg.method.mlm_probability,
                     sha256=args.teacher_sha256, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    run_main(main)
