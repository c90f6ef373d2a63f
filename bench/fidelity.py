"""Paired multi-seed study of the CoDIR paper's finetuning claims, through the real launcher.

    python bench/fidelity.py --task trec6 --seeds 1,2,3,4,5 --size cpu --jobs 2 --out bench/results/fidelity_cpu

1. finetune the packaged all-MiniLM-L6-v2 with ``ce`` on the task: the teacher, once per task
   (``<work_dir>/<task>/teacher``, reused while its results.json exists and its config matches);
2. for every variant (``VARIANTS``: a method plus --set overrides) and seed, one
   ``launchers/finetune.py`` job in ``<work_dir>/<task>/<variant>_seed<seed>``. Runs of one seed
   share everything the variant does not change: the seed, hence the data order and the student's
   initialisation (MiniLM layers; the projection heads are drawn from the seed);
3. write ``<out>/<task>.md``: one row per variant (mean ± sample std over seeds, the CRD diagnostics
   at the last log step and the smallest positive-negative gap logged during training), then one
   row per comparison (``COMPARISONS``: A vs B, the per-seed differences A - B, their mean ± std,
   how many seeds A wins, and the exact two-sided sign-flip permutation p-value of the mean
   difference over the 2^n sign assignments); ``<out>/<task>.json`` (every run's results.json,
   command and seconds); ``<out>/<task>.png`` (left: every seed's value per variant; right: the
   paired differences of every comparison around zero).

The study's settings are fixed in the presets before any run; nothing is chosen on the validation
split. Re-running the same command reuses finished runs whose config matches (``--force`` reruns).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import compare  # noqa: E402
from bench.cli import ArgumentError, Parser, read_json  # noqa: E402
from codir_ds import paired_stats  # noqa: E402
from codir_ds.cli import DefaultsHelpFormatter  # noqa: E402
from codir_ds.errors import CodirError  # noqa: E402

# Variants: name -> (method, --set overrides on top of the preset and the method's headline keys at their
# defaults, compare.METHOD_SETTINGS). "codir" is the shipped configuration (alpha_1 0.7, rho 2, alpha_2 0.1,
# K 100, mean pooling, normalised bank update at beta 0.1, random initial rows) except where a preset pins
# codir keys ("codir_sets": the cpu preset keeps beta 0.5, at which its committed studies ran).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "ce": ("ce", []),
    "kd": ("kd", []),
    "codir": ("codir", []),
    "codir_cls": ("codir", ["method.pooling=cls"]),
    "codir_k500": ("codir", ["method.num_negatives=500"]),
    "codir_k1000": ("codir", ["method.num_negatives=1000"]),
    "codir_a0": ("codir", ["method.alpha_crd=0.0"]),
    "codir_a0.5": ("codir", ["method.alpha_crd=0.5"]),
    "codir_a1": ("codir", ["method.alpha_crd=1.0"]),
    "codir_warm": ("codir", ["method.bank_init=student"]),
    "codir_raw_bank": ("codir", ["method.bank_normalize=false"]),
    "codir_b0.1": ("codir", ["method.bank_momentum=0.1"]),
    "codir_delay30": ("codir", ["method.crd_encoder_delay=30"]),
    # the same reading of the CRD gradient probe at lr 2e-5 over 12 epochs (bench/results/cpu_epyc/
    # crd_gradients_trec6_lr2e-5_seed1.json): the first probed step where the CRD gradient at the embedding output
    # is at or below about 0.1x the supervised one (0.08x; the same rule gives 30 at lr 2e-4)
    "codir_delay180": ("codir", ["method.crd_encoder_delay=180"]),
    "codir_t0.5": ("codir", ["method.crd_temperature=0.5"]),
    "codir_anchor": ("codir", ["method.finetune_negatives=anchor"]),
    "codir_last": ("codir", ["method.teacher_layers=[6]", "method.student_layers=[2]"]),
    "kd_ep4": ("kd", ["training.epochs=4"]),
    "codir_ep4": ("codir", ["training.epochs=4"]),
}
# (A, B, the claim): the table and plot show A - B per seed.
COMPARISONS: list[tuple[str, str, str]] = [
    ("kd", "ce", "KD beats CE"),
    ("codir", "kd", "CoDIR beats KD"),
    ("codir", "ce", "CoDIR beats CE"),
    ("codir", "codir_cls", "mean pooling beats [CLS]"),
    ("codir_k500", "codir", "K = 500 vs K = 100"),
    ("codir_k1000", "codir", "K = 1000 vs K = 100"),
    ("codir", "codir_a0", "the CRD term itself: alpha_2 = 0.1 vs 0 (same code path)"),
    ("codir_a0", "kd", "codir's code path without its CRD term vs kd"),
    ("codir_a0.5", "codir", "alpha_2 = 0.5 vs 0.1"),
    ("codir_a1", "codir", "alpha_2 = 1 vs 0.1"),
    ("codir_warm", "codir", "warm-started bank vs random rows"),
    ("codir", "codir_raw_bank", "bank update on normalised vs raw features"),
    ("codir_b0.1", "codir", "normalised bank update: beta = 0.1 vs 0.5"),
    ("codir_raw_bank", "codir_b0.1", "raw update vs normalised at beta = 0.1 (the raw update's effective beta)"),
    ("codir_b0.1", "kd", "CoDIR with the bank's beta at 0.1 vs KD"),
    ("codir_delay30", "codir", "CRD reaches the encoder after 30 steps (heads trained first) vs from step 0"),
    ("codir_delay30", "kd", "CoDIR with heads trained first vs KD"),
    ("codir_delay180", "codir", "CRD reaches the encoder after 180 steps (heads trained first) vs from step 0"),
    ("codir_delay180", "kd", "CoDIR with heads trained first (180 steps) vs KD"),
    ("codir_t0.5", "codir", "tau = 0.5 vs 0.07"),
    ("codir_anchor", "codir", "negatives drawn per anchor vs one set per class and step"),
    ("codir", "codir_last", "every Transformer layer vs the last one only feeding the projections"),
    ("codir_last", "kd", "CoDIR from the last layer only vs KD"),
    ("kd_ep4", "kd", "KD: 4 epochs vs 2"),
    ("codir_ep4", "kd_ep4", "CoDIR beats KD at 4 epochs"),
    ("codir_ep4", "codir", "CoDIR: 4 epochs vs 2"),
]

_CPU_COMMON = ["data.max_train_examples=2000", "data.max_eval_examples=null", "data.max_length=64",
               "training.train_batch_size=32", "training.micro_batch_size=32", "training.eval_batch_size=128"]
PRESETS = {
    # 2 CPU cores: 2,000 training examples, the whole validation split, 2 epochs (124 steps) at the shipped
    # learning rate 2e-4, teacher outputs cached after the first epoch. The teacher is compare.py's cpu teacher.
    "cpu": {
        "common": _CPU_COMMON,
        "teacher": ["model.student_init=all-MiniLM-L6-v2", "model.student_init_layers=null",
                    "training.micro_batch_size=16", "training.max_steps=-1", "training.epochs=2",
                    "training.lr=5e-5"],
        "student": ["model.student_init=all-MiniLM-L6-v2", "model.student_init_layers=[0,3]",
                    "training.max_steps=-1", "training.epochs=2", "training.lr=2e-4"],
        # every codir variant (before its own keys): the bank's beta of the committed CPU studies, the default
        # until the test-split bank study chose 0.1 (codir_b0.1 is the shipped setting)
        "codir_sets": ["method.bank_momentum=0.5"],
        "packaged": "all-MiniLM-L6-v2",  # what --model_copy replaces (an fp16 copy on a GPU machine)
        "teacher_model": "MiniLM 6L/384",
        "student_model": "2L/384 student from MiniLM layers 0 and 3",
    },
    # One GPU: whole training sets, 5 epochs.
    "gpu": {
        "common": ["data.max_train_examples=null", "data.max_eval_examples=null", "data.max_length=128",
                   "training.train_batch_size=32", "training.micro_batch_size=32", "training.eval_batch_size=256"],
        "teacher": ["model.student_init=all-MiniLM-L6-v2", "model.student_init_layers=null",
                    "training.max_steps=-1", "training.epochs=3", "training.lr=5e-5"],
        "student": ["model.student_init=all-MiniLM-L6-v2", "model.student_init_layers=[0,3]",
                    "training.max_steps=-1", "training.epochs=5", "training.lr=2e-4"],
        "teacher_model": "MiniLM 6L/384",
        "student_model": "2L/384 student from MiniLM layers 0 and 3",
    },
    # The paper's finetuning setting at base size, for one GPU (bench/gpu_session.sh, step fid_base): the packaged
    # all-mpnet-base-v2 (MPNet, 12L/768, 109.5M parameters) finetuned with ce on the whole training set; 6-layer
    # students from its alternate layers 0, 2, ..., 10 (not from the finetuned teacher); alpha_1 = 0.7, rho = 2,
    # alpha_2 = 0.1, K 100 and 1000 (the shipped method settings), lr 2e-5, seq 128, batch 32, 3 epochs; ce, kd,
    # codir and codir_k1000 over 5 seeds, 5 runs at a time. trec6: 4,362 training examples, 137 steps an epoch.
    # Time on one H100, estimated from measurements: the H200 ran a 12L/768 -> 6L/768 kd step at micro 64, seq 128,
    # fp16 in 66 ms (bench/results/h200, bench_s128_fp16: launch-bound at 5 % MFU, so batch 32 costs about the
    # same); an H100 is taken as 1.2x slower (79 ms). Students: 411 steps, the teacher's forward only in the first
    # epoch (teacher_cache), ~30 s of training + ~35 s start-up and evaluation (compare_h200: run s - train s)
    # = ~65 s a run; 20 runs at 5 at a time, taken as 1.5x slower for sharing the GPU = ~390 s. The teacher: 411
    # steps of a 12L/768 forward and backward (~2x the student's, ~130 ms) = ~55 s + 35 s = ~90 s. Total ~8 min.
    # On the CPU the same FLOPs (430 MFLOP a token for teacher forward + student step, flops_per_token in
    # bench_s128_fp16) over 3 x 4,362 x ~20 tokens (trec6 pads to the batch's longest question) are ~1.1e14 a
    # student run: ~25 min each at the ~75 GFLOP/s these 2 cores reach, which is why it needs the GPU.
    "base": {
        "common": ["model.tokenizer=null", "data.max_train_examples=null", "data.max_eval_examples=null",
                   "data.max_length=128", "training.train_batch_size=32", "training.micro_batch_size=32",
                   "training.eval_batch_size=256"],
        "teacher": ["model.student_init=all-mpnet-base-v2", "model.student_init_layers=null",
                    "training.max_steps=-1", "training.epochs=3", "training.lr=2e-5"],
        "student": ["model.student_init=all-mpnet-base-v2", "model.student_init_layers=[0,2,4,6,8,10]",
                    "training.max_steps=-1", "training.epochs=3", "training.lr=2e-5"],
        "teacher_model": "MPNet 12L/768 (all-mpnet-base-v2)",
        "student_model": "6L/768 student from MPNet layers 0, 2, 4, 6, 8, 10",
        "packaged": "all-mpnet-base-v2",
        "variants": ["ce", "kd", "codir", "codir_k1000"],
        "seeds": [1, 2, 3, 4, 5],
        "jobs": 5,
    },
    # The base preset's dry run on the CPU (GPU_SESSION_DRY=1 bash bench/gpu_session.sh): the same shape of study
    # in seconds, a 4-layer slice of MiniLM as teacher and a 2-layer student from its alternate layers 0 and 2.
    "base_tiny": {
        "common": ["data.max_train_examples=48", "data.max_eval_examples=32", "data.max_length=16",
                   "training.train_batch_size=16", "training.micro_batch_size=16", "training.eval_batch_size=32",
                   "training.max_steps=2", "training.lr=2e-5"],
        "teacher": ["model.student_init=all-MiniLM-L6-v2", "model.student_init_layers=[0,1,2,3]"],
        "student": ["model.student_init=all-MiniLM-L6-v2", "model.student_init_layers=[0,2]"],
        "teacher_model": "MiniLM layers 0-3, 4L/384",
        "student_model": "2L/384 student from MiniLM layers 0 and 2",
        "packaged": "all-MiniLM-L6-v2",
        "variants": ["ce", "kd", "codir", "codir_k1000"],
        "seeds": [1, 2],
        "jobs": 2,
    },
    # Seconds per run, for the tests.
    "tiny": compare.PRESETS["tiny"],
}

DIAGNOSTICS = ("bank/pos_sim", "bank/neg_sim", "bank/sim_gap", "crd/loss_over_log_k1")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = Parser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter, script="bench/fidelity.py")
    ap.add_argument("--task", required=True, help=f"one of {', '.join(compare.TASKS)}")
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated, of {','.join(VARIANTS)} (default: the preset's, else all)")
    ap.add_argument("--seeds", default=None, help="comma-separated integers (default: the preset's, else 1,2,3,4,5)")
    ap.add_argument("--size", default="cpu", help=f"preset: {', '.join(PRESETS)}")
    ap.add_argument("--out", default=None, help="where <task>.md/.json/.png go (default bench/results/fidelity_<size>)")
    ap.add_argument("--work_dir", default=None, help="run directories (default runs/fidelity_<size>)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="student runs at a time (the CPU cores are split; default: the preset's, else 1)")
    ap.add_argument("--model_copy", default=None, metavar="DIR",
                    help="a directory holding a copy of the preset's packaged model (e.g. an fp16 copy carried to a "
                         "GPU machine) to use in its place")
    ap.add_argument("--resume_json", action="append", default=[], metavar="PATH",
                    help="a study JSON written earlier by the same command (e.g. one that came back from a GPU "
                         "machine that has since been released): its finished runs are kept, not rerun; repeatable")
    ap.add_argument("--launcher", default="python", help="python (one rank, no launcher start-up) or deepspeed")
    ap.add_argument("--deepspeed_config", default="ds_configs/zero2.json")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every student run (not the teacher; a method.* key only for the "
                         "methods that read it), repeatable")
    ap.add_argument("--force", action="store_true", help="rerun finished runs too (the teacher included)")
    ap.add_argument("--split", default="validation", choices=["validation", "test"],
                    help="the split every row and comparison reads: validation (the runs' final metrics) or test "
                         "(the final model on the packaged task's test split, results.json 'test')")
    ap.add_argument("--report_only", action="store_true",
                    help="run nothing: rewrite <out>/<task>.md/.png and the JSON's comparisons from the runs the JSON "
                         "holds (same arguments as the study's command), e.g. after the statistics changed")
    return ap.parse_checked(argv, check_args)


def check_args(args: argparse.Namespace) -> None:
    if args.task not in compare.TASKS:
        raise ArgumentError(f"unknown task {args.task!r}: choose one of {', '.join(compare.TASKS)}")
    if args.size not in PRESETS:
        raise ArgumentError(f"unknown --size {args.size!r}: choose one of {', '.join(PRESETS)}")
    preset = PRESETS[args.size]
    args.variants = parse_variants(args.variants or ",".join(preset.get("variants", VARIANTS)), VARIANTS)
    args.seeds = parse_seeds(args.seeds or ",".join(map(str, preset.get("seeds", [1, 2, 3, 4, 5]))))
    args.jobs = args.jobs if args.jobs is not None else preset.get("jobs", 1)
    if args.model_copy is not None:
        if "packaged" not in preset:
            raise ArgumentError(f"--model_copy: preset {args.size!r} names no packaged model to replace; "
                                        f"use it with {', '.join(k for k, v in PRESETS.items() if 'packaged' in v)}")
        if not Path(args.model_copy, "config.json").is_file():
            raise ArgumentError(f"--model_copy {args.model_copy!r} is not a model directory (no config.json)")
        args.model_copy = compare.launcher_path(Path(args.model_copy))
    for path in args.resume_json:
        if not Path(path).is_file():
            raise ArgumentError(f"--resume_json {path!r}: no such file; pass a <task>.json an earlier run "
                                        f"of this command wrote")
    if args.launcher not in ("python", "deepspeed"):
        raise ArgumentError(f"unknown --launcher {args.launcher!r}: choose python or deepspeed")
    if args.jobs < 1:
        raise ArgumentError(f"--jobs must be >= 1, got {args.jobs}")
    args.out = args.out or f"bench/results/fidelity_{args.size}"
    args.work_dir = args.work_dir or f"runs/fidelity_{args.size}"
    # what compare.run_one reads
    args.ranks, args.minilm = 1, compare.MINILM


def parse_variants(text: str, known) -> list[str]:
    """``--variants``: comma-separated names of ``known``, duplicates dropped, in the given order."""
    variants = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in variants if v not in known]
    if not variants or unknown:
        raise ArgumentError(f"unknown or no --variants {','.join(unknown)!r}: choose from {','.join(known)}")
    return list(dict.fromkeys(variants))


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: comma-separated integers, duplicates dropped, at least one."""
    try:
        seeds = list(dict.fromkeys(int(s) for s in text.split(",") if s.strip()))
    except ValueError:
        raise ArgumentError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ArgumentError("--seeds is empty: give at least one seed, e.g. --seeds 1,2,3,4,5")
    return seeds


