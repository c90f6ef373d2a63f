"""What a distilled student buys: size, task metrics, latency and throughput beside a reference model.

:func:`build_report` checks every model first (:func:`~codir_ds.deploy.served.check_model_dir`), then
loads one at a time and measures:

- parameters (total and without the embedding layer) and the weight files' bytes on disk;
- the task's metrics on the chosen split (the trainer's batching and metrics);
- latency of one forward pass at each batch size (default 1 and 32), on real examples of the
  split padded to ``data.max_length`` (the fixed shape a served model sees at that setting):
  ``warmup`` untimed passes, then the median and 95th percentile of ``repeats`` timed ones;
- throughput: examples per second at each batch size (batch size / median latency);
- against the first model (the reference, normally the teacher): the speed-up at each batch size
  (reference median / this median), how many times fewer parameters, and the share of the
  reference's main metric kept (this / reference).

Latencies are measurements of this machine at the time of the run, never test assertions.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from codir_ds.data.collate import ClassificationCollator
from codir_ds.data.tasks import Example, TaskData
from codir_ds.deploy.served import ServedModel, check_model_dir, open_model
from codir_ds.engine.evaluation import evaluate
from codir_ds.errors import CodirError
from codir_ds.models.size import human_count


@dataclass(frozen=True)
class LatencySpec:
    """How latency is measured: batch sizes, untimed warm-up passes, timed repeats."""
    batch_sizes: tuple[int, ...] = (1, 32)
    warmup: int = 5
    repeats: int = 30

    def check(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise CodirError(f"--latency_batch_sizes must be integers >= 1; got {list(self.batch_sizes)}")
        if self.repeats < 0 or self.warmup < 0:
            raise CodirError(f"--repeats and --warmup must be >= 0 (0 repeats: no latency); got {self.repeats}, "
                             f"{self.warmup}")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(threads: int, device: str) -> dict:
    """Where the numbers were measured."""
    env = {"cpu": cpu_name(), "threads": threads, "device": device, "torch": torch.__version__,
           "python": platform.python_version()}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    try:
        import onnxruntime
        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return env


def latency_batch(examples: Sequence[Example], tokenizer, max_length: int, batch_size: int,
                  is_regression: bool) -> dict:
    """``batch_size`` real examples (cycled if the split is smaller), padded to exactly ``max_length``."""
    picked = [examples[i % len(examples)] for i in range(batch_size)]
    batch = ClassificationCollator(tokenizer, max_length, is_regression)(picked)
    pad = max_length - batch["input_ids"].shape[1]
    if pad > 0:
        fill = {"input_ids": tokenizer.pad_token_id or 0, "attention_mask": 0, "token_type_ids": 0}
        for k, v in fill.items():
            batch[k] = torch.nn.functional.pad(batch[k], (0, pad), value=v)
    return batch


def time_forward(forward, batch: dict, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` timed forward passes after ``warmup`` untimed ones (CUDA synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        forward(batch)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward(batch)
        sync()
        times.append(time.perf_counter() - t0)
    return times


def latency_stats(times: list[float], batch_size: int) -> dict:
    t = torch.tensor(times, dtype=torch.float64)
    median = float(t.quantile(0.5))  # the middle value, or the mean of the two middle ones
    return {"median_ms": round(1e3 * median, 3), "p95_ms": round(1e3 * float(t.quantile(0.95)), 3),
            "examples_per_s": round(batch_size / median, 1), "repeats": len(times)}


def measure_latency(model: ServedModel, examples: Sequence[Example], max_length: int, spec: LatencySpec,
                    is_regression: bool) -> dict:
    """``{batch size: latency_stats}`` of ``model``; empty when ``spec.repeats`` is 0."""
    if spec.repeats == 0:
        return {}
    out = {}
    for bs in spec.batch_sizes:
        batch = latency_batch(examples, model.tokenizer, max_length, bs, is_regression)
        out[str(bs)] = latency_stats(time_forward(model.forward, batch, spec.warmup, spec.repeats), bs)
    return out


def against_reference(row: dict, ref: dict, main_metric: str) -> dict:
    """Speed-up per batch size, parameter and disk ratios, and the share of the reference's main metric kept."""
    speedup = {bs: round(ref["latency"][bs]["median_ms"] / lat["median_ms"], 2)
               for bs, lat in row["latency"].items() if bs in ref["latency"] and lat["median_ms"] > 0}
    ref_metric, metric = ref["metrics"].get(main_metric), row["metrics"].get(main_metric)
    kept = round(metric / ref_metric, 4) if ref_metric and metric is not None else None
    return {"speedup": speedup, "params_ratio": round(ref["params"]["total"] / row["params"]["total"], 2),
            "non_embedding_params_ratio": round(ref["params"]["non_embedding"] / max(row["params"]["non_embedding"], 1),
                                                2),
            "disk_ratio": round(ref["disk_bytes"] / max(row["disk_bytes"], 1), 2), "metric_kept": kept}


