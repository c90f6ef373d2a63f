"""Measured dense matmul peak of this device: TFLOP/s of a square matrix product per dtype.

    python bench/matmul_peak.py [--size 8192] [--dtypes fp16,bf16,fp32] [--output bench/results/x.json]

Each dtype: two ``size x size`` random matrices on the device, both layouts (``a @ b`` and
``F.linear(a, b)`` = ``a @ b.T``, what ``nn.Linear`` runs), a few untimed products, then
``--repeats`` timings of ``--iters`` back-to-back products each (CUDA: between two CUDA events, so
no host sync inside a timing; CPU: ``time.perf_counter``). 2·size³ FLOPs per product. The report
keeps the best and the median timing of the faster layout; ``tflops`` (the best) is the peak
``bench/throughput.py --peak_json`` computes MFU against. fp32 runs as PyTorch runs it by default
(no TF32 on CUDA unless ``torch.backends.cuda.matmul.allow_tf32`` is set).

Prints one JSON object on stdout (and writes it to ``--output``).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.cli import emit_report  # noqa: E402

DTYPES = ("fp16", "bf16", "fp32")


def parse_args(argv=None) -> argparse.Namespace:
    from codir_ds.cli import DefaultsHelpFormatter
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--size", type=int, default=8192, help="matrix side n (n x n times n x n)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated subset of {','.join(DTYPES)}")
    ap.add_argument("--iters", type=int, default=20, help="back-to-back products per timing")
    ap.add_argument("--repeats", type=int, default=5, help="timings per dtype and layout")
    ap.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    ap.add_argument("--output", default=None, help="also write the JSON here (default: stdout only)")
    args = ap.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad or not args.dtypes:
        ap.error(f"--dtypes {','.join(args.dtypes)!r}: use a comma-separated subset of {','.join(DTYPES)}")
    for name in ("size", "iters", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def _timer(device):
    """``time(fn) -> seconds`` of ``fn()``: CUDA events on a GPU (one sync after the end event), else wall time."""
    import torch
    if device.type == "cuda":
        def cuda_time(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return cuda_time

    def wall_time(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    return wall_time


def measure(dtype_name: str, n: int, iters: int, repeats: int, device) -> dict:
    """Best and median TFLOP/s of ``iters`` products of ``n x n`` matrices in ``dtype_name``, the faster layout."""
    import torch
    import torch.nn.functional as F
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    time_of = _timer(device)
    best = None
    for layout, product in (("a @ b", torch.matmul), ("F.linear(a, b) = a @ b.T", F.linear)):
        def run():
            for _ in range(iters):
                product(a, b)
        time_of(run)  # untimed: kernel selection, clocks up
        times = [time_of(run) / iters for _ in range(repeats)]
        entry = {"layout": layout, "tflops": 2 * n ** 3 / min(times) / 1e12,
                 "tflops_median": 2 * n ** 3 / statistics.median(times) / 1e12,
                 "seconds_per_product_best": min(times)}
        if best is None or entry["tflops"] > best["tflops"]:
            best = entry
    return best


def device_label(device) -> str:
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from bench.throughput import device_name
    return device_name()


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    peaks = {name: measure(name, args.size, args.iters, args.repeats, device) for name in args.dtypes}
    report = {
        "benchmark": "dense matmul peak (bench/matmul_peak.py)",
        "device": device_label(device), "device_type": device.type, "size": args.size,
        "iters": args.iters, "repeats": args.repeats,
        "timing": "CUDA events" if device.type == "cuda" else "time.perf_counter",
        "tflops": {name: p["tflops"] for name, p in peaks.items()},
        "peaks": peaks,
        "torch_version": torch.__version__, "python_version": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["bench/matmul_peak.py", *sys.argv[1:]]),
    }
    emit_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
