"""Run plumbing shared by the finetuning and pre-training loops.

Process layout, seeding, optimizer/schedule, run-directory setup, checkpoint
save/resume of the per-rank state (bank shard, sampler position, RNG), and the
collective export of the student.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from codir_ds.config import ExperimentConfig, save_config
from codir_ds.data.sampler import build_sampler
from codir_ds.distill.memory_bank import derive_seed
from codir_ds.engine import checkpoint as ckpt
from codir_ds.engine.faults import maybe_fault
from codir_ds.errors import CodirError
from codir_ds.models.loading import export_student


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
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    deepspeed.init_distributed(verbose=False)
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


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose gradients are not finite, and says so in ``overflow``.

    DeepSpeed's ZeRO, fp16 and bf16 optimizers already skip such steps; a plain fp32
    engine (ZeRO stage 0) calls the client optimizer directly and would write NaN into
    the weights. DeepSpeed reads ``overflow`` to count the step as skipped and to hold
    the LR schedule. Costs one host sync per optimizer step, so it is used only there.
    """

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.overflow = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if self.overflow:
            return None
        return super().step(closure)


def sampler_and_steps(num_train: int, ds: dict, rank: int, world: int, tcfg, lengths=None, group_window: int = 50):
    """The training sampler for ``num_train`` ids and the run's number of optimizer steps.

    ``training.max_steps`` when > 0, else ``training.epochs`` times the optimizer steps per epoch.
    ``lengths`` (``[N]`` token counts, ``data.group_by_length``) groups batches by length.
    """
    accum = ds["gradient_accumulation_steps"]
    sampler = build_sampler(num_train, ds["train_micro_batch_size_per_gpu"], rank, world, tcfg.seed, accum,
                            tcfg.deterministic, lengths, group_window)
    steps_per_epoch = max(1, sampler.batches_per_epoch // accum)
    total_steps = tcfg.max_steps if tcfg.max_steps > 0 else max(1, math.ceil(tcfg.epochs * steps_per_epoch))
    return sampler, total_steps


def needs_nonfinite_guard(ds: dict) -> bool:
    """True when DeepSpeed would apply a step with non-finite gradients (fp32 without ZeRO)."""
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    return (stage == 0 and not ds.get("fp16", {}).get("enabled", False)
            and not ds.get("bf16", {}).get("enabled", False))


def fused_adamw_devices() -> list[str]:
    """Device types with torch's fused AdamW kernel (``cuda`` and, since torch 2.4, ``cpu``, ...)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        return list(_get_fused_kernels_supported_devices())
    except ImportError:  # private torch API: be conservative
        return ["cuda"]


def run_device_type() -> str:
    """The device type this run trains on (DeepSpeed's accelerator: ``cuda``, ``cpu``, ...)."""
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().device_name()


def resolve_optimizer_impl(impl: str, device_type: Optional[str] = None) -> str:
    """``training.optimizer_impl`` on ``device_type``: ``fused``, ``foreach`` or ``plain``.

    ``auto`` is fused where the device has the fused kernel, else foreach; ``fused`` where it
    has none is refused in one line (called by the start-up checks, before anything is written).
    """
    device_type = device_type or run_device_type()
    supported = device_type in fused_adamw_devices()
    if impl == "auto":
        return "fused" if supported else "foreach"
    if impl == "fused" and not supported:
        raise CodirError(f"training.optimizer_impl=fused: torch {torch.__version__} has no fused AdamW on "
                         f"'{device_type}' (only {', '.join(fused_adamw_devices())}): set "
                         f"training.optimizer_impl=auto, foreach or plain")
    if impl not in ("fused", "foreach", "plain"):
        raise CodirError(f"config key 'training.optimizer_impl' must be one of auto, fused, foreach, plain; got "
                         f"{impl!r}: fix it in the YAML or with --set training.optimizer_impl=...")
    return impl


def optimizer_flags(impl: str) -> dict:
    """AdamW's ``fused`` / ``foreach`` arguments for a resolved implementation."""
    return {"fused": {"fused": True, "foreach": False}, "foreach": {"fused": False, "foreach": True},
            "plain": {"fused": False, "foreach": False}}[impl]


def optimizer_and_schedule(module: torch.nn.Module, tcfg, total_steps: int, ds: Optional[dict] = None,
                           device_type: Optional[str] = None):
    """AdamW (no decay on biases/norms) and linear warm-up then linear decay to 0.

    ``ds``: the DeepSpeed config; where DeepSpeed itself would not skip non-finite steps
    the optimizer is :class:`GuardedAdamW`. The implementation (fused / foreach / plain) is
    ``training.optimizer_impl`` resolved for ``device_type`` (default: where the optimizer runs, see
    :func:`optimizer_device_type`).
    """
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    impl = resolve_optimizer_impl(getattr(tcfg, "optimizer_impl", "auto"), device_type or optimizer_device_type(ds))
    cls = GuardedAdamW if ds is not None and needs_nonfinite_guard(ds) else torch.optim.AdamW
    opt = cls(groups, lr=tcfg.lr, betas=tuple(tcfg.adam_betas), eps=tcfg.adam_eps, **optimizer_flags(impl))
    warmup = int(tcfg.warmup_ratio * total_steps)

    def linear(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, linear)


def optimizer_device_type(ds: Optional[dict] = None) -> str:
    """Where the optimizer's parameters live: the CPU under ZeRO optimizer offload, else the run's device."""
    offload = ((ds or {}).get("zero_optimization") or {}).get("offload_optimizer") or {}
    if str(offload.get("device", "none")).lower() not in ("none", ""):
        return "cpu"
    return run_device_type()


def check_student_options(tcfg, ds: dict) -> None:
    """Start-up checks of ``training.optimizer_impl`` and ``training.compile`` that need the machine and the
    DeepSpeed JSON (the value checks are in the config's ``validate``). One-line errors, nothing written."""
    resolve_optimizer_impl(tcfg.optimizer_impl, optimizer_device_type(ds))
    if not tcfg.compile:
        return
    stage = int((ds.get("zero_optimization") or {}).get("stage", 0))
    if stage == 3:
        raise CodirError("training.compile is not supported with ZeRO-3 (its parameter-gathering hooks break the "
                         "compiled graph at every submodule): use ds_configs/zero2.json or set training.compile=false")
    if ds.get("compile", {}).get("deepcompile", False):
        raise CodirError("training.compile compiles with torch.compile, not DeepSpeed's deepcompile: remove "
                         "compile.deepcompile from the DeepSpeed JSON or set training.compile=false")
    if run_device_type() == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++",
                                                                          "clang++")):
        raise CodirError("training.compile on the CPU needs a C++ compiler for TorchInductor (none of $CXX, g++, "
                         "c++, clang++ is on PATH): install one or set training.compile=false")


