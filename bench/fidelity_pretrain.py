"""Paired multi-seed study of the CoDIR paper's pre-training claim (Table 2), through the main job.

    python bench/fidelity_pretrain.py --seeds 1,2,3,4,5 --out bench/results/fidelity_cpu

For every seed, one ``launchers/demo_pretrain.py`` pipeline (the main job, ``bash scripts/demo.sh``)
in ``<work_dir>/seed<seed>``: stage 2 with each variant (``mlm``: MLM-Pre, ``kd``: KD-Pre,
``codir``: CoDIR-Pre with the paper's in-batch negatives, ``codir_bank``: CoDIR-Pre with
``method.pretrain_negatives=bank``), then CE finetuning of each on movie_snippets. Every seed
shares the teacher's MLM head and the stage-1 student (``<work_dir>/shared``, stage 1 at seed 42);
the seed sets stage 2's data order and masking and the finetuning's data order, the same for every
variant of that seed.

Writes ``<out>/pretrain.md`` (one row per variant: finetuned accuracy at the last step, mean ± std,
the best checkpoint's too, held-out MLM after stage 2, the CRD diagnostics at the end of stage 2;
then the paired differences per seed, with the sign-flip p-value of bench/fidelity.py), ``.json``
(every pipeline's summary) and ``.png`` (every seed, and the paired differences). The comparisons use
the last-step accuracy: nothing is selected on the validation split. Re-running reuses finished stages.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


from bench import fidelity  # noqa: E402
from bench.cli import ArgumentError, Parser  # noqa: E402


def _load_launcher(name: str, path: Path):
    """A launcher script as a module (launchers/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _load_launcher("demo_pretrain", REPO / "launchers" / "demo_pretrain.py")

from codir_ds.cli import DefaultsHelpFormatter  # noqa: E402
from codir_ds.errors import CodirError  # noqa: E402

METRIC = "accuracy"
COMPARISONS: list[tuple[str, str, str]] = [
    ("kd", "mlm", "KD-Pre beats MLM-Pre"),
    ("codir", "mlm", "CoDIR-Pre beats MLM-Pre (paper Table 2)"),
    ("codir", "kd", "CoDIR-Pre beats KD-Pre (paper Table 2)"),
    ("codir_bank", "codir", "bank candidates vs the paper's in-batch negatives"),
    ("codir_bank", "mlm", "CoDIR-Pre with bank candidates vs MLM-Pre"),
]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = Parser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter, script="bench/fidelity_pretrain.py")
    ap.add_argument("--variants", default=",".join(demo.PRE_VARIANTS),
                    help=f"comma-separated stage-2 variants, of {','.join(demo.PRE_VARIANTS)}")
    ap.add_argument("--seeds", default="1,2,3,4,5", help="comma-separated integers")
    ap.add_argument("--out", default="bench/results/fidelity_cpu", help="where pretrain.md/.json/.png go")
    ap.add_argument("--work_dir", default="runs/fidelity_pre_cpu", help="the pipelines' run directories")
    ap.add_argument("--ranks", type=int, default=1, help="data-parallel ranks of every stage")
    ap.add_argument("--split", default="validation", choices=["validation", "test"],
                    help="the split the finetuned accuracy is read on: validation (the finetuning runs' final "
                         "metrics) or test (the final model on movie_snippets' packaged test split)")
    ap.add_argument("--report_only", action="store_true",
                    help="run nothing: rewrite pretrain.md/.png and the JSON's comparisons from the pipelines' "
                         "summaries the JSON holds (same arguments as the study's command)")
    return ap.parse_checked(argv, check_args)


def check_args(args: argparse.Namespace) -> None:
    args.variants = fidelity.parse_variants(args.variants, demo.PRE_VARIANTS)
    args.seeds = fidelity.parse_seeds(args.seeds)
    if args.ranks < 1:
        raise ArgumentError(f"--ranks must be >= 1, got {args.ranks}")
    args.task = "pretrain"  # what fidelity.write_chart titles the plot with