def regenerate_command(args: argparse.Namespace) -> str:
    preset = PRESETS[args.size]
    cmd = ["python", "bench/fidelity.py", "--task", args.task, "--seeds", ",".join(map(str, args.seeds)),
           "--size", args.size]
    if args.variants != list(preset.get("variants", VARIANTS)):
        cmd += ["--variants", ",".join(args.variants)]
    if args.jobs != preset.get("jobs", 1):
        cmd += ["--jobs", str(args.jobs)]
    if args.split != "validation":
        cmd += ["--split", args.split]
    cmd += ["--out", args.out]
    if args.work_dir != f"runs/fidelity_{args.size}":
        cmd += ["--work_dir", args.work_dir]
    if args.launcher != "python":
        cmd += ["--launcher", args.launcher]
    if getattr(args, "model_copy", None):
        cmd += ["--model_copy", args.model_copy]
    for o in args.overrides:
        cmd += ["--set", o]
    return " ".join(cmd)


def with_model_copy(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """``overrides`` with the preset's packaged model replaced by ``--model_copy`` (a copy of it in a directory)."""
    packaged = PRESETS[args.size].get("packaged")
    if not getattr(args, "model_copy", None) or not packaged:
        return overrides
    return [o[:-len(packaged)] + args.model_copy if o.endswith(f"={packaged}") else o for o in overrides]


def teacher_overrides(args: argparse.Namespace) -> list[str]:
    p = PRESETS[args.size]
    return with_model_copy(args, [f"data.task={args.task}", "logging.progress_bar=false", *p["common"],
                                  *p["teacher"], "method.name=ce", f"training.seed={compare.TEACHER_SEED}"])


def variant_overrides(args: argparse.Namespace, variant: str, seed: int, teacher_export: Path,
                      teacher_sha: Optional[str]) -> list[str]:
    method, extra = VARIANTS[variant]
    p = PRESETS[args.size]
    out = [f"data.task={args.task}", "logging.progress_bar=false", *p["common"], *p["student"],
           f"method.name={method}", f"training.seed={seed}"]
    if compare.uses_teacher(method):
        sha = f"'{teacher_sha or 'unknown'}'"
        out += [f"model.teacher={compare.launcher_path(teacher_export)}", f"model.teacher_sha256={sha}",
                "training.teacher_cache=true"]
    codir_sets = p.get("codir_sets", []) if method == "codir" else []
    return with_model_copy(args, out + compare.method_settings(method, args.task, p["common"]) + codir_sets + extra
                           + compare.read_by(method, args.overrides))


# --------------------------------------------------------------------------- statistics


sign_flip_p = paired_stats.sign_flip_p


def score(rec: dict, metric: str, split: str = "validation") -> float:
    """A run's final-model ``metric`` on ``split`` (validation: results.json ``final``; test: ``test``)."""
    results = rec["results"]
    if split == "test" and not results.get("test"):
        raise CodirError(f"--split test: run {rec.get('name', '?')} has no test metrics (made before the packaged "
                         f"tasks' test split, or with data.test_fraction=0): rerun it (--force)")
    return results["final" if split == "validation" else "test"][metric]


def paired(records: dict, a: str, b: str, seeds: list[int], metric: str, split: str = "validation") -> Optional[dict]:
    """Per-seed differences A - B of ``metric`` on ``split`` over the seeds where both finished, with their
    statistics (``paired_stats.summarize``; the Holm adjustment over the study's family is added by
    :func:`family`)."""
    pairs = []
    for s in seeds:
        ra, rb = records.get((a, s)), records.get((b, s))
        if ra and rb and ra["status"] == rb["status"] == "ok":
            pairs.append((s, score(ra, metric, split) - score(rb, metric, split)))
    if not pairs:
        return None
    return {"seeds": [s for s, _ in pairs], **paired_stats.summarize([d for _, d in pairs])}


def family(comparisons: list[dict]) -> list[dict]:
    """The study's comparisons with Holm-adjusted p-values and verdicts over all of them (in place)."""
    paired_stats.add_holm([c["paired"] for c in comparisons])
    return comparisons


def diagnostics_of(rec: dict) -> dict:
    """The run's last-step CRD diagnostics (results.json) and the smallest logged gap (its TensorBoard)."""
    out = dict(((rec.get("results") or {}).get("diagnostics")) or {})
    logged = _logged(Path(rec["run_dir"]), ("bank/sim_gap", "crd/student_norm"))
    if logged.get("bank/sim_gap"):
        out["min_sim_gap"] = min(logged["bank/sim_gap"])
    if logged.get("crd/student_norm"):
        out["first_student_norm"] = logged["crd/student_norm"][0]
    return out


def _logged(run_dir: Path, tags: tuple) -> dict:
    """``{tag: [values in step order]}`` from the run's TensorBoard events (empty without tensorboard)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {}
    events = sorted(run_dir.glob("**/events.out.tfevents.*"))
    if not events:
        return {}
    acc = EventAccumulator(str(events[0].parent), size_guidance={"scalars": 0})
    acc.Reload()
    have = acc.Tags().get("scalars", [])
    return {t: [e.value for e in sorted(acc.Scalars(t), key=lambda e: e.step)] for t in tags if t in have}


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


# --------------------------------------------------------------------------- outputs


def norms(diags: list[dict]) -> str:
    """Mean projected student-feature norm at the first and the last log step."""
    pairs = [(d["first_student_norm"], d["crd/student_norm"]) for d in diags
             if d.get("first_student_norm") is not None and d.get("crd/student_norm") is not None]
    if not pairs:
        return "–"
    return f"{statistics.fmean(p[0] for p in pairs):.1f} → {statistics.fmean(p[1] for p in pairs):.1f}"


def variant_rows(args, records: dict, metric: str) -> list[str]:
    lines = ["| variant | settings | " + metric + " (mean ± std) | n | pos cos | neg cos | gap | min gap | "
             "L_CRD/log(K+1) | ‖h_s‖ first → last | collapse warnings | train s |", "|" + "---|" * 12]
    for v in args.variants:
        ok = [records[(v, s)] for s in args.seeds if (v, s) in records and records[(v, s)]["status"] == "ok"]
        vals = [score(r, metric, args.split) for r in ok]
        diags = [r["diagnostics"] for r in ok if r.get("diagnostics")]

        def col(key: str) -> str:
            xs = [d[key] for d in diags if d.get(key) is not None]
            return f"{statistics.fmean(xs):.3f}" if xs else "–"
        warned = f"{sum(bool(d.get('collapse_warning')) for d in diags)}/{len(diags)}" if diags else "–"
        train = [r["results"].get("train_seconds_this_session") or 0 for r in ok]
        method, extra = VARIANTS[v]
        settings = " ".join([f"method.name={method}", *extra])
        lines.append(f"| {v} | `{settings}` | {_mean_std(vals)} | {len(ok)} | {col('bank/pos_sim')} | "
                     f"{col('bank/neg_sim')} | {col('bank/sim_gap')} | {col('min_sim_gap')} | "
                     f"{col('crd/loss_over_log_k1')} | {norms(diags)} | {warned} | "
                     f"{statistics.fmean(train):.0f} |" if train else f"| {v} | `{settings}` | not run | 0 |" + " – |" * 8)
    return lines


def comparison_rows(args, comparisons: list[dict]) -> list[str]:
    """One row per comparison: per-seed differences, mean, both 95 % intervals, wins/ties/losses, exact sign-flip
    p, Holm-adjusted p over the family, and what that reads as (paired_stats.verdict)."""
    lines = ["| A vs B | claim | A − B per seed | mean | 95 % t interval | 95 % sign-flip interval | A wins/ties/losses "
             "| p (sign flip) | p (Holm) | reads as |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        d = c["paired"]
        if d is None:
            lines.append(f"| {c['a']} vs {c['b']} | {c['claim']} | not run |" + " – |" * 7)
            continue
        per_seed = ", ".join(f"{x * 100:+.1f}" for x in d["diffs"])
        p = f"{d['p']:.3f}" if d["p"] is not None else "–"
        holm = f"{d['p_holm']:.3f}" if d.get("p_holm") is not None else "–"
        lines.append(f"| {c['a']} vs {c['b']} | {c['claim']} | {per_seed} | {d['mean'] * 100:+.2f} | "
                     f"{paired_stats.interval_text(d['t_interval'])} | "
                     f"{paired_stats.interval_text(d['sign_flip_interval'])} | {d['wins']}/{d['ties']}/{d['losses']} | "
                     f"{p} | {holm} | {d.get('verdict', '–')} |")
    return lines


def statistics_note(n_comparisons: int) -> str:
    """How to read the comparison table (the margin is fixed before any run: paired_stats.LEVEL_MARGIN)."""
    margin = paired_stats.LEVEL_MARGIN * 100
    return (f"Points = 100 × difference. Intervals: 95 %, Student t and the exact sign-flip test inverted (unbounded "
            f"with 5 or fewer seeds, where no shift can be rejected). p: exact two-sided sign-flip; Holm: adjusted over "
            f"the {n_comparisons} comparisons of this table. Reads as: 'A higher' / 'A lower' where the Holm p < 0.05; "
            f"'level' only where both intervals lie inside ±{margin:g} point(s), a margin fixed before the runs; "
            f"otherwise 'no difference shown' (which is not evidence of equality).")


def write_chart(path: Path, args, records: dict, comparisons: list[dict], metric: str, teacher_value) -> bool:
    """Left: every seed's value per variant, each seed's values joined by a line (its own colour), the mean as a
    bar; right: every comparison's per-seed differences (spread vertically by seed, so equal values do not hide
    each other) with the mean and its 95 % t interval. Legends and labels sit outside the data."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = getattr(args, "split", "validation")  # fidelity_pretrain's studies: validation
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [1.1, 1]})
    colours = plt.get_cmap("tab10")
    for k, seed in enumerate(args.seeds):
        pts = [(x, score(records[(v, seed)], metric, split)) for x, v in enumerate(args.variants)
               if records.get((v, seed), {}).get("status") == "ok"]
        if pts:
            left.plot(*zip(*pts), marker="o", markersize=4, linewidth=0.7, alpha=0.8, color=colours(k % 10),
                      label=f"seed {seed}")
    for x, v in enumerate(args.variants):
        vals = [score(records[(v, s)], metric, split) for s in args.seeds
                if records.get((v, s), {}).get("status") == "ok"]
        if vals:
            left.hlines(statistics.fmean(vals), x - 0.3, x + 0.3, color="black", linewidth=2)
    if teacher_value is not None:
        left.axhline(teacher_value, color="gray", linestyle="--", linewidth=1)
        left.annotate(f"teacher {teacher_value:.3f}", xy=(1.0, teacher_value), xycoords=("axes fraction", "data"),
                      xytext=(4, 0), textcoords="offset points", va="center", fontsize=8, color="gray")
    left.set_xticks(range(len(args.variants)), args.variants, rotation=40, ha="right", fontsize=8)
    left.set_ylabel(f"{split} {metric}")
    left.set_title(f"{args.task}: each seed joined across variants; black bar: mean", fontsize=10)
    left.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.28), ncol=min(len(args.seeds), 5),
                frameon=False)
    shown = [c for c in comparisons if c["paired"]]
    for y, c in enumerate(shown):
        d = c["paired"]
        n = len(d["diffs"])
        offsets = [(i - (n - 1) / 2) * 0.5 / max(n, 1) for i in range(n)]
        right.scatter([x * 100 for x in d["diffs"]], [y + o for o in offsets], s=12, color="#4C72B0", zorder=3)
        lo, hi = d.get("t_interval") or (d["mean"], d["mean"])
        right.errorbar(d["mean"] * 100, y, xerr=[[(d["mean"] - lo) * 100], [(hi - d["mean"]) * 100]], fmt="D",
                       color="#C44E52", capsize=4, zorder=4)
    right.axvline(0, color="black", linewidth=1)
    right.set_yticks(range(len(shown)), [f"{c['a']} − {c['b']}" for c in shown], fontsize=8)
    right.invert_yaxis()
    right.set_xlabel(f"A − B in {metric} (points); dots: seeds; red: mean, 95 % t interval", fontsize=9)
    right.set_title("paired differences (same seed, data order, student init)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def recorded_study(path: Path, command: str) -> dict:
    """A committed study's JSON for ``--report_only``, with the device line of its table (the JSON has none)."""
    data = read_json(path)
    if data is None:
        raise CodirError(f"--report_only: no study JSON at '{path}': run the study first")
    if data.get("command") != command:
        raise CodirError(f"--report_only: '{path}' was written by `{data.get('command')}`, not `{command}`: pass that "
                         f"command's arguments")
    md = path.with_suffix(".md")
    device = next((line[len("- Device: "):].split(";")[0] for line in
                   (md.read_text().splitlines() if md.is_file() else []) if line.startswith("- Device: ")), None)
    return {**data, "device": device}


def write_outputs(args, teacher: dict, records: dict, recorded: Optional[dict] = None) -> list[Path]:
    """The study's table, JSON and plot; ``recorded``: a committed study's date, versions and device, kept when
    its tables are rewritten (``--report_only``)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metric = ((teacher.get("results") or {}).get("main_metric")) or "accuracy"
    comparisons = family([{"a": a, "b": b, "claim": claim,
                           "paired": paired(records, a, b, args.seeds, metric, args.split)}
                          for a, b, claim in COMPARISONS if a in args.variants and b in args.variants])
    teacher_value = (((teacher.get("results") or {}).get("final" if args.split == "validation" else "test"))
                     or {}).get(metric)
    date, versions, device = study_meta(recorded, 1)
    p = PRESETS[args.size]
    lines = [regenerate_command(args), "", f"# {args.task}: paired study, {len(args.variants)} variants x "
             f"{len(args.seeds)} seeds (preset {args.size})", "",
             f"- Device: {device}; {', '.join(f'{k} {v}' for k, v in versions.items())}. Date: {date} (UTC).",
             f"- Teacher: {p['teacher_model']} finetuned with ce{teacher_settings(p)}: {metric} "
             f"{teacher_value if teacher_value is None else round(teacher_value, 4)}.",
             f"- Students: {p['student_model']}; {' '.join(p['common'] + p['student'][2:])}; seeds "
             f"{', '.join(map(str, args.seeds))}"
             + (f"; every codir variant: {' '.join(p['codir_sets'])} before its own keys" if p.get("codir_sets")
                else "") + "; teacher outputs cached (training.teacher_cache) for every "
             f"variant that reads a teacher" + (f"; every student: {' '.join(args.overrides)}" if args.overrides
                                                else "") + ".",
             *teachers_line(records),
             "- Diagnostics: the CRD values at the last log step (mean over seeds); min gap: the smallest "
             "positive-minus-negative cosine logged during training; collapse warnings: runs that printed one.",
             "", *variant_rows(args, records, metric), "",
             f"Paired differences in {args.split} {metric} (final model), same seed on both sides. "
             f"{statistics_note(len(comparisons))}", "", *comparison_rows(args, comparisons)]
    md, js, png = out / f"{args.task}.md", out / f"{args.task}.json", out / f"{args.task}.png"
    md.write_text("\n".join(lines) + "\n")
    runs = [{**rec, "variant": v, "seed": s} for (v, s), rec in records.items()]
    js.write_text(json.dumps({"task": args.task, "command": regenerate_command(args), "size": args.size,
                              "preset": p, "variants": {v: VARIANTS[v] for v in args.variants}, "seeds": args.seeds,
                              "metric": metric, "date_utc": date, "versions": versions,
                              "teacher": teacher, "runs": runs, "comparisons": comparisons}, indent=2))
    written = [md, js]
    if write_chart(png, args, records, comparisons, metric, teacher_value):
        written.append(png)
    return written


def teacher_settings(preset: dict) -> str:
    """The teacher's training overrides beyond its initialisation, in parentheses (empty when there are none)."""
    rest = preset["teacher"][2:]
    return f" ({' '.join(rest)})" if rest else ""


def teachers_line(records: dict) -> list[str]:
    """A header line when the students trained against more than one teacher (a study resumed on a new machine,
    which finetuned the teacher again): how many runs used each."""
    shas = [r.get("teacher_sha256") for r in records.values() if r.get("status") == "ok" and r.get("teacher_sha256")]
    if len(set(shas)) < 2:
        return []
    counts = ", ".join(f"{sha[:12]}: {shas.count(sha)} runs" for sha in dict.fromkeys(shas))
    return [f"- Teachers: {len(set(shas))} finetunings of the same teacher config (the study resumed on a new "
            f"machine), by weights sha256: {counts}. Pairs within a seed may straddle them."]


def study_meta(recorded: Optional[dict], ranks: int) -> tuple[str, dict, str]:
    """``(date, versions, device)``: a committed study's (``--report_only``) or now and this machine's."""
    if recorded:
        return (recorded["date_utc"], recorded["versions"],
                recorded.get("device") or compare.device_description(ranks))
    return (datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"), compare.versions(),
            compare.device_description(ranks))


def resumed_records(args, command: str) -> dict:
    """``--resume_json``: the finished runs of earlier studies written by ``command``, keyed (variant, seed).

    Their run directories may be gone (a released GPU machine): their results are kept as recorded. Each keeps the
    teacher sha256 it trained against (``teacher_sha256``), so a study that retrained its teacher shows it."""
    kept: dict = {}
    for path in args.resume_json:
        data = read_json(Path(path))
        if data is None or _settings_of(data.get("command") or "") != _settings_of(command):
            raise CodirError(f"--resume_json '{path}' was written by `{(data or {}).get('command')}`, whose task, "
                             f"preset, split or settings differ from `{command}`: pass a JSON of this study")
        for rec in data.get("runs", []):
            key = (rec.get("variant"), rec.get("seed"))
            if rec.get("status") == "ok" and key[0] in args.variants and key[1] in args.seeds and key not in kept:
                kept[key] = {**rec, "action": f"resumed from {path}"}
    if kept:
        print(f"resumed: {len(kept)} finished run(s) from {', '.join(args.resume_json)}", flush=True)
    return kept


def _settings_of(command: str) -> list[str]:
    """A study command without what may differ between a study and its resumption: where its files go, how many
    runs at a time, and which seeds and variants (those of the earlier JSON that the new study has are kept)."""
    words, kept = command.split(), []
    skip = {"--out", "--work_dir", "--jobs", "--seeds", "--variants"}
    i = 0
    while i < len(words):
        if words[i] in skip:
            i += 2
            continue
        kept.append(words[i])
        i += 1
    return kept


def report_only(args) -> int:
    """``--report_only``: the committed study's tables rewritten from its JSON; no run is started."""
    recorded = recorded_study(Path(args.out) / f"{args.task}.json", regenerate_command(args))
    records = {(r["variant"], r["seed"]): r for r in recorded["runs"]}
    written = write_outputs(args, recorded["teacher"], records, recorded)
    print("rewritten:\n" + "\n".join(f"  {p}" for p in written), flush=True)
    return 0


# --------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.report_only:
        try:
            return report_only(args)
        except CodirError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
    task_dir = Path(args.work_dir) / args.task
    teacher_dir = task_dir / "teacher"
    try:  # every config is validated before the first job
        compare.load_config(str(REPO / compare.BASE_CONFIG), teacher_overrides(args))
        for v in args.variants:
            compare.load_config(str(REPO / compare.BASE_CONFIG),
                                variant_overrides(args, v, args.seeds[0], teacher_dir / "export", "0" * 64))
        records = resumed_records(args, regenerate_command(args))
    except CodirError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    t0 = time.perf_counter()
    print(f"teacher: {teacher_dir}", flush=True)
    teacher = compare.run_one(args, "teacher", teacher_dir, teacher_overrides(args), task_dir / "logs" / "teacher.log")
    if teacher["status"] != "ok":
        print(f"error: the teacher run failed: {teacher['error']} (log {teacher['log']})", file=sys.stderr)
        return 1
    sha = (read_json(teacher_dir / "export" / compare.EXPORT_MANIFEST) or {}).get("sha256")
    # seed-major: the first seeds complete first
    grid = [(v, s) for s in args.seeds for v in args.variants if (v, s) not in records]
    resumed = len(records)
    lock = threading.Lock()

    def one(k: int, v: str, s: int) -> None:
        name = f"{v}_seed{s}"
        rec = compare.run_one(args, name, task_dir / name, variant_overrides(args, v, s, teacher_dir / "export", sha),
                              task_dir / "logs" / f"{name}.log")
        if rec["status"] == "ok":
            rec["diagnostics"] = diagnostics_of(rec)
        rec.update(method=v, seed=s, teacher_sha256=sha if compare.uses_teacher(VARIANTS[v][0]) else None)
        with lock:
            records[(v, s)] = rec
            compare._report(rec, len(records), len(grid) + resumed)
            write_outputs(args, teacher, records)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for f in [pool.submit(one, k, v, s) for k, (v, s) in enumerate(grid)]:
            f.result()
    written = write_outputs(args, teacher, records)
    failed = [f"{v}_seed{s}" for (v, s), r in records.items() if r["status"] != "ok"]
    print(f"done in {time.perf_counter() - t0:.0f} s; {len(failed)} failed" + (f": {', '.join(failed)}" if failed
                                                                                 else ""), flush=True)
    print("written:\n" + "\n".join(f"  {p}" for p in written), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