def compile_engine(engine, *called: Optional[torch.nn.Module]) -> float:
    """``training.compile``: torch.compile the engine's module (student + heads) in place, dynamic shapes.

    ``nn.Module.compile`` (what ``engine.compile`` calls) keeps the module object, so state-dict keys,
    checkpoints and exports carry no ``_orig_mod.`` prefix. ``dynamic=True``: finetuning pads each batch
    to its longest sequence and evaluation uses other batch sizes; static shapes would recompile for each.
    Compilation itself happens lazily in the first forward (and backward) of each mode (train / eval).
    ``called``: other models the compiled forward calls (CR-ILD's EMA student), prepared like the student.
    Returns the seconds spent here (the set-up only).
    """
    from deepspeed.accelerator import get_accelerator
    t0 = time.perf_counter()
    if get_accelerator().device_name() == "cpu":
        # Dropout through ATen's RNG, as in eager: the same masks as an eager run from the same RNG state,
        # and faster on the CPU than Inductor's own random kernels (fwd+bwd of the MiniLM 2x384 student,
        # batch 32 x 64, 2 cores: 0.40 s against 0.44 s). GPUs keep Inductor's fused (Philox) dropout.
        import torch._inductor.config as inductor_config
        inductor_config.fallback_random = True
    for module in (engine.module, *called):
        if module is not None:
            install_output_hooks(module)
    engine.compile(backend=get_accelerator().get_compile_backend(), compile_kwargs={"dynamic": True})
    return time.perf_counter() - t0