def regenerate_command(args: argparse.Namespace) -> str:
    cmd = ["python", "bench/fidelity_pretrain.py", "--seeds", ",".join(map(str, args.seeds))]
    if args.variants != list(demo.PRE_VARIANTS):
        cmd += ["--variants", ",".join(args.variants)]
    if args.split != "validation":
        cmd += ["--split", args.split]
    cmd += ["--out", args.out]
    if args.work_dir != "runs/fidelity_pre_cpu":
        cmd += ["--work_dir", args.work_dir]
    if args.ranks != 1:
        cmd += ["--ranks", str(args.ranks)]
    return " ".join(cmd)


def pipeline_command(args: argparse.Namespace, seed: int) -> list[str]:
    work = Path(args.work_dir)
    return [sys.executable, str(REPO / "launchers" / "demo_pretrain.py"), "--output_dir", str(work / f"seed{seed}"),
            "--shared_dir", str(work / "shared"), "--methods", *args.variants, "--seed", str(seed),
            "--ranks", str(args.ranks), "--no-deploy_report"]


def records_of(summary: dict, seed: int) -> dict:
    """``{(variant, seed): record}`` in bench/fidelity.py's shape (``results.final[accuracy]``, and
    ``results.test[accuracy]`` where the finetuning run has a test split)."""
    out = {}
    for row in summary.get("rows", []):
        variant = row.get("variant")
        if variant is None:
            continue
        results = {"final": {METRIC: row["finetune_final"]}}
        if row.get("finetune_test") is not None:
            results["test"] = {METRIC: row["finetune_test"]}
        out[(variant, seed)] = {"status": "ok", "row": row, "name": f"{variant} seed {seed}", "results": results}
    return out


# --------------------------------------------------------------------------- outputs


def variant_rows(args, records: dict) -> list[str]:
    lines = [f"| stage 2 | n | movie_snippets {args.split} acc. at the last step (mean ± std) | best validation "
             "checkpoint | held-out MLM "
             "loss | held-out MLM acc. | pos cos | neg cos | gap | L_CRD/log(K+1) | collapse warnings |",
             "|" + "---|" * 11]
    for v in args.variants:
        rows = [records[(v, s)]["row"] for s in args.seeds if (v, s) in records]
        if not rows:
            lines.append(f"| {demo.PRE_NAMES[v]} | 0 | not run |" + " – |" * 8)
            continue
        diags = [r.get("crd_diagnostics") or {} for r in rows]

        def col(key: str, fmt: str = ".3f") -> str:
            xs = [d[key] for d in diags if d.get(key) is not None]
            return format(statistics.fmean(xs), fmt) if xs else "–"
        scores = [fidelity.score(records[(v, s)], METRIC, args.split) for s in args.seeds if (v, s) in records]
        warned = (f"{sum(bool(d.get('collapse_warning')) for d in diags)}/{len(rows)}"
                  if any("bank/pos_sim" in d for d in diags) else "–")
        lines.append(f"| {demo.PRE_NAMES[v]} (`{v}`) | {len(rows)} | "
                     f"{fidelity._mean_std(scores)} | "
                     f"{fidelity._mean_std([r['finetune_best'] for r in rows])} | "
                     f"{statistics.fmean(r['mlm_loss'] for r in rows):.4f} | "
                     f"{statistics.fmean(r['mlm_accuracy'] for r in rows):.4f} | {col('bank/pos_sim')} | "
                     f"{col('bank/neg_sim')} | {col('bank/sim_gap')} | {col('crd/loss_over_log_k1', '.4f')} | "
                     f"{warned} |")
    return lines


