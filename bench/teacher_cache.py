"""Teacher-output cache: the same finetuning run with and without ``training.teacher_cache``.

    python bench/teacher_cache.py --method kd --epochs 3 --output bench/results/x.json [--set key=value ...]

Runs ``launchers/finetune.py`` twice through the DeepSpeed launcher (1 rank) with a MiniLM
teacher (``--teacher``, or by default the packaged MiniLM with a fresh classifier head, exported
into the work directory: enough for timing) and a 2-layer student from MiniLM layers 0 and 3, identical but for the cache, and prints one
JSON object: training seconds and samples/s of both, the speed-up, the cache's hit/miss counts
and its disk use, and both runs' final metrics (which should agree). Epoch 1 fills the cache, so
the speed-up grows with the number of epochs.

At the paper's model sizes (random weights, timing only):

    python bench/teacher_cache.py --method codir --epochs 3 --teacher_size 12/768/12 --student_size 6/768/12 \
        --set data.max_length=128 --set method.num_negatives=1000
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.cli import emit_report  # noqa: E402

from codir_ds.pipeline import deepspeed_command  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    from codir_ds.cli import DefaultsHelpFormatter
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--method", default="kd", choices=("kd", "codir"))
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--task", default="movie_snippets")
    ap.add_argument("--max_train_examples", type=int, default=2000)
    ap.add_argument("--teacher", default=None, help="finetuned teacher directory (default: MiniLM with a fresh "
                    "classifier head)")
    ap.add_argument("--teacher_size", type=_size, default=None,
                    help="LAYERS/HIDDEN/HEADS: a random-weight BERT classifier of this size (e.g. 12/768/12) with "
                         "the MiniLM tokenizer as the teacher, instead of --teacher (default: --teacher)")
    ap.add_argument("--student_size", type=_size, default=None,
                    help="LAYERS/HIDDEN/HEADS: a student built from a config of this size (e.g. 6/768/12) instead "
                         "of MiniLM layers 0 and 3 (default: MiniLM layers 0 and 3)")
    ap.add_argument("--minilm", default="all-MiniLM-L6-v2", help="MiniLM directory for the default teacher "
                    "and the student's layers")
    ap.add_argument("--deepspeed_config", default="ds_configs/zero2.json")
    ap.add_argument("--work_dir", default=None)
    ap.add_argument("--output", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    if args.teacher is not None and args.teacher_size is not None:
        ap.error("--teacher and --teacher_size both name the teacher: pass one")
    return args


def _size(text: str) -> tuple[int, int, int]:
    """``"12/768/12"`` -> ``(12, 768, 12)`` (an argparse type)."""
    try:
        layers, hidden, heads = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use LAYERS/HIDDEN/HEADS, e.g. 12/768/12") from None
    if min(layers, hidden, heads) < 1 or hidden % heads:
        raise argparse.ArgumentTypeError(f"{text!r}: positive sizes, HIDDEN a multiple of HEADS")
    return layers, hidden, heads


def common_arguments(args) -> list[str]:
    """The launcher arguments both runs share (the cache switch and the output directory aside)."""
    common = ["--deepspeed_config", args.deepspeed_config, "--config", "configs/fine_movie_snippets_cpu.yaml",
              "--overwrite", "--set", f"method.name={args.method}", "--set", f"model.teacher={args.teacher}",
              "--set", f"data.task={args.task}", "--set", f"data.max_train_examples={args.max_train_examples}",
              "--set", f"training.epochs={args.epochs}", "--set", "training.max_steps=-1",
              "--set", "logging.progress_bar=false", "--set", f"model.student_init={args.minilm}"]
    if args.student_size is not None:
        layers, hidden, heads = args.student_size
        common += ["--set", "model.student_init=null", "--set", "model.student_init_layers=null",
                   "--set", f"model.student_layers={layers}", "--set", f"model.student_hidden={hidden}",
                   "--set", f"model.student_heads={heads}"]
    for o in args.overrides:
        common += ["--set", o]
    return common


def run_pair(args, work: Path) -> Optional[dict]:
    """The run without and the run with the cache: each one's timings, steps, metrics (None if one failed)."""
    runs = {}
    for name, cache in (("no_cache", "false"), ("cache", "true")):
        out = work / name
        cmd = deepspeed_command("launchers/finetune.py", 1, [*common_arguments(args), "--set",
                                                             f"training.teacher_cache={cache}",
                                                             "--output_dir", str(out)])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=str(REPO), env=dict(os.environ), capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
            print(f"error: the {name} run failed (exit {proc.returncode})", file=sys.stderr)
            return None
        res = json.loads((out / "results.json").read_text())
        runs[name] = {"wall_seconds": round(time.perf_counter() - t0, 1),
                      "train_seconds": res["train_seconds_this_session"],
                      "samples_per_second": res["samples_per_second"], "steps": res["steps"],
                      "final": res["final"], "precision": res["precision"],
                      **({"teacher_cache": res["teacher_cache"]} if "teacher_cache" in res else {})}
    return runs


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="teacher_cache_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.teacher_size is not None:
        args.teacher = str(_random_teacher(args.teacher_size, args.minilm, args.task, work / "teacher"))
    elif args.teacher is None:
        args.teacher = str(_timing_teacher(args.minilm, args.task, work / "teacher"))
    runs = run_pair(args, work)
    if runs is None:
        return 1
    report = {
        "benchmark": "codir-ds teacher-output cache (bench/teacher_cache.py)",
        "command": "python " + " ".join([str(Path(sys.argv[0]).relative_to(REPO)) if Path(sys.argv[0]).is_absolute()
                                         else sys.argv[0], *sys.argv[1:]]),
        "device": _device(), "method": args.method, "epochs": args.epochs, "task": args.task,
        "max_train_examples": args.max_train_examples, "teacher": args.teacher,
        "teacher_size": args.teacher_size, "student_size": args.student_size, "runs": runs,
        "speedup_train": round(runs["no_cache"]["train_seconds"] / max(runs["cache"]["train_seconds"], 1e-9), 3),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    emit_report(report, args.output)
    return 0


def _random_teacher(size: tuple[int, int, int], minilm: str, task_name: str, out: Path) -> Path:
    """A random-weight BERT classifier of ``size`` (layers, hidden, heads; intermediate 4 x hidden) with the
    MiniLM tokenizer, exported like a finetuned teacher: enough for timing at the paper's model sizes."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification
    from codir_ds.assets import resolve_model_dir
    from codir_ds.data.tasks import load_task
    from codir_ds.models.loading import export_student, load_tokenizer
    layers, hidden, heads = size
    tokenizer = load_tokenizer(resolve_model_dir(minilm))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden,
                        num_labels=load_task({"task": task_name}).num_labels, pad_token_id=tokenizer.pad_token_id)
    export_student(BertForSequenceClassification(config), tokenizer, out)
    return out


def _timing_teacher(minilm: str, task_name: str, out: Path) -> Path:
    """MiniLM with a fresh classifier head for ``task_name``, exported like a finetuned teacher."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from codir_ds.assets import resolve_model_dir
    from codir_ds.data.tasks import load_task
    from codir_ds.models.loading import export_student, load_tokenizer
    path = resolve_model_dir(minilm)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=load_task({"task": task_name}).num_labels, dtype=torch.float32)
    export_student(model, load_tokenizer(path), out)
    return out


def _device() -> str:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"CPU {model} ({os.cpu_count()} cores)"


if __name__ == "__main__":
    sys.exit(main())
