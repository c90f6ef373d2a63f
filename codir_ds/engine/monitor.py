"""Training monitor: TensorBoard scalars and a progress bar (or, without one, a plain log line
every ``logging.log_every`` steps, for batch-job logs), from rank 0 only.

Loss terms arrive as detached tensors every micro step and are summed on device;
they are turned into Python numbers only at logging intervals, so the hot path has
no host-device synchronisation. Logged losses are means over the micro steps of
every rank (an all-reduce at the logging interval), not rank 0's alone.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

# The tags every run writes beside its method's and components' ({tag: (written by, what it is)}).
RUN_TAGS = {
    "train/lr": ("every run", "learning rate"),
    "train/loss_scale": ("fp16 runs", "DeepSpeed's loss scale"),
    "train/skipped_steps": ("every run", "optimizer steps skipped so far (non-finite gradients)"),
    "perf/samples_per_s": ("every run", "training samples per second (all ranks) since the previous write"),
}


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h03m``; ``?`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Monitor:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, progress_bar: bool, total_steps: int,
                 initial_step: int = 0, desc: str = "train"):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # A resumed run redoes the steps after its checkpoint: drop their old events, keep the checkpoint step's.
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                        purge_step=initial_step + 1 if initial_step else None)
        if enabled and progress_bar:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True)
        self.plain = enabled and not progress_bar
        self.desc, self.total_steps, self.initial_step = desc, total_steps, initial_step
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._t0 = self._start = time.perf_counter()
        self._samples = 0

    def accumulate(self, terms: dict[str, torch.Tensor], samples: int) -> None:
        """Add one micro step's detached loss terms (no sync)."""
        for k, v in terms.items():
            self._sums[k] = self._sums[k] + v if k in self._sums else v.clone()
        self._count += 1
        self._samples += samples

    def flush(self, step: int, extra: Optional[dict[str, float]] = None) -> dict[str, float]:
        """Average the window over every rank's micro steps, write scalars, update the bar.

        Collective when distributed (one all-reduce of the window's sums): every rank
        calls it at the same steps. Returns what was logged.
        """
        now = time.perf_counter()
        keys = sorted(self._sums)
        count = float(max(self._count, 1))
        if keys and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sums = torch.stack([self._sums[k].float() for k in keys])
            dist.all_reduce(sums)
            count *= dist.get_world_size()
            self._sums = dict(zip(keys, sums))
        scalars = {k: (self._sums[k] / count).item() for k in keys}
        scalars["perf/samples_per_s"] = self._samples / max(now - self._t0, 1e-9)
        scalars.update(extra or {})
        self._sums, self._count, self._samples, self._t0 = {}, 0, 0, now
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        if self.bar is not None:
            show = {k.split("/")[-1]: f"{v:.4g}" for k, v in scalars.items()
                    if k.startswith("loss/") or k == "perf/samples_per_s"}
            self.bar.set_postfix(show, refresh=False)
        elif self.plain:
            print(self.log_line(step, scalars, now - self._start), flush=True)
        return scalars

    def log_line(self, step: int, scalars: dict[str, float], elapsed: float) -> str:
        """``<desc> step 20/200 (10%) | loss 2.345 | kd 1.2 | lr 1.00e-04 | 512.3 samples/s | elapsed 1m05s |
        eta 9m45s``: the line a batch-job log gets instead of the progress bar."""
        parts = [f"{self.desc} step {step}/{self.total_steps} ({100 * step / max(self.total_steps, 1):.0f}%)"]
        losses = {k[5:]: v for k, v in scalars.items() if k.startswith("loss/")}
        if "total" in losses:
            losses = {"loss": losses.pop("total"), **losses}
        parts += [f"{k} {v:.4g}" for k, v in losses.items()]
        if "train/lr" in scalars:
            parts.append(f"lr {scalars['train/lr']:.2e}")
        if "train/loss_scale" in scalars:
            parts.append(f"loss scale {scalars['train/loss_scale']:g}")
        parts.append(f"{scalars['perf/samples_per_s']:.1f} samples/s")
        done = step - self.initial_step
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        parts += [f"elapsed {duration(elapsed)}", f"eta {duration(eta)}"]
        return " | ".join(parts)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, line: str) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.write(line)
            else:
                print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