def write_outputs(args, records: dict, summaries: dict, recorded: Optional[dict] = None) -> list[Path]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    comparisons = fidelity.family([{"a": a, "b": b, "claim": claim,
                                    "paired": fidelity.paired(records, a, b, args.seeds, METRIC, args.split)}
                                   for a, b, claim in COMPARISONS if a in args.variants and b in args.variants])
    date, versions, device = fidelity.study_meta(recorded, args.ranks)
    first = next(iter(summaries.values()), {})
    a = first.get("args", {})
    head = first.get("teacher_head", {})
    lines = [regenerate_command(args), "",
             f"# Pre-training: paired study, {len(args.variants)} stage-2 variants x {len(args.seeds)} seeds", "",
             f"- Device: {device}; {', '.join(f'{k} {v}' for k, v in versions.items())}. Date: {date} (UTC).",
             f"- The main job (`launchers/demo_pretrain.py`) per seed: teacher all-MiniLM-L6-v2 with a fitted MLM "
             f"head (held-out MLM accuracy {head.get('validation_mlm_accuracy', float('nan')):.3f}); stage 1: "
             f"{a.get('stage1_steps')} MLM steps of the 2-layer student (shared by every seed); stage 2: "
             f"{a.get('stage2_steps')} steps at lr {a.get('stage2_lr')}, batch 32 blocks of 64 tokens, "
             f"alpha_1 = alpha_2 = 0.1, K up to 1000; then CE finetuning on movie_snippets (2,000 sentences, "
             f"2 epochs; " + ("the whole 1,057-sentence validation split" if args.split == "validation" else
                               "read on its packaged test split, which no choice was made on")
             + f"). {args.ranks} rank(s).",
             f"- {args.split.capitalize()} accuracy of the model at the last finetuning step (no checkpoint "
             "selection) is what the comparisons use; the best validation checkpoint is shown for reference. "
             "CRD columns: stage 2's last log window.",
             "", *variant_rows(args, records), "",
             f"Paired differences in finetuned {args.split} {METRIC}, same seed on both sides. "
             f"{fidelity.statistics_note(len(comparisons))}", "", *fidelity.comparison_rows(args, comparisons)]
    md, js, png = out / "pretrain.md", out / "pretrain.json", out / "pretrain.png"
    md.write_text("\n".join(lines) + "\n")
    js.write_text(json.dumps({"command": regenerate_command(args), "variants": args.variants, "seeds": args.seeds,
                              "metric": METRIC, "split": args.split, "date_utc": date, "versions": versions,
                              "summaries": {str(s): v for s, v in summaries.items()},
                              "comparisons": comparisons}, indent=2))
    written = [md, js]
    if fidelity.write_chart(png, args, records, comparisons, METRIC, None):
        written.append(png)
    return written


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.report_only:
        try:
            recorded = fidelity.recorded_study(Path(args.out) / "pretrain.json", regenerate_command(args))
        except CodirError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        summaries = {int(s): v for s, v in recorded["summaries"].items()}
        records = {k: v for seed, summary in summaries.items() for k, v in records_of(summary, seed).items()}
        written = write_outputs(args, records, summaries, recorded)
        print("rewritten:\n" + "\n".join(f"  {p}" for p in written), flush=True)
        return 0
    records, summaries = {}, {}
    t0 = time.perf_counter()
    for k, seed in enumerate(args.seeds, 1):
        cmd = pipeline_command(args, seed)
        print(f"[seed {seed}, {k}/{len(args.seeds)}] {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, cwd=str(REPO))
        summary_path = Path(args.work_dir) / f"seed{seed}" / "summary.json"
        if proc.returncode != 0 or not summary_path.is_file():
            print(f"error: the pipeline of seed {seed} failed (exit {proc.returncode}); its output is above; "
                  f"fix the cause and re-run the same command to continue", file=sys.stderr, flush=True)
            return 1
        summaries[seed] = json.loads(summary_path.read_text())
        records.update(records_of(summaries[seed], seed))
        written = write_outputs(args, records, summaries)  # after every seed: a stopped study keeps its tables
    print(f"done in {time.perf_counter() - t0:.0f} s\nwritten:\n" + "\n".join(f"  {p}" for p in written), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
