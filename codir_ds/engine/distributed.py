"""The process layout of a run: ranks from the launcher's environment, torch.distributed start-up,
the host-side (gloo) group for small exchanges, DeepSpeed's shared-memory buffer, and seeding."""
from __future__ import annotations

import atexit
import os
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from codir_ds.errors import CodirError
from codir_ds.pipeline import free_port


def dist_env() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from the launcher's environment (1 process if unset)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


_HOST_GROUP = {}


def host_group():
    """A gloo process group for small host-side exchanges (example ids), or None when the default group
    already runs on the CPU (gloo). With NCCL, exchanging ids through the default group would put them
    on the device and bring them back: a host-device sync in the step; through gloo the host tensors
    travel as they are. Collective the first time (every rank creates it at the same point)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or dist.get_backend() == "gloo":
        return None
    if "group" not in _HOST_GROUP:
        _HOST_GROUP["group"] = dist.new_group(backend="gloo")
    return _HOST_GROUP["group"]


def init_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPU)."""
    import deepspeed
    tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    if "RANK" not in os.environ and tasks > 1 and "SLURM_PROCID" in os.environ:
        # `srun python launchers/...` (or `deepspeed --launcher slurm`) gives no RANK/WORLD_SIZE:
        # every task would train alone as rank 0 of 1 into the same run directory.
        raise CodirError(f"started by srun as {tasks} tasks without RANK/WORLD_SIZE: start one torchrun (or "
                         f"deepspeed --no_ssh) per node, as launchers/slurm_multinode.sbatch does")
    single = "RANK" not in os.environ and os.environ.get("WORLD_SIZE", "1") == "1"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if single and "MASTER_PORT" not in os.environ:  # plain `python launchers/...`: any free port will do
        os.environ["MASTER_PORT"] = str(free_port())
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    try:
        deepspeed.init_distributed(verbose=False)
    except dist.DistNetworkError as e:
        if "EADDRINUSE" not in str(e) and "address already in use" not in str(e).lower():
            raise
        raise CodirError(f"MASTER_PORT {os.environ['MASTER_PORT']} on {os.environ['MASTER_ADDR']} is already in use "
                         f"(another job on this machine?): pass a free port, e.g. MASTER_PORT={free_port()} (or "
                         f"deepspeed --master_port / torchrun --master_port)") from None
    atexit.register(remove_shm_buffer)
    # Bind this process to its accelerator before anything is placed on it (the engine
    # would do it only inside deepspeed.initialize; the teacher and bank come first).
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(int(os.environ["LOCAL_RANK"]))


def shm_buffer_path(rank: Optional[int] = None) -> Path:
    """DeepSpeed's CPU shared-memory all-reduce buffer of this process (~66 MB in /dev/shm)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def remove_shm_buffer() -> None:
    """Unlink this rank's shared-memory buffer at exit.

    DeepSpeed 0.19's CPU comm op creates it at init and never unlinks it: every CPU run
    would leave 66 MB per rank in /dev/shm (RAM) until reboot. Peers map it only during
    init, so removing the name at exit is safe.
    """
    try:
        shm_buffer_path().unlink(missing_ok=True)
    except OSError:
        pass


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