def parse_model_arg(spec: str) -> tuple[Optional[str], str]:
    """``NAME=DIR`` -> ``(NAME, DIR)``; a plain ``DIR`` (or one whose text before ``=`` holds a ``/``) ->
    ``(None, DIR)``."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name and not Path(spec).exists():
        return name, path
    return None, spec


def build_report(model_specs: Sequence[str], task: TaskData, split: str, max_length: int, batch_size: int,
                 spec: LatencySpec = LatencySpec(), device: str = "cpu", threads: Optional[int] = None,
                 progress=print) -> dict:
    """The side-by-side report of ``model_specs`` (``[NAME=]DIR``, PyTorch or ONNX) on ``split`` of ``task``.

    Every model is checked before the first is loaded, so bad input costs no measurement. ``threads``
    (default: torch's current number) is used by PyTorch and ONNX Runtime alike.
    """
    spec.check()
    examples = task.split(split)
    if not examples:
        hint = " (packaged tasks only; data.test_fraction > 0)" if split == "test" else ""
        raise CodirError(f"the {split} split of task '{task.name}' is empty{hint}: pick another --split or check "
                         f"data.*")
    named = [parse_model_arg(s) for s in model_specs]
    paths = [check_model_dir(path, task, max_length) for _, path in named]
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    main = task.metric_names[0]
    rows = []
    for (name, _), path in zip(named, paths):
        model = open_model(path, device, threads)
        collator = ClassificationCollator(model.tokenizer, max_length, task.is_regression)
        metrics = evaluate(model.forward, examples, collator, batch_size, torch.device(model.device),
                           task.metric_names)
        row = {"name": name or path.name, "path": str(path), "backend": model.backend,
               "precision": model.precision, "device": model.device, "params": model.params,
               "disk_bytes": model.disk_bytes, "metrics": metrics,
               "latency": measure_latency(model, examples, max_length, spec, task.is_regression)}
        row["vs_reference"] = against_reference(row, rows[0], main) if rows else None
        rows.append(row)
        progress(f"[report] {row['name']} ({model.label}): {main} {metrics[main]:.4f}"
                 + "".join(f", batch {bs} {lat['median_ms']:.1f} ms" for bs, lat in row["latency"].items()))
        del model
    return {"task": task.name, "split": split, "num_examples": len(examples), "main_metric": main,
            "max_length": max_length, "environment": environment(threads, device),
            "latency_spec": {"batch_sizes": list(spec.batch_sizes), "warmup": spec.warmup, "repeats": spec.repeats,
                             "padding": "max_length"}, "models": rows}


def _cell_latency(lat: Optional[dict]) -> str:
    return f"{lat['median_ms']:.1f} / {lat['p95_ms']:.1f}" if lat else "-"


def render_markdown(report: dict) -> str:
    """The report as a heading line, a Markdown table and a legend (also what stdout shows)."""
    main, sizes = report["main_metric"], [str(b) for b in report["latency_spec"]["batch_sizes"]]
    if not report["latency_spec"]["repeats"]:
        sizes = []
    env = report["environment"]
    head = (f"{report['task']}, {report['split']} split ({report['num_examples']} examples), max_length "
            f"{report['max_length']}; {env.get('gpu') or env['cpu']}, {env['threads']} thread(s), torch {env['torch']}"
            + (f", onnxruntime {env['onnxruntime']}" if "onnxruntime" in env else ""))
    cols = (["model", "runtime", "params (w/o emb.)", "weights MB", main]
            + [f"b{b} ms (median / p95)" for b in sizes] + [f"b{b} ex/s" for b in sizes[-1:]]
            + [f"speed-up b{b}" for b in sizes] + ["fewer params (w/o emb.)", f"{main} kept"])
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in report["models"]:
        vs = r["vs_reference"] or {}
        cells = [r["name"], f"{r['backend']} {r['precision']}",
                 f"{human_count(r['params']['total'])} ({human_count(r['params']['non_embedding'])})",
                 f"{r['disk_bytes'] / 1e6:.1f}", f"{r['metrics'][main]:.4f}"]
        cells += [_cell_latency(r["latency"].get(b)) for b in sizes]
        cells += [f"{r['latency'][b]['examples_per_s']:.0f}" if b in r["latency"] else "-" for b in sizes[-1:]]
        cells += [f"{vs['speedup'][b]:.2f}x" if b in vs.get("speedup", {}) else "ref." for b in sizes]
        cells += [f"{vs['params_ratio']:.2f}x ({vs['non_embedding_params_ratio']:.2f}x)" if vs else "ref.",
                  f"{100 * vs['metric_kept']:.1f} %" if vs.get("metric_kept") is not None else "ref."]
        lines.append("| " + " | ".join(cells) + " |")
    spec = report["latency_spec"]
    if sizes:
        lines += ["", f"latency: one forward pass, inputs padded to {report['max_length']} tokens, median and 95th "
                      f"percentile of {spec['repeats']} timed passes after {spec['warmup']} warm-up; speed-up and "
                      f"the rest against the first row"]
    return "\n".join(lines)


def write_report(report: dict, output: Path) -> None:
    """``.md`` -> the Markdown table; anything else -> JSON."""
    output.parent.mkdir(parents=True, exist_ok=True)
    text = render_markdown(report) + "\n" if output.suffix == ".md" else json.dumps(report, indent=2) + "\n"
    output.write_text(text)