def install_output_hooks(module: torch.nn.Module) -> None:
    """Install transformers' hidden-state/attention capturing hooks now rather than in the first forward.

    transformers 5 installs them lazily, under a threading lock, in the first forward that asks for
    ``output_hidden_states``; traced by torch.compile, that lock is a graph break which stays in the
    compiled student (its forward split in several graphs). Eager behaviour is unchanged.
    """
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # transformers without lazy output hooks
        return
    for m in module.modules():
        if isinstance(m, PreTrainedModel):
            maybe_install_capturing_hooks(m)


def open_run_dir(run_dir: Path, mode: str, cfg: ExperimentConfig, ds: dict, rank: int,
                 warning: Optional[str]) -> None:
    """Rank 0 creates (or clears, with --overwrite) the run directory and records the config. Collective."""
    from codir_ds.engine.rundir import clear_run_dir
    if rank == 0:
        if warning:
            print(f"warning: {warning}", flush=True)
        if mode == "overwrite":
            clear_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if mode != "resume":
            save_config(cfg, run_dir / "config.yaml")
        (run_dir / "ds_config.json").write_text(json.dumps(ds, indent=2))
    # Every rank must see the same run directory: checkpoints are written by all ranks and
    # published by rank 0, so a node-local --output_dir would lose shards silently.
    token = [os.urandom(8).hex() if rank == 0 else None]  # not the seeded RNGs
    dist.broadcast_object_list(token, src=0)
    marker = run_dir / f".codir_shared_check_{token[0]}"
    if rank == 0:
        marker.write_text(token[0])
    dist.barrier()
    deadline = time.monotonic() + 15.0  # network filesystems may show a new file late
    while not marker.is_file() and time.monotonic() < deadline:
        time.sleep(0.25)
    from deepspeed.accelerator import get_accelerator
    ok = torch.tensor([1 if marker.is_file() else 0], device=get_accelerator().current_device_name())
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if rank == 0:
        marker.unlink(missing_ok=True)
    if not int(ok):
        raise CodirError(f"--output_dir '{run_dir}' is not on a filesystem shared by every node: put it on shared "
                         f"storage (every rank writes its checkpoint files there)")


def resume_plan(ckpt_root: Path, world: int) -> Optional[str]:
    """Before ``deepspeed.initialize`` on --resume: how the DeepSpeed state must be loaded.

    Returns ``"universal"`` when the newest checkpoint was written by another number of
    ranks with ZeRO-partitioned optimizer state (the engine must then be created with
    ``checkpoint.load_universal``), else None.
    """
    tag = ckpt.latest_tag(ckpt_root)
    if tag is None:
        raise CodirError(f"--resume: no complete checkpoint under '{ckpt_root}': start a new run with --overwrite")
    saved = ckpt.saved_world_size(ckpt_root / tag)
    if saved and saved != world and ckpt.is_zero_checkpoint(ckpt_root / tag):
        return "universal"
    return None


def engine_config(ds: dict, universal: bool) -> dict:
    """The DeepSpeed config given to ``deepspeed.initialize`` (``load_universal`` when resuming re-sharded)."""
    if not universal:
        return ds
    return {**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}}


