"""The main job (bash scripts/demo.sh), offline default: CoDIR-Pre vs MLM-Pre on a laptop-sized machine (paper Table 2).

1. fit an MLM head on the frozen packaged MiniLM teacher (launchers/fit_teacher_head.py);
2. stage 1: MLM pre-training of a 2-layer student (MiniLM layers 0 and 3) on the packaged
   movie-dialogue corpus;
3. stage 2, all from the stage-1 student, same steps and learning rate: MLM only (MLM-Pre),
   MLM + KD + CRD with alpha_1 = alpha_2 = 0.1 and the paper's in-batch negatives (CoDIR-Pre),
   and the same with candidates drawn from the whole bank (CoDIR-Pre, bank negatives);
4. finetune each pre-trained student with plain cross-entropy on movie_snippets;
5. print a table (held-out MLM after pre-training, movie_snippets validation accuracy), what the
   contrastive term did, and the differences against MLM-Pre beside those of the committed
   10-seed test-split study of this job (bench/results/fidelity_cpu_test/pretrain.json);
6. finetune the MiniLM teacher itself on movie_snippets (plain CE), export it and each finetuned
   student to ONNX (fp32, checked against PyTorch, and ONNX Runtime int8), and print what each
   student buys against the teacher on this CPU: parameters, latency at batch 1 and 32 (PyTorch
   and ONNX Runtime int8), speed-up and the share of the teacher's accuracy kept.

Every training stage is a real ``deepspeed launchers/pretrain.py`` / ``finetune.py`` job;
re-running continues an interrupted pipeline and reuses finished stages.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from codir_ds import paired_stats  # noqa: E402
from codir_ds.cli import DefaultsHelpFormatter, quiet_environment, run_main  # noqa: E402
from codir_ds.errors import CodirError  # noqa: E402

PRE_NAMES = {"mlm": "MLM-Pre", "kd": "KD-Pre", "codir": "CoDIR-Pre", "codir_bank": "CoDIR-Pre (bank negatives)"}
# stage-2 variant -> (method.name, extra --set overrides)
PRE_VARIANTS = {"mlm": ("mlm", []), "kd": ("kd", []), "codir": ("codir", []),
                "codir_bank": ("codir", ["method.pretrain_negatives=bank"])}
# the committed multi-seed study of this job at its defaults (bench/fidelity_pretrain.py)
STUDY = Path(__file__).resolve().parent.parent / "bench" / "results" / "fidelity_cpu_test" / "pretrain.json"


def fit_head(out: Path, teacher: str, config: str, steps: int) -> dict:
    """Run (or reuse) launchers/fit_teacher_head.py; returns its manifest."""
    from codir_ds.pipeline import read_stage_time, record_stage, write_stage_time
    manifest = out / "codir_export.json"
    if manifest.is_file():
        seconds = read_stage_time(out, manifest.name)
        print(f"[teacher head] reusing {out}" + (f" (it took {seconds:.0f} s)" if seconds is not None else ""),
              flush=True)
        record_stage("teacher head", seconds, reused=True)
        return json.loads(manifest.read_text())
    cmd = [sys.executable, str(Path(__file__).parent / "fit_teacher_head.py"), "--teacher", teacher,
           "--output_dir", str(out), "--config", config, "--steps", str(steps), "--overwrite"]
    print(f"[teacher head] {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd)
    if proc.returncode != 0 or not manifest.is_file():
        raise CodirError(f"stage 'teacher head' failed (exit {proc.returncode}); its output is above; fix the cause "
                         f"and re-run")
    seconds = time.perf_counter() - t0
    print(f"[teacher head] done in {seconds:.0f} s", flush=True)
    write_stage_time(out, seconds, manifest.name)
    record_stage("teacher head", seconds, reused=False)
    return json.loads(manifest.read_text())


def crd_lines(rows: list) -> list:
    """What the contrastive term did in stage 2 (the last log window of each run that has one)."""
    out = []
    for r in rows:
        d = r.get("crd_diagnostics") or {}
        if "bank/pos_sim" in d:
            out.append(f"\n{r['pretraining']} contrastive term at the end of stage 2: cosine with the positive "
                       f"{d['bank/pos_sim']:.3f}, with the negatives {d['bank/neg_sim']:.3f} (gap "
                       f"{d['bank/sim_gap']:.3f}); L_CRD / log(K+1) = {d['crd/loss_over_log_k1']:.4f} (1: no "
                       f"separation, 0: perfect); collapse warning: {'yes' if d.get('collapse_warning') else 'no'}")
    return out


def findings_lines(rows: list, study: Optional[dict]) -> list:
    """What the run shows, in points of finetuned validation accuracy at the last step (the table's column):
    each student against MLM-Pre, what bank candidates did to the contrastive task, and the study's pairs over
    its seeds on the split it reports (``study``: its pretrain.json, or None)."""
    by = {r["variant"]: r for r in rows}
    out = []
    if "mlm" in by:
        out += [f"{r['pretraining']} - MLM-Pre: {100 * (r['finetune_final'] - by['mlm']['finetune_final']):+.1f} "
                f"points" for r in rows if r["variant"] != "mlm"]
    a, b = (by.get(v, {}).get("crd_diagnostics") or {} for v in ("codir", "codir_bank"))
    if "crd/loss_over_log_k1" in a and "crd/loss_over_log_k1" in b:
        out.append(f"bank candidates vs in-batch negatives: L_CRD / log(K+1) {a['crd/loss_over_log_k1']:.4f} -> "
                   f"{b['crd/loss_over_log_k1']:.4f}, cosine with the negatives {a['bank/neg_sim']:.3f} -> "
                   f"{b['bank/neg_sim']:.3f}; finetuned accuracy "
                   f"{100 * (by['codir_bank']['finetune_final'] - by['codir']['finetune_final']):+.1f} points")
    comparisons = [c for c in (study or {}).get("comparisons", []) if c.get("paired")]
    family = [paired_stats.summarize(c["paired"]["diffs"]) for c in comparisons]
    paired_stats.add_holm(family)  # over the whole study, as its table does
    pairs = [(c, f) for c, f in zip(comparisons, family) if c["a"] in by and c["b"] in by]
    if pairs:
        out.append(f"one seed cannot separate differences this small; over {len(study['seeds'])} paired seeds of "
                   f"this job at its defaults ({STUDY.relative_to(STUDY.parents[3])}, "
                   f"{study.get('split', 'validation')} split):")
        out += [f"  {PRE_NAMES.get(c['a'], c['a'])} - {PRE_NAMES.get(c['b'], c['b'])}: {100 * f['mean']:+.2f} points, "
                f"95 % t interval {paired_stats.interval_text(f['t_interval'])}, wins/ties/losses "
                f"{f['wins']}/{f['ties']}/{f['losses']}, Holm p {f['p_holm']:.2f}: {f['verdict']}"
                for c, f in pairs]
    return out


def deploy_report(args: argparse.Namespace, shared: Path, out: Path, rows: list, common: list) -> dict:
    """Step 6: the MiniLM teacher finetuned with CE (once, in the shared directory), then every finetuned
    student against it in PyTorch fp32 and ONNX Runtime int8 (codir_ds.deploy.cost)."""
    from codir_ds.config import load_config
    from codir_ds.data.tasks import load_task
    from codir_ds.deploy.cost import cost_report
    from codir_ds.deploy.report import write_report
    from codir_ds.pipeline import run_stage

    teacher_sets = ["method.name=ce", "model.student_init=all-MiniLM-L6-v2", "model.student_init_layers=null",
                    f"training.epochs={args.teacher_epochs}", f"training.lr={args.teacher_lr}"]
    teacher_dir = shared / "teacher_finetune"
    run_stage("teacher finetune", "launchers/finetune.py", args.ranks, teacher_dir,
              common + ["--config", args.finetune_config] + [a for kv in teacher_sets for a in ("--set", kv)])
    cfg = load_config(args.finetune_config, ["method.name=ce"])
    models = [("teacher", teacher_dir / "export")] + [(r["variant"], out / f"finetune_{r['variant']}" / "export")
                                                     for r in rows]
    print("[deploy] ONNX exports and the size / latency / accuracy-kept report (codir_ds.deploy)", flush=True)
    report = cost_report(models, load_task(cfg.data), cfg.data.max_length, out / "deploy",
                         cfg.training.eval_batch_size)
    write_report(report, out / "deploy" / "report.json")
    report["names"] = {"teacher": "MiniLM-L6 teacher (6L/384, CE)",
                       **{r["variant"]: f"{r['pretraining']} student (2L/384)" for r in rows}}
    return report


def deploy_heading(report: dict) -> str:
    rows = ", ".join(f"{k} = {v}" for k, v in report["names"].items())
    return (f"What each finetuned student buys against the finetuned teacher ({rows}); PyTorch fp32 and ONNX "
            f"Runtime int8 (dynamic) on this CPU:")


# the settings the study ran at (its defaults); --seed and --methods are what it varies
STUDY_SETTINGS = ("stage1_config", "stage2_config", "finetune_config", "ranks", "head_steps", "stage1_steps",
                  "stage2_steps", "stage2_lr", "deepspeed_config")


def read_study(args: Optional[argparse.Namespace] = None, ap: Optional[argparse.ArgumentParser] = None
               ) -> Optional[dict]:
    """The committed study, or None when it is missing or (given ``args`` and their parser) the run's
    settings differ from the defaults it ran at, so that its numbers would not describe this run."""
    if args is not None and any(getattr(args, k) != ap.get_default(k) for k in STUDY_SETTINGS):
        return None
    try:
        return json.loads(STUDY.read_text())
    except (OSError, ValueError):
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--output_dir", default="runs/demo")
    ap.add_argument("--deepspeed_config", default="ds_configs/zero2.json")
    ap.add_argument("--stage1_config", default="configs/pre_mlm_cpu.yaml")
    ap.add_argument("--stage2_config", default="configs/pre_codir_cpu.yaml")
    ap.add_argument("--finetune_config", default="configs/fine_movie_snippets_cpu.yaml")
    ap.add_argument("--ranks", type=int, default=1,
                    help="data-parallel ranks (CPU processes or GPUs); on 2 CPU cores 1 rank x 2 threads is faster")
    ap.add_argument("--methods", nargs="+", default=["mlm", "codir", "codir_bank"], choices=list(PRE_VARIANTS),
                    help="stage-2 pre-training objectives to compare (codir_bank: codir with "
                         "method.pretrain_negatives=bank, candidates beyond the batch)")
    ap.add_argument("--head_steps", type=int, default=150, help="steps of teacher MLM-head fitting")
    ap.add_argument("--stage1_steps", type=int, default=100)
    ap.add_argument("--stage2_steps", type=int, default=80)
    ap.add_argument("--stage2_lr", type=float, default=1e-4, help="paper: 1e-4 in stage 2")
    ap.add_argument("--seed", type=int, default=42, help="stage-2 and finetuning seed (stage 1 too, unless shared)")
    ap.add_argument("--teacher_epochs", type=float, default=2, help="CE finetuning of the MiniLM teacher (step 6)")
    ap.add_argument("--teacher_lr", type=float, default=5e-5)
    ap.add_argument("--deploy_report", action=argparse.BooleanOptionalAction, default=True,
                    help="step 6: the finetuned teacher, ONNX exports and the size/latency/accuracy-kept report")
    ap.add_argument("--shared_dir", default=None,
                    help="take the teacher head and the stage-1 student from DIR/teacher_mlm and DIR/stage1_mlm "
                         "(made there if missing), so that runs with several seeds share them")
    args = ap.parse_args()
    quiet_environment()
    from codir_ds.config import load_config
    from codir_ds.deploy.report import render_markdown
    from codir_ds.distill.methods import read_by
    from codir_ds.pipeline import run_stage, timing_note

    out = Path(args.output_dir)
    load_config(args.stage1_config)  # fail fast, before any job starts
    load_config(args.stage2_config)
    load_config(args.finetune_config, ["method.name=ce"])
    t0 = time.perf_counter()
    shared = Path(args.shared_dir) if args.shared_dir else out
    teacher = shared / "teacher_mlm"
    head = fit_head(teacher, "all-MiniLM-L6-v2", args.stage2_config, args.head_steps)

    ds = ["--deepspeed_config", args.deepspeed_config]
    seed = ["--set", f"training.seed={args.seed}"]
    stage1_dir = shared / "stage1_mlm"
    stage1_seed = ["--set", "training.seed=42"] if args.shared_dir else seed
    stage1 = run_stage("stage 1 mlm", "launchers/pretrain.py", args.ranks, stage1_dir,
                       ds + ["--config", args.stage1_config, "--set", f"training.max_steps={args.stage1_steps}"]
                       + stage1_seed)
    rows = []
    for variant in args.methods:
        method, extra = PRE_VARIANTS[variant]
        settings = read_by(method, [f"method.name={method}", f"model.init_from={stage1_dir}", "model.student_init=null",
                                    "model.student_init_layers=null", f"model.teacher={teacher}", "method.alpha_kd=0.1",
                                    "method.alpha_crd=0.1", f"training.max_steps={args.stage2_steps}",
                                    f"training.lr={args.stage2_lr}", *extra], "pretrain")
        sets = [a for kv in settings for a in ("--set", kv)]
        pre_dir = out / f"stage2_{variant}"
        pre = run_stage(f"stage 2 {variant}", "launchers/pretrain.py", args.ranks, pre_dir,
                        ds + ["--config", args.stage2_config] + sets + seed)
        fine = run_stage(f"finetune {PRE_NAMES[variant]}", "launchers/finetune.py", args.ranks,
                         out / f"finetune_{variant}",
                         ds + ["--config", args.finetune_config, "--set", "method.name=ce",
                               "--set", f"model.init_from={pre_dir}", "--set", "model.student_init=null",
                               "--set", "model.student_init_layers=null"] + seed)
        rows.append({"pretraining": PRE_NAMES[variant], "variant": variant, "stage2_steps": pre["steps"],
                     "mlm_loss": pre["final"]["mlm_loss"], "mlm_accuracy": pre["final"]["mlm_accuracy"],
                     "pretrain_samples_per_second": pre["samples_per_second"],
                     "finetune_metric": fine["main_metric"], "finetune_best": fine["best"][fine["main_metric"]],
                     "finetune_final": fine["final"][fine["main_metric"]],
                     "finetune_test": (fine.get("test") or {}).get(fine["main_metric"]), "finetune_steps": fine["steps"],
                     "crd_diagnostics": pre.get("diagnostics")})
    lines = ["| pre-training (stage 2) | held-out MLM loss | held-out MLM acc. | pre-train samples/s "
             "| movie_snippets acc. (CE finetune, last step) | (best checkpoint) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pretraining']} | {r['mlm_loss']:.4f} | {r['mlm_accuracy']:.4f} | "
                     f"{r['pretrain_samples_per_second']:.1f} | {r['finetune_final']:.4f} | {r['finetune_best']:.4f} |")
    findings = findings_lines(rows, read_study(args, ap))
    deploy = deploy_report(args, shared, out, rows, ds + seed) if args.deploy_report else None
    elapsed = time.perf_counter() - t0
    table = "\n".join(lines + crd_lines(rows) + (["", *findings] if findings else [])
                      + (["", deploy_heading(deploy), "", render_markdown(deploy)] if deploy else []))
    summary = {"rows": rows, "stage1": {"steps": stage1["steps"], "final": stage1["final"]},
               "teacher_head": {k: v for k, v in head.items() if k.startswith("validation")},
               "deploy": deploy, "elapsed_seconds": round(elapsed, 1), "ranks": args.ranks, "seed": args.seed,
               "args": vars(args)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(table + "\n")
    print(f"\nstage 1: {stage1['steps']} MLM steps; stage 2: {args.stage2_steps} steps each; "
          f"teacher head held-out MLM accuracy {head.get('validation_mlm_accuracy', float('nan')):.3f}; "
          f"{args.ranks} rank(s), {timing_note(elapsed)}:\n{table}\n\nwritten to {out}/summary.md and "
          f"summary.json; TensorBoard: tensorboard --logdir {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
