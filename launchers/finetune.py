"""Finetuning-stage distillation on one task, with any finetuning method (--help lists them).

    deepspeed --num_gpus 2 launchers/finetune.py --deepspeed_config ds_configs/zero2.json \
        --config configs/fine_movie_snippets_cpu.yaml --set method.name=codir \
        --set model.teacher=runs/my_teacher/export --output_dir runs/codir

The teacher runs/my_teacher/export is the README's first command (the packaged MiniLM
finetuned with --set method.name=ce); methods without a teacher (ce, ctcd) need none.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from codir_ds.cli import base_parser, exit_status, quiet_environment, run_main  # noqa: E402


def main() -> int:
    quiet_environment()
    args = base_parser(__doc__.splitlines()[0], stage="finetune").parse_args()
    from codir_ds.config import load_config
    from codir_ds.recipes import recipe_for

    cfg = load_config(args.config, args.overrides, stage="finetune")
    # The method picks the recipe: finetuning distillation, or co-training (CTCD: two trainable models).
    results = recipe_for(cfg, "finetune", args.deepspeed_config, args.output_dir, resume=args.resume,
                         overwrite=args.overwrite).run()
    return exit_status(results)  # 75 when SIGTERM / Ctrl-C stopped it after saving (docs/running.md)


if __name__ == "__main__":
    run_main(main)