def resume_latest(engine, ckpt_root: Path, rank: int, world: int, sampler, bank, seed: int,
                  extras: Optional[dict] = None, extra_engines: Optional[dict] = None) -> dict:
    """Load the newest complete checkpoint into the engine, sampler, RNG and bank; returns the client state.

    Collective. On the number of ranks that wrote it, everything is restored exactly. On
    another number, rank 0 first converts the DeepSpeed state to a universal checkpoint
    (:func:`resume_plan` made the engine ready for it), the bank is re-sharded from every
    rank's shard, the sampler continues the epoch with the examples not yet seen in it,
    and dropout RNGs are re-seeded from ``(seed, rank, step)``. ``extras`` (name -> object with
    ``load_state_dict``, e.g. CR-ILD's EMA student) are restored from the checkpoint's rank files.
    ``extra_engines`` (name -> DeepSpeed engine, e.g. CTCD's larger model, saved by
    :func:`save_run_checkpoint`) are loaded, and converted, like the main engine.
    """
    tag = ckpt.latest_tag(ckpt_root)
    if tag is None:
        raise CodirError(f"--resume: no complete checkpoint under '{ckpt_root}': start a new run with --overwrite")
    rank_states = ckpt.load_rank_states(ckpt_root / tag, world)
    saved_world = len(rank_states)
    load_tag = tag
    if saved_world != world and ckpt.is_zero_checkpoint(ckpt_root / tag):
        failure = None
        if rank == 0:
            print(f"resuming a {saved_world}-rank checkpoint on {world} ranks: converting {tag} to DeepSpeed's "
                  f"universal format", flush=True)
            try:
                ckpt.convert_to_universal(ckpt_root, tag)
                for name in extra_engines or {}:
                    ckpt.convert_to_universal(ckpt_root / tag, name, out_root=ckpt_root / (tag + ckpt.UNIVERSAL_SUFFIX))
            except CodirError as e:
                failure = str(e)
        flag = [failure]
        dist.broadcast_object_list(flag, src=0)
        if flag[0]:
            raise CodirError(flag[0])
        load_tag = tag + ckpt.UNIVERSAL_SUFFIX
    client = ckpt.load_checkpoint(engine, ckpt_root, load_tag)
    for name, other in (extra_engines or {}).items():
        if load_tag == tag:
            ckpt.load_checkpoint(other, ckpt_root / tag, name)
        else:
            ckpt.load_checkpoint(other, ckpt_root / load_tag, name + ckpt.UNIVERSAL_SUFFIX)
    try:
        sampler.resume([s["sampler"] for s in rank_states])
        if bank is not None:
            bank.load_state_dict([s["bank"] for s in rank_states])
        own = rank_states[rank if saved_world == world else 0].get("extras") or {}
        for name, obj in (extras or {}).items():
            if name not in own:
                raise ValueError(f"no saved state for {name}")
            obj.load_state_dict(own[name])
    except (ValueError, RuntimeError) as e:
        raise CodirError(f"checkpoint '{ckpt_root / tag}' does not fit this run ({e}): resume with the run's "
                         f"own config and data") from None
    if saved_world == world:
        ckpt.set_rng_state(rank_states[rank]["rng"])
    else:
        set_seed(derive_seed(seed, rank, engine.global_steps))
    if rank == 0:
        note = f" (written by {saved_world} ranks, re-sharded to {world})" if saved_world != world else ""
        print(f"resumed from {ckpt_root / tag} at step {engine.global_steps}{note}", flush=True)
    return client.get("codir", {})


def save_run_checkpoint(engine, ckpt_root: Path, step: int, state: dict, rank: int, world: int, sampler, bank,
                        keep: int, extras: Optional[dict] = None, extra_engines: Optional[dict] = None) -> None:
    """Collective: DeepSpeed state plus this rank's bank shard, sampler position, RNG and ``extras``' states.

    ``extra_engines`` (name -> DeepSpeed engine, CTCD's larger model) are written into the same
    checkpoint folder before it is published.
    """
    rank_state = {"world_size": world, "rank": rank, "sampler": sampler.state_dict(), "rng": ckpt.rng_state(),
                  "bank": bank.state_dict() if bank is not None else None,
                  "extras": {name: obj.state_dict() for name, obj in (extras or {}).items()}}
    ckpt.save_checkpoint(engine, ckpt_root, step, {"codir": dict(state)}, rank_state, rank, keep,
                         extra_engines=extra_engines)


