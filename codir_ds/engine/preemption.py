"""Preemption that loses nothing: SIGTERM and SIGINT become "stop after this optimizer step, save, exit".

Cluster schedulers (SLURM, Kubernetes) send SIGTERM and wait a grace period before SIGKILL; Ctrl-C sends SIGINT.
While a run trains, :class:`StopSignals` turns the first such signal into a request. After every optimizer step
the ranks agree on it (one all-reduce of a flag, on the host group where the default group is NCCL), so all of them
stop after the same step, save one complete checkpoint together and exit with :data:`PREEMPTED_EXIT`; rank 0 also
writes ``<run>/preempted.json`` (the step, the signal, the checkpoint), which ``launchers/slurm_multinode.sbatch``
reads to requeue the job.

A signal that arrives in the same burst as the first (within :data:`SAME_EVENT_S`: Ctrl-C reaches every process
of the terminal's group, and the ``deepspeed`` launcher then forwards a SIGTERM) is the same request. A later one
stops the process at once without saving: the checkpoint being written is never published (it has no
``COMPLETE`` marker), so the previous complete checkpoint stays the one ``--resume`` reads. The same holds when the
scheduler's grace period runs out and SIGKILL arrives mid-save.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

#: Exit status of a run that stopped on a signal after saving (EX_TEMPFAIL: "try again").
PREEMPTED_EXIT = 75
#: The marker rank 0 writes into the run directory; removed when the run resumes.
MARKER = "preempted.json"
#: Signals closer than this to the first one belong to the same event.
SAME_EVENT_S = 3.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """SIGTERM / SIGINT as a request to stop at the next optimizer-step boundary (install from the main thread)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.first_at = 0.0
        self._previous: dict = {}
        self.last_checkpoint: Optional[str] = None  # named by the second-signal line

    def install(self) -> "StopSignals":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self.first_at = signum, now
            return
        if now - self.first_at < SAME_EVENT_S:
            return
        where = f"; the last complete checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
        print(f"{signal.Signals(signum).name} again: stopped at once without saving{where}", file=sys.stderr,
              flush=True)
        os._exit(128 + signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"

    def requested(self, group=None) -> bool:
        """Collective when torch.distributed runs with more than one rank: whether any rank got a signal."""
        flag = self.signum is not None
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        if group is None and dist.get_backend() != "gloo":  # NCCL without a host group: the flag goes on the device
            from deepspeed.accelerator import get_accelerator
            t = t.to(get_accelerator().current_device_name())
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return bool(t.item())


def write_marker(run_dir: Path, step: int, signal_name: str, checkpoint: Path) -> None:
    """Rank 0: ``<run>/preempted.json``, written atomically."""
    tmp = run_dir / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"step": step, "signal": signal_name, "checkpoint": str(checkpoint),
                               "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}, indent=2) + "\n")
    os.replace(tmp, run_dir / MARKER)


def clear_marker(run_dir: Path) -> None:
    """A resumed run is no longer a preempted one."""
    (run_dir / MARKER).unlink(missing_ok=True)


def resume_command() -> str:
    """The command that started this process, as a user would type it again, with ``--resume`` (and without
    ``--overwrite``, which would throw the saved checkpoint away)."""
    argv = [a for a in sys.argv if a != "--overwrite"]
    script = os.path.relpath(argv[0]) if os.path.isabs(argv[0]) else argv[0]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    head = ["python", script] if world == 1 else [f"deepspeed --num_gpus {world}", script]
    import shlex
    tail = " ".join(shlex.quote(a) for a in argv[1:] if not a.startswith("--local_rank"))
    return " ".join(head) + (" " + tail if tail else "") + ("" if "--resume" in argv else " --resume")
