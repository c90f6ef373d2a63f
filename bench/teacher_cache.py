"""Teacher-output cache: the same finetuning run with and without ``training.teacher_cache``.

    python bench/teacher_cache.py --method kd --epochs 3 --output bench/results/x.json [--set key=value ...]

Runs ``launchers/finetune.py`` twice through the DeepSpeed launcher (1 rank) with a MiniLM
teacher (``--teacher``, or by default the packaged MiniLM with a fresh classifier head, exported
into the work directory: enough for timing) and a 2-layer student from MiniLM layers 0 and 3, identical but for the cache, and prints one
JSON object: training seconds and samples/s of both, the speed-up, the cache's hit/miss counts
and its disk use, and both runs' final metrics (which should agree). Epoch 1 fills the cache, so
the speed-up grows with the number of epochs.
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from codir_ds.pipeline import deepspeed_command  # noqa: E402


def main() -> int:
    from codir_ds.cli import DefaultsHelpFormatter
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--method", default="kd", choices=("kd", "codir"))
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--task", default="movie_snippets")
    ap.add_argument("--max_train_examples", type=int, default=2000)
    ap.add_argument("--teacher", default=None, help="finetuned teacher directory (default: MiniLM with a fresh "
                    "classifier head)")
    ap.add_argument("--minilm", default="all-MiniLM-L6-v2", help="MiniLM directory for the default teacher "
                    "and the student's layers")
    ap.add_argument("--deepspeed_config", default="ds_configs/zero2.json")
    ap.add_argument("--work_dir", default=None)
    ap.add_argument("--output", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="teacher_cache_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.teacher is None:
        args.teacher = str(_timing_teacher(args.minilm, args.task, work / "teacher"))
    common = ["--deepspeed_config", args.deepspeed_config, "--config", "configs/fine_movie_snippets_cpu.yaml",
              "--overwrite", "--set", f"method.name={args.method}", "--set", f"model.teacher={args.teacher}",
              "--set", f"data.task={args.task}", "--set", f"data.max_train_examples={args.max_train_examples}",
              "--set", f"training.epochs={args.epochs}", "--set", "training.max_steps=-1",
              "--set", "logging.progress_bar=false", "--set", f"model.student_init={args.minilm}"]
    for o in args.overrides:
        common += ["--set", o]
    runs = {}
    for name, cache in (("no_cache", "false"), ("cache", "true")):
        out = work / name
        cmd = deepspeed_command("launchers/finetune.py", 1, [*common, "--set", f"training.teacher_cache={cache}",
                                                             "--output_dir", str(out)])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=str(REPO), env=dict(os.environ), capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
            print(f"error: the {name} run failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        res = json.loads((out / "results.json").read_text())
        runs[name] = {"wall_seconds": round(time.perf_counter() - t0, 1),
                      "train_seconds": res["train_seconds_this_session"],
                      "samples_per_second": res["samples_per_second"], "steps": res["steps"],
                      "final": res["final"], "precision": res["precision"],
                      **({"teacher_cache": res["teacher_cache"]} if "teacher_cache" in res else {})}
    report = {
        "benchmark": "codir-ds teacher-output cache (bench/teacher_cache.py)",
        "command": "python " + " ".join([str(Path(sys.argv[0]).relative_to(REPO)) if Path(sys.argv[0]).is_absolute()
                                         else sys.argv[0], *sys.argv[1:]]),
        "device": _device(), "method": args.method, "epochs": args.epochs, "task": args.task,
        "max_train_examples": args.max_train_examples, "teacher": args.teacher, "runs": runs,
        "speedup_train": round(runs["no_cache"]["train_seconds"] / max(runs["cache"]["train_seconds"], 1e-9), 3),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


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