def apply_bank_updates(bank, engine, pending: list, device, routed: bool = False) -> None:
    """After an optimizer step: the positives' momentum updates (Eq. 5), held back since their micro steps.

    A step the engine skipped (fp16 overflow, non-finite gradients) leaves the bank untouched
    too. ``routed`` (``training.deterministic``: ranks train on ids they do not own) sends
    each update to the owner rank; this is collective. Empties ``pending``.
    """
    if bank is not None and engine.was_step_applied():
        if routed:
            bank.update_routed(torch.cat([ids for ids, _ in pending]), torch.cat([f for _, f in pending]),
                               id_group=host_group())
        else:
            for ids, feats in pending:  # host ids: the bank checks them without a device sync
                bank.update(ids, feats)
    pending.clear()


def check_skipped(engine, state: dict, limit: int, step: int) -> None:
    """The non-finite policy, after every optimizer step (identical on all ranks).

    DeepSpeed skips a step whose gradients are not finite (fp16 loss-scale overflow or a
    NaN/inf loss in any precision; see ``optimizer_and_schedule`` for plain fp32): weights,
    optimizer state, LR schedule and bank stay as they were. Skipped steps are counted
    (``train/skipped_steps``); ``limit`` of them in a row stop the run with an error.
    """
    if engine.was_step_applied():
        state["consecutive_skips"] = 0
        return
    state["consecutive_skips"] = state.get("consecutive_skips", 0) + 1
    if state["consecutive_skips"] >= limit:
        raise CodirError(f"{limit} optimizer steps in a row (up to step {step}) were skipped for non-finite loss or "
                         f"gradients: lower training.lr or check the data, then --resume from the last checkpoint "
                         f"(or raise training.max_consecutive_skips)")


def after_step(step: int, total_steps: int, engine, cfg: ExperimentConfig, dtype: torch.dtype, monitor,
               run_eval: Callable[[int], dict], save: Callable[[int], None]) -> bool:
    """Bookkeeping after optimizer step ``step``: log, evaluate, checkpoint.

    Returns True when ``training.stop_at_step`` ends the run here (a checkpoint has been saved).
    The final evaluation and checkpoint, at ``total_steps``, are the caller's.
    """
    tcfg = cfg.training
    maybe_fault("step", step, engine.global_rank)
    monitor.advance()
    if step % cfg.logging.log_every == 0 or step == total_steps:
        extra = {"train/lr": engine.get_lr()[0]}
        scale = getattr(engine.optimizer, "cur_scale", None)
        if dtype == torch.float16 and scale is not None:
            extra["train/loss_scale"] = float(scale)
        extra["train/skipped_steps"] = float(engine.skipped_steps)
        monitor.flush(step, extra)
    if step >= total_steps:
        return False
    if tcfg.eval_every and step % tcfg.eval_every == 0:
        run_eval(step)
    saved = bool(tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0)
    if saved:
        save(step)
    if tcfg.stop_at_step and step == tcfg.stop_at_step:
        if not saved:
            save(step)
        return True
    return False


def stop_early(step: int, rank: int, monitor) -> dict:
    """End a run stopped by ``training.stop_at_step``; returns what the run function returns."""
    monitor.close()
    if rank == 0:
        print(f"stopped at step {step} (training.stop_at_step); continue with --resume", flush=True)
    return {"stopped_at_step": step}


def export_engine_student(engine, tokenizer, out_dir: Path, rank: int, extra: dict) -> None:
    """Collective under ZeRO-3 (parameters are gathered); rank 0 writes the HF directory atomically."""
    import deepspeed
    student = engine.module.student
    with deepspeed.zero.GatheredParameters(list(student.parameters()), modifier_rank=None):
        if rank == 0:
            tmp = out_dir.with_name(out_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            export_student(student, tokenizer, tmp, extra)
            shutil.rmtree(out_dir, ignore_errors=True)
            os.replace(tmp, out_dir)
