"""Pre-training distillation on a text corpus, with any pre-training method (--help lists them).

    deepspeed launchers/pretrain.py --deepspeed_config ds_configs/zero2.json

Optional: --config YAML (default configs/pre_codir_cpu.yaml), --output_dir DIR (default
runs/<config name>), --set key=value (repeatable).

Stage 2 of the paper's schedule starts from stage 1: after a stage-1 run of
configs/pre_mlm_cpu.yaml (into runs/pre_mlm_cpu), add --set model.init_from=runs/pre_mlm_cpu.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from codir_ds.cli import base_parser, exit_status, quiet_environment, run_main  # noqa: E402


def main() -> int:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    quiet_environment()
    args = base_parser(__doc__.splitlines()[0], default_config=os.path.join(repo, "configs", "pre_codir_cpu.yaml"),
                       default_output=True, stage="pretrain").parse_args()
    from codir_ds.config import load_config
    from codir_ds.recipes import recipe_for

    cfg = load_config(args.config, args.overrides, stage="pretrain")
    output_dir = args.output_dir or os.path.join("runs", cfg.name)
    # The method picks the recipe: pre-training distillation, or co-training (CTCD: two trainable models).
    results = recipe_for(cfg, "pretrain", args.deepspeed_config, output_dir, resume=args.resume,
                         overwrite=args.overwrite).run()
    return exit_status(results)  # 75 when SIGTERM / Ctrl-C stopped it after saving (docs/running.md)


if __name__ == "__main__":
    run_main(main)
