"""Student-speed switches: per-step time of a real finetune with each training.optimizer_impl / training.compile.

    python bench/student_options.py --output bench/results/cpu_student_options.json

Each variant is one finetuning run of ``codir_ds.recipes.recipe_for(cfg, "finetune", ...)`` (``FinetuneRecipe``
in codir_ds/recipes/finetune.py: ``setup()`` then ``train()``; DeepSpeed engine from
``--deepspeed_config``, the repository's optimizer and schedule, collator, evaluation, checkpoint and
export) in its own Python process (1 rank), on ``configs/fine_movie_snippets_cpu.yaml``: the student is
the packaged MiniLM's layers 0 and 3 (2 layers x 384, 12 heads), batches of ``--batch`` padded to their longest sequence (<= ``--max_length`` tokens), fp32. The default
method ``ce`` times the student alone; ``--method kd``/``codir`` add a MiniLM teacher with a fresh
classifier head (enough for timing). Variants differ only in the two switches (``--variants``).

Timing: a timestamp at every optimizer step (``after_step``) and around the base torch optimizer's
``step`` (the part ``optimizer_impl`` changes). The first ``--warmup`` steps are excluded from the
per-step statistics: they hold the compilation of the training graphs under ``training.compile``.
Variants run ``--repeats`` times, interleaved; the summary takes each variant's lowest per-run median
(the machine may be shared), the runs keep every step time.
Compile time is reported two ways: TorchDynamo's own accounting (``calculate_time_spent``: tracing +
Inductor, training and evaluation graphs) and the warm-up steps' excess over the steady-state median,
relative to the eager run. Every compiled run starts with an empty Inductor cache (cold compile).
Prints one JSON object (and writes it to ``--output``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.cli import emit_report  # noqa: E402

DEFAULT_VARIANTS = "eager:fused,eager:foreach,eager:plain,compile:fused"


def _command() -> str:
    script = Path(sys.argv[0])
    shown = str(script.resolve().relative_to(REPO)) if script.resolve().is_relative_to(REPO) else str(script)
    return "python " + " ".join([shown, *sys.argv[1:]])


def _device(threads: int) -> str:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"CPU {model} ({os.cpu_count()} cores, {threads} torch threads)"


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {}
    xs_sorted = sorted(xs)
    return {"median": round(statistics.median(xs), 4), "mean": round(statistics.fmean(xs), 4),
            "min": round(xs_sorted[0], 4), "max": round(xs_sorted[-1], 4), "n": len(xs)}


# ----------------------------------------------------------------------------- one variant (child process)

def _instrument(recipe) -> tuple[dict, list[float], list[float]]:
    """``(info, marks, opt_times)``: the set-up recipe's optimizer facts, and the timestamps its training fills.

    ``marks`` gets a timestamp at every optimizer step (``after_step``), ``opt_times`` the time spent in
    the base torch optimizer's ``step`` during that optimizer step.
    """
    marks: list[float] = []
    opt_times: list[float] = []  # per optimizer step: ZeRO calls the base optimizer once per parameter group
    opt_pending = [0.0]

    opt = recipe.optimizer
    base = getattr(opt, "optimizer", opt)  # ZeRO wraps the torch AdamW
    group = base.param_groups[0]
    student = recipe.engine.module.student
    info = {"student_parameters": sum(p.numel() for p in student.parameters()),
            "optimizer": f"{type(opt).__name__}({type(base).__name__})", "fused": bool(group.get("fused")),
            "foreach": bool(group.get("foreach")), "compiled": bool(recipe.engine.is_compiled)}
    orig_step = base.step

    def timed_step(*args, **kwargs):
        t = time.perf_counter()
        out = orig_step(*args, **kwargs)
        opt_pending[0] += time.perf_counter() - t
        return out

    base.step = timed_step
    orig_after_step = recipe.after_step

    def timed_after_step():  # once per optimizer step, right after it (Recipe.train's loop)
        marks.append(time.perf_counter())
        opt_times.append(opt_pending[0])
        opt_pending[0] = 0.0
        return orig_after_step()

    recipe.after_step = timed_after_step
    return info, marks, opt_times


def run_variant(spec: dict) -> dict:
    """One finetune in this process; returns its timings."""
    import torch
    torch.set_num_threads(spec["threads"])
    import torch._dynamo.utils as dynamo_utils

    from codir_ds.config import load_config
    from codir_ds.recipes import recipe_for

    cfg = load_config(str(REPO / "configs" / "fine_movie_snippets_cpu.yaml"), spec["sets"])
    t_run = time.perf_counter()
    recipe = recipe_for(cfg, "finetune", spec["deepspeed_config"], spec["output_dir"], overwrite=True)
    recipe.setup()  # checks, models, engine, components: everything before the first step
    info, marks, opt_times = _instrument(recipe)
    start = time.perf_counter()
    results = recipe.train()
    t_end = time.perf_counter()
    steps = [b - a for a, b in zip([start] + marks[:-1], marks)]
    w = spec["warmup"]
    timed = steps[w:]
    spent = {k: round(v, 2) for k, v in dynamo_utils.calculate_time_spent().items()}
    counters = dynamo_utils.counters
    return {
        **info,
        "setup_seconds": round(start - t_run, 2),
        "warmup_step_seconds": [round(s, 3) for s in steps[:w]],
        "timed_step_seconds": [round(s, 4) for s in timed],
        "timed_optimizer_step_seconds": [round(s, 5) for s in opt_times[w:]],
        "step_seconds": _stats(timed),
        "optimizer_step_seconds": _stats(opt_times[w:]),
        "samples_per_second": round(spec["batch"] / statistics.median(timed), 2),
        "warmup_excess_seconds": round(sum(steps[:w]) - w * statistics.median(timed), 2),
        "final_eval_save_export_seconds": round(t_end - marks[-1], 2),
        "dynamo_time_spent_seconds": spent,
        "dynamo_unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
        "dynamo_graph_breaks": int(sum(counters["graph_break"].values())),
        "final": results["final"],
        "steps": results["steps"],
    }


# ----------------------------------------------------------------------------- driver

def _variant(text: str):
    """``mode:impl[:grouped]`` -> ``(mode, impl, grouped)``; grouped is None when the third part is not 'grouped'."""
    parts = text.split(":")
    mode, impl = parts[0], parts[1] if len(parts) > 1 else ""
    grouped = False if len(parts) <= 2 else (True if parts[2:] == ["grouped"] else None)
    return mode, impl, grouped


def _parse_args() -> argparse.Namespace:
    from codir_ds.cli import DefaultsHelpFormatter
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="comma-separated eager|compile:fused|foreach|plain|auto (default: %(default)s)")
    ap.add_argument("--method", default="ce", choices=("ce", "kd", "codir"))
    ap.add_argument("--warmup", type=int, default=3, help="optimizer steps excluded from the statistics")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    ap.add_argument("--batch", type=int, default=32, help="train batch (one micro-batch)")
    ap.add_argument("--max_length", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each variant, interleaved")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--deepspeed_config", default="ds_configs/zero2.json")
    ap.add_argument("--minilm", default="all-MiniLM-L6-v2")
    ap.add_argument("--work_dir", default=None, help="keep the runs here (default: a temporary directory, removed)")
    ap.add_argument("--output", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args()


def _common_sets(args, work: Path) -> list[str]:
    """The config overrides every variant shares (``--method``'s teacher made under ``work`` when it needs one)."""
    sets = [f"method.name={args.method}", f"model.student_init={args.minilm}",
            "data.max_train_examples=2000", "data.max_eval_examples=128", f"data.max_length={args.max_length}",
            f"training.max_steps={args.warmup + args.steps}", f"training.train_batch_size={args.batch}",
            f"training.micro_batch_size={args.batch}", "training.eval_every=0", "training.eval_batch_size=128",
            "logging.progress_bar=false", "logging.tensorboard=false", f"logging.log_every={10 ** 6}"]
    from codir_ds.config import MethodConfig
    from codir_ds.distill.methods import build_method
    if build_method(MethodConfig(name=args.method), "finetune").teacher is None:
        sets.append("model.teacher=null")
    else:
        from bench.teacher_cache import _timing_teacher
        sets.append(f"model.teacher={_timing_teacher(args.minilm, 'movie_snippets', work / 'teacher')}")
    return sets + args.overrides


def _parse_variants(text: str) -> list[str]:
    variants = [v.strip() for v in text.split(",") if v.strip()]
    for variant in variants:
        mode, impl, grouped = _variant(variant)
        if mode not in ("eager", "compile") or impl not in ("auto", "fused", "foreach", "plain") or grouped is None:
            raise SystemExit(f"error: variant {variant!r}: write eager:<impl> or compile:<impl>, "
                             f"impl one of auto, fused, foreach, plain, optionally :grouped (data.group_by_length)")
    return variants


def _run_child(args, sets: list[str], work: Path, variant: str, rep: int, port: int) -> dict | None:
    """One run of ``variant`` in a fresh process; its record, or None (after printing why) when it failed."""
    mode, impl, grouped = _variant(variant)
    spec = {"sets": sets + [f"training.optimizer_impl={impl}", f"training.compile={mode == 'compile'}",
                            f"data.group_by_length={grouped}"],
            "deepspeed_config": args.deepspeed_config,
            "output_dir": str(work / f"{variant.replace(':', '_')}_{rep}"),
            "warmup": args.warmup, "threads": args.threads, "batch": args.batch}
    inductor_cache = tempfile.mkdtemp(prefix="inductor_", dir=work)  # cold compile for every run
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS=str(args.threads),
               TORCHINDUCTOR_CACHE_DIR=inductor_cache, TORCHINDUCTOR_COMPILE_THREADS="1",
               PYTHONUNBUFFERED="1", DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                          cwd=str(REPO), env=env, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
        print(f"error: variant {variant} failed (exit {proc.returncode})", file=sys.stderr)
        return None
    r = {"repeat": rep, "wall_seconds": round(time.perf_counter() - t0, 1),
         "load_average_before": round(load, 2), **json.loads(line[len("RESULT "):])}
    print(f"{variant} #{rep}: {r['step_seconds']['median']:.3f} s/step (optimizer "
          f"{r['optimizer_step_seconds']['median']:.4f} s), warm-up excess {r['warmup_excess_seconds']} s, "
          f"wall {r['wall_seconds']} s, load {r['load_average_before']}", file=sys.stderr, flush=True)
    return r


def _run_all(args, sets: list[str], work: Path, variants: list[str]) -> dict[str, list] | None:
    """Every variant ``--repeats`` times; None when a run failed."""
    runs: dict[str, list] = {v: [] for v in variants}
    port = 29700
    for rep in range(args.repeats):  # interleaved, order reversed every other round: drift hits all alike
        for variant in (variants if rep % 2 == 0 else variants[::-1]):
            port += 1
            r = _run_child(args, sets, work, variant, rep, port)
            if r is None:
                return None
            runs[variant].append(r)
    return runs


def _best(runs: dict, variant: str, key: str) -> float:
    """The lowest per-run median over the repeats: a run slowed by another job on the machine is dropped."""
    return min(statistics.median(r[key]) for r in runs[variant])


def _mean_of(runs: dict, variant: str, key: str) -> float:
    return statistics.fmean(r[key] for r in runs[variant])


def _summary_entry(runs: dict, variant: str, batch: int) -> dict:
    """One variant's summary: its best step times, and its speed relative to the variant it changes."""
    mode, impl, grouped = _variant(variant)
    entry = {"step_seconds": round(_best(runs, variant, "timed_step_seconds"), 4),
             "step_seconds_per_repeat": [r["step_seconds"]["median"] for r in runs[variant]],
             "optimizer_step_seconds": round(_best(runs, variant, "timed_optimizer_step_seconds"), 5),
             "samples_per_second": round(batch / _best(runs, variant, "timed_step_seconds"), 2),
             "final": runs[variant][0]["final"]}
    eager = f"eager:{impl}" if f"eager:{impl}" in runs else None
    if grouped:
        ungrouped = f"{mode}:{impl}"
        if ungrouped in runs:
            entry["speedup_vs_ungrouped"] = round(_best(runs, ungrouped, "timed_step_seconds")
                                                  / _best(runs, variant, "timed_step_seconds"), 3)
    elif mode == "compile":
        entry["compile_seconds_dynamo"] = round(statistics.fmean(
            r["dynamo_time_spent_seconds"].get("entire_frame_compile", 0.0) for r in runs[variant]), 1)
        if eager:
            entry["speedup_vs_eager"] = round(_best(runs, eager, "timed_step_seconds")
                                              / _best(runs, variant, "timed_step_seconds"), 3)
            entry["compile_seconds_warmup_excess"] = round(_mean_of(runs, variant, "warmup_excess_seconds")
                                                           - _mean_of(runs, eager, "warmup_excess_seconds"), 1)
            entry["eval_compile_seconds_approx"] = round(_mean_of(runs, variant, "final_eval_save_export_seconds")
                                                         - _mean_of(runs, eager, "final_eval_save_export_seconds"), 1)
    elif impl != "fused" and "eager:fused" in runs:
        entry["step_vs_fused"] = round(_best(runs, variant, "timed_step_seconds")
                                       / _best(runs, "eager:fused", "timed_step_seconds"), 3)
        entry["optimizer_step_vs_fused"] = round(_best(runs, variant, "timed_optimizer_step_seconds")
                                                 / _best(runs, "eager:fused", "timed_optimizer_step_seconds"), 2)
    return entry


def _report(args, summary: dict, runs: dict) -> dict:
    import deepspeed
    import torch
    import transformers
    return {
        "benchmark": "codir-ds student-speed switches (bench/student_options.py)",
        "command": _command(),
        "device": _device(args.threads),
        "config": {"yaml": "configs/fine_movie_snippets_cpu.yaml", "method": args.method,
                   "student": f"{args.minilm} layers [0, 3] (2 x 384, 12 heads)", "batch": args.batch,
                   "max_length": args.max_length, "padding": "longest in batch", "precision": "fp32",
                   "deepspeed_config": args.deepspeed_config, "warmup_steps": args.warmup, "timed_steps": args.steps,
                   "repeats": args.repeats,
                   "threads": args.threads, "inductor_compile_threads": 1, "overrides": args.overrides},
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "summary": summary,
        "runs": runs,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> int:
    args = _parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_variant(json.loads(args.child))), flush=True)
        return 0

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="student_options_"))
    work.mkdir(parents=True, exist_ok=True)
    sets = _common_sets(args, work)
    variants = _parse_variants(args.variants)
    runs = _run_all(args, sets, work, variants)
    if runs is None:
        return 1
    summary = {variant: _summary_entry(runs, variant, args.batch) for variant in variants}
    report = _report(args, summary, runs)
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)  # 8 runs' checkpoints
    emit_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
