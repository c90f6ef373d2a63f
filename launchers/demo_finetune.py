"""The finetuning-stage demo: CoDIR-Fine against CE and KD on movie_snippets, on a laptop-sized machine.

Not the main job (that is launchers/demo_pretrain.py, which ``bash scripts/demo.sh`` runs): this
pipeline is its finetuning-stage counterpart.

1. finetune the packaged MiniLM (6L/384) on movie_snippets with plain CE -> the teacher;
2. distil a 2-layer student initialised from MiniLM layers with ce, kd and codir;
3. print a table of validation accuracy for the teacher and the three students.

Every stage is a real ``deepspeed launchers/finetune.py`` job; re-running continues
where an interrupted pipeline stopped and reuses finished stages.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from codir_ds.cli import DefaultsHelpFormatter, quiet_environment, run_main  # noqa: E402


def reads_teacher(method: str) -> bool:
    """Whether ``method`` distils from the finetuned teacher (the registry's declaration, default config)."""
    from codir_ds.config import MethodConfig
    from codir_ds.distill.methods import build_method
    return build_method(MethodConfig(name=method), "finetune").teacher is not None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--output_dir", default="runs/demo_finetune")
    ap.add_argument("--config", default="configs/fine_movie_snippets_cpu.yaml")
    ap.add_argument("--deepspeed_config", default="ds_configs/zero2.json")
    ap.add_argument("--ranks", type=int, default=1,
                    help="data-parallel ranks (CPU processes or GPUs); on 2 CPU cores 1 rank x 2 threads is "
                         "faster than 2 ranks x 1 thread")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--methods", nargs="+", default=["ce", "kd", "codir"], choices=["ce", "kd", "codir"])
    ap.add_argument("--teacher_epochs", type=float, default=2)
    ap.add_argument("--teacher_lr", type=float, default=5e-5)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every student run (a method.* key goes to the methods that read "
                         "it)")
    args = ap.parse_args()
    quiet_environment()
    from codir_ds.config import load_config
    from codir_ds.distill.methods import read_by
    from codir_ds.pipeline import format_table, run_stage, timing_note

    out = Path(args.output_dir)
    base = ["--deepspeed_config", args.deepspeed_config, "--config", args.config]
    for method in args.methods:  # fail fast, before any job starts
        load_config(args.config, read_by(method, args.overrides) + [f"method.name={method}", "model.teacher=t"],
                    stage="finetune")
    t0 = time.perf_counter()
    teacher_sets = ["--set", "method.name=ce", "--set", "model.student_init=all-MiniLM-L6-v2",
                    "--set", "model.student_init_layers=null", "--set", f"training.epochs={args.teacher_epochs}", "--set", f"training.lr={args.teacher_lr}",
                    "--set", f"training.seed={args.seeds[0]}"]
    teacher = run_stage("teacher", "launchers/finetune.py", args.ranks, out / "teacher", base + teacher_sets)
    teacher_dir = out / "teacher" / "export"
    rows = [{"model": "teacher MiniLM-L6 (6L/384)", "method": "ce", "seed": args.seeds[0],
             "steps": teacher["steps"], "samples_per_second": teacher["samples_per_second"],
             **teacher["best"]}]
    metric = teacher["main_metric"]
    for seed in args.seeds:
        for method in args.methods:
            sets = ["--set", f"method.name={method}", "--set", f"training.seed={seed}"]
            if reads_teacher(method):
                sets += ["--set", f"model.teacher={teacher_dir}"]
            for o in read_by(method, args.overrides):
                sets += ["--set", o]
            r = run_stage(f"{method} seed {seed}", "launchers/finetune.py", args.ranks,
                          out / f"student_{method}_seed{seed}", base + sets)
            rows.append({"model": "student 2L/384", "method": method, "seed": seed, "steps": r["steps"],
                         "samples_per_second": r["samples_per_second"], **r["best"]})
    table = format_table(rows, metric)
    elapsed = time.perf_counter() - t0
    summary = {"task": teacher["task"], "metric": metric, "rows": rows, "elapsed_seconds": round(elapsed, 1),
               "ranks": args.ranks, "config": args.config, "deepspeed_config": args.deepspeed_config}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(table + "\n")
    print(f"\nmovie_snippets validation ({teacher['num_validation_examples']} examples), best checkpoint per run, "
          f"{args.ranks} rank(s), {timing_note(elapsed)}:\n{table}\n\nwritten to {out}/summary.md and "
          f"summary.json; TensorBoard: tensorboard --logdir {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
