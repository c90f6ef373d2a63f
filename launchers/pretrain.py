"""Pre-training distillation: mlm (MLM-Pre), kd (KD-Pre) or codir (CoDIR-Pre) on a text corpus.

    deepspeed launchers/pretrain.py --deepspeed_config ds_configs/zero2.json
        [--config configs/pre_codir_cpu.yaml] [--output_dir runs/<config name>] [--set key=value ...]

Stage 2 of the paper's schedule starts from stage 1: --set model.init_from=runs/mlm_pre
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from codir_ds.cli import base_parser, quiet_environment, run_main  # noqa: E402


def main() -> int:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = base_parser(__doc__.splitlines()[0], default_config=os.path.join(repo, "configs", "pre_codir_cpu.yaml"),
                       default_output=True).parse_args()
    quiet_environment()
    from codir_ds.config import load_config
    from codir_ds.engine.pretrain import run_pretrain

    cfg = load_config(args.config, args.overrides)
    output_dir = args.output_dir or os.path.join("runs", cfg.name)
    run_pretrain(cfg, args.deepspeed_config, output_dir, resume=args.resume, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    run_main(main)
